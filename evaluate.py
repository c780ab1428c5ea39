"""LAVIS's repo-root ``evaluate.py``, with the blip2_internlm plugin loaded.

Run from the repository root exactly as with LAVIS's repository::

    python -m torch.distributed.run --nproc_per_node=2 evaluate.py --cfg-path CFG [--options k=v ...]

Same as ``python -m blip2_internlm.evaluate`` (see that module).
"""

from blip2_internlm.evaluate import main

if __name__ == "__main__":
    main()
