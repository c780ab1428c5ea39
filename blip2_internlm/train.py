"""``python -m blip2_internlm.train --cfg-path CFG [--options k=v ...]``: LAVIS's train.py."""


def main(argv=None):
    from blip2_internlm._entry import build, setup, shutdown

    cfg, job_id = setup("Training", argv)
    build(cfg, job_id).train()
    shutdown()


if __name__ == "__main__":
    main()
