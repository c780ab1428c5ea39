"""What LAVIS's repo-root train.py and evaluate.py do, shared by both entry points."""

from __future__ import annotations

import argparse
from datetime import datetime

import torch

from blip2_internlm.seeding import run_seed, seed_all


def parse_args(description: str, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to configuration file.")
    parser.add_argument(
        "--options",
        nargs="+",
        help="override some settings in the used config, the key-value pair in xxx=yyy format will be merged "
        "into config file",
    )
    return parser.parse_args(argv)


def setup(description: str, argv=None):
    """Config, distributed mode, seeds and logging, as LAVIS's scripts do; returns (cfg, job_id)."""
    from lavis.common.config import Config
    from lavis.common.dist_utils import init_distributed_mode
    from lavis.common.logger import setup_logger

    import blip2_internlm  # noqa: F401  (compat + registration before LAVIS reads the config)
    from blip2_internlm.run_config import RunConfigError

    args = parse_args(description, argv)
    try:
        cfg = Config(args)  # validates run: (compat fix run_config_validated_at_start), before anything is built
    except RunConfigError as error:
        source = args.cfg_path + (" with --options" if args.options else "")
        if len(error.problems) == 1:
            raise SystemExit(f"{source}: {error}") from None
        listed = "".join(f"\n  {problem}" for problem in error.problems)
        raise SystemExit(f"{source}: {len(error.problems)} bad run settings:{listed}") from None
    check_device(cfg.run_cfg)
    init_distributed_mode(cfg.run_cfg)
    setup_seeds(cfg.run_cfg)
    setup_logger()
    cfg.pretty_print()
    return cfg, shared_job_id()


def check_device(run_cfg) -> None:
    """Exit with one line if run.device names a CUDA device this machine lacks, or a tracker of
    run.report_to cannot be used here."""
    from blip2_internlm.run_config import RunConfigError, check_device_available, check_tracking_available

    try:
        check_device_available(run_cfg)
        check_tracking_available(run_cfg)
    except RunConfigError as error:
        raise SystemExit(str(error)) from None


def setup_seeds(run_cfg) -> None:
    from lavis.common.dist_utils import get_rank

    from blip2_internlm.run_config import RunSettings

    seed_all(run_seed(RunSettings.read(run_cfg).runner.seed, get_rank()))
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def shared_job_id() -> str:
    """A timestamp job id that every rank agrees on (each rank's own clock may cross a second).

    Two launches within one second get the same id; the runner then gives the later one
    ``<id>_2`` (compat fix fresh_job_dir_relative_to_cwd)."""
    from lavis.common.dist_utils import is_dist_avail_and_initialized

    job_id = [datetime.now().strftime("%Y%m%d%H%M%S")]
    if is_dist_avail_and_initialized():
        torch.distributed.broadcast_object_list(job_id, src=0)
    return job_id[0]


def build(cfg, job_id):
    import lavis.common.optims  # noqa: F401  (registers the LR schedulers, as LAVIS's train.py does)
    import lavis.runners  # noqa: F401
    from lavis import tasks
    from lavis.common.registry import registry

    from blip2_internlm.feature_cache import apply_feature_cache
    from blip2_internlm.run_config import RunSettings

    run = RunSettings.read(cfg.run_cfg)  # validated: lr_sched and runner name registered classes
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    datasets = apply_feature_cache(run, model, datasets)  # run.feature_cache; a no-op when off
    runner_cls = registry.get_runner_class(run.runner.runner)
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)


def shutdown() -> None:
    """Tear the process group down before exit: a gloo group left to the interpreter's
    shutdown can abort a rank ("terminate called without an active exception") after a
    successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
