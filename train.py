"""LAVIS's repo-root ``train.py``, with the blip2_internlm plugin loaded.

Run from the repository root exactly as with LAVIS's repository::

    python -m torch.distributed.run --nproc_per_node=2 train.py --cfg-path configs/tiny/pretrain_stage1.yaml
    python train.py --cfg-path CFG --options run.max_epoch=1 ...

Same as ``python -m blip2_internlm.train`` (see that module).
"""

from blip2_internlm.train import main

if __name__ == "__main__":
    main()
