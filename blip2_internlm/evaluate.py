"""``python -m blip2_internlm.evaluate --cfg-path CFG [--options k=v ...]``: LAVIS's evaluate.py."""


def main(argv=None):
    from blip2_internlm._entry import build, setup

    cfg, job_id = setup("Evaluating", argv)
    build(cfg, job_id).evaluate(skip_reload=True)


if __name__ == "__main__":
    main()
