"""``python -m blip2_internlm.evaluate --cfg-path CFG [--options k=v ...]``: LAVIS's evaluate.py."""


def main(argv=None):
    import json

    from lavis.common.dist_utils import is_main_process

    from blip2_internlm._entry import build, setup, shutdown

    cfg, job_id = setup("Evaluating", argv)
    metrics = build(cfg, job_id).evaluate(skip_reload=True)
    if is_main_process():  # LAVIS only logs them; print what a user came for
        print(json.dumps(metrics, ensure_ascii=False, indent=2, default=str), flush=True)
    shutdown()
    return metrics


if __name__ == "__main__":
    main()
