"""Experiment tracking (run.report_to): what a training run sends to TensorBoard and wandb, read back.

The runs are the runner's own loop on a toy LAVIS model in one process (as in
test_runner_checkpoints.py): 32 pairs, batch 8, so 4 iterations an epoch; the 2-rank run is a
real gloo process group under torchrun.
"""

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf
from spec_helpers import REPO, run_python

PAIRS, BATCH = 32, 8
ITERS_PER_EPOCH = PAIRS // BATCH


#: The toy model, data and runner, as source: the fixture runs it here, the 2-rank spec in its workers.
TOY_SOURCE = """
import torch
from lavis.models.base_model import BaseModel
from lavis.tasks.base_task import BaseTask


class Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, samples):
        return {"loss": ((self.linear(samples["x"]).squeeze(-1) - samples["y"]) ** 2).mean()}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=32):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x.sum(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"image": self.x[index], "x": self.x[index], "y": self.y[index], "instance_id": index}


def make_runner(output_dir, job_id="job", **run):
    import lavis.common.optims  # noqa: F401  (registers the LR schedulers)
    from lavis.common.config import Config
    from omegaconf import OmegaConf

    from blip2_internlm.runner import ReliableRunner

    settings = dict(
        task="image_text_pretrain", lr_sched="linear_warmup_cosine_lr", init_lr=0.01, min_lr=0.001,
        weight_decay=0.0, max_epoch=2, batch_size_train=8, batch_size_eval=8, num_workers=0, seed=1,
        output_dir=str(output_dir), amp=False, evaluate=False, train_splits=["train"], valid_splits=[],
        device="cpu", distributed=False, log_freq=2, report_to=["tensorboard"],
    )
    settings.update(run)
    cfg = Config.__new__(Config)
    cfg.config = OmegaConf.create({"run": settings, "model": {}, "datasets": {}})
    torch.manual_seed(0)
    datasets = {"pairs": {"train": Pairs()}}
    return ReliableRunner(cfg=cfg, task=BaseTask(), model=Toy(), datasets=datasets, job_id=job_id)
"""


@pytest.fixture(scope="module")
def toy(lavis_ready):
    namespace = {}
    exec(compile(TOY_SOURCE, "toy_runner", "exec"), namespace)
    return namespace["make_runner"]


def record_losses(runner) -> list[float]:
    """The loss of every iteration as the task computed it, and (in the same order) the learning rate."""
    seen = []
    train_step = runner.task.train_step

    def recording_train_step(model, samples):
        loss = train_step(model=model, samples=samples)
        seen.append((loss.item(), runner.optimizer.param_groups[0]["lr"]))
        return loss

    runner.task.train_step = recording_train_step
    return seen


def scripted_evaluation(runner, val_metrics, test_metrics=None):
    """Validation reports the next of ``val_metrics``; the test phase ``test_metrics``."""
    values = iter(val_metrics)

    def eval_epoch(split_name, cur_epoch, skip_reload=False):
        return dict(test_metrics) if split_name == "test" else dict(next(values))

    runner.eval_epoch = eval_epoch


def events(job_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the job's TensorBoard log: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(job_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def epoch_losses(job_dir) -> list[float]:
    lines = (job_dir / "log.txt").read_text().splitlines()
    return [float(json.loads(line)["train_loss"]) for line in lines if line.startswith('{"train_')]


# --- TensorBoard ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensorboard_run(toy, tmp_path_factory):
    runner = toy(tmp_path_factory.mktemp("tb"), valid_splits=["val"], test_splits=["test"])
    losses = record_losses(runner)
    scripted_evaluation(
        runner, [{"agg_metrics": 0.5, "CIDEr": 1.25}, {"agg_metrics": 0.75, "CIDEr": 1.5}], {"agg_metrics": 0.625}
    )
    runner.train()
    return runner.output_dir, events(runner.output_dir), losses


def test_the_loss_of_every_iteration_is_logged_as_the_runner_computed_it(tensorboard_run):
    job_dir, series, losses = tensorboard_run
    assert [step for step, _ in series["train/loss"]] == list(range(1, 2 * ITERS_PER_EPOCH + 1))
    assert [value for _, value in series["train/loss"]] == pytest.approx([loss for loss, _ in losses], rel=1e-6)
    # each epoch's mean is log.txt's train_loss (which LAVIS writes to three decimals)
    per_epoch = [[v for s, v in series["train/loss"] if (s - 1) // ITERS_PER_EPOCH == e] for e in (0, 1)]
    assert [sum(v) / len(v) for v in per_epoch] == pytest.approx(epoch_losses(job_dir), abs=5e-4)
    assert [v for _, v in series["train/epoch_loss"]] == pytest.approx(epoch_losses(job_dir), abs=5e-4)


def test_the_learning_rate_of_every_iteration_is_logged(tensorboard_run):
    _, series, losses = tensorboard_run
    assert [value for _, value in series["train/lr"]] == pytest.approx([lr for _, lr in losses], rel=1e-6)
    assert len({round(v, 8) for _, v in series["train/lr"]}) > 1  # the cosine schedule moved it


def test_progress_is_logged_every_log_freq_iterations_and_at_each_epoch_end(tensorboard_run):
    _, series, _ = tensorboard_run
    assert series["train/epoch"] == [(2, 0.5), (4, 1.0), (6, 1.5), (8, 2.0)]  # log_freq 2, 4 iterations an epoch
    for tag in ("train/samples_per_s", "train/nonfinite_steps", "train/scaler_skips", "train/bad_samples"):
        assert [step for step, _ in series[tag]] == [2, 4, 6, 8], tag
    assert all(value > 0 for _, value in series["train/samples_per_s"])
    assert not any(tag.startswith("gpu/") for tag in series)  # a CPU run has no CUDA memory to report


def test_every_evaluation_metric_is_logged_under_its_split(tensorboard_run):
    _, series, _ = tensorboard_run
    assert series["val/agg_metrics"] == [(4, 0.5), (8, 0.75)]  # at the global step of each epoch's end
    assert series["val/CIDEr"] == [(4, 1.25), (8, 1.5)]
    assert series["val/best_epoch"] == [(4, 0), (8, 1)]
    assert series["test/agg_metrics"] == [(8, 0.625)]


def test_on_cuda_the_peak_memory_of_rank_0_is_logged_in_gib(toy, tmp_path, monkeypatch):
    from blip2_internlm.runner import ReliableRunner
    from blip2_internlm.tracking import Tracker

    class Recorder(Tracker):
        logged = []

        def log_scalars(self, step, scalars):
            self.logged.append((step, scalars))

    runner = toy(tmp_path)  # built on the CPU; only the memory readings are CUDA's here
    runner._tracker = Recorder()
    monkeypatch.setattr(ReliableRunner, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4.5 * 2**30)
    runner._track_progress(0, 2, ITERS_PER_EPOCH, bad_samples=0)
    ((_, values),) = Recorder.logged
    assert values["gpu/max_allocated_gib"] == 3.0 and values["gpu/max_reserved_gib"] == 4.5


def test_a_skipped_non_finite_step_logs_no_loss_and_is_counted(toy, tmp_path, monkeypatch):
    from blip2_internlm.runner import INJECT_NONFINITE_ENV

    monkeypatch.setenv(INJECT_NONFINITE_ENV, "2")  # the third iteration's loss becomes NaN
    runner = toy(tmp_path, max_epoch=1)
    runner.train()
    series = events(runner.output_dir)
    assert [step for step, _ in series["train/loss"]] == [1, 2, 4]
    assert [step for step, _ in series["train/lr"]] == [1, 2, 3, 4]
    assert series["train/nonfinite_steps"] == [(2, 0), (4, 1)]


def test_a_resumed_run_continues_the_step_numbering_and_the_same_curve(toy, tmp_path):
    straight = toy(tmp_path / "straight", max_epoch=3, save_every_iters=1)
    straight.train()

    killed = toy(tmp_path / "run", max_epoch=3, save_every_iters=1)
    train_step = killed.task.train_step

    def dying_train_step(model, samples):
        if killed.progress.global_step == 6:  # dies during the seventh iteration, after saving the sixth
            raise KeyboardInterrupt
        return train_step(model=model, samples=samples)

    killed.task.train_step = dying_train_step
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = toy(tmp_path / "run", job_id="again", max_epoch=3, save_every_iters=1, resume="auto")
    resumed.train()

    first, second, whole = (events(r.output_dir)["train/loss"] for r in (killed, resumed, straight))
    assert [step for step, _ in first] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in second] == list(range(7, 3 * ITERS_PER_EPOCH + 1))
    # the curve of the uninterrupted run, step for step (the resume is bitwise)
    assert [step for step, _ in first + second] == [step for step, _ in whole]
    assert [value for _, value in first + second] == [value for _, value in whole]


# --- wandb ----------------------------------------------------------------------------------


class RecordedRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_wandb_receives_the_same_scalars_as_tensorboard_and_the_whole_config(toy, tmp_path, monkeypatch):
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(RecordedRun(**kwargs)) or runs[-1])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    runner = toy(tmp_path, max_epoch=1, report_to=["tensorboard", "wandb"], wandb_project="shapes")
    runner.train()

    (run,) = runs
    assert run.init["project"] == "shapes" and run.init["name"] == runner.output_dir.name
    assert run.init["config"] == runner.config.to_dict() and run.init["config"]["run"]["report_to"]
    assert run.init["dir"] == str(runner.output_dir) and run.finished
    sent = {}
    for step, values in run.logged:
        for tag, value in values.items():
            sent.setdefault(tag, []).append((step, value))
    written = events(runner.output_dir)
    assert sent.keys() == written.keys()
    for tag, points in sent.items():
        assert [step for step, _ in points] == [step for step, _ in written[tag]], tag
        assert [value for _, value in points] == pytest.approx([value for _, value in written[tag]], rel=1e-6), tag


def test_wandb_offline_writes_its_run_in_the_job_directory_without_the_network(toy, tmp_path, monkeypatch):
    for variable, value in {
        "WANDB_MODE": "offline",
        "WANDB_CONSOLE": "off",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing answers there
    }.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    runner = toy(tmp_path / "out", max_epoch=1, report_to="wandb")
    runner.train()
    (offline_run,) = (runner.output_dir / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb")), sorted(p.name for p in offline_run.iterdir())


def test_wandb_online_without_a_login_stops_at_start_instead_of_prompting(lavis_ready, tmp_path, monkeypatch):
    from blip2_internlm.run_config import RunConfigError, check_tracking_available

    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "netrc").write_text("machine example.com login user password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(RunConfigError, match=r"run.report_to names wandb, but no W&B login.*WANDB_MODE=offline"):
        check_tracking_available({"report_to": ["wandb"]})
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc123\n")
    check_tracking_available({"report_to": ["wandb"]})  # `wandb login` wrote this entry
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_tracking_available({"report_to": ["wandb"]})


# --- settings and errors ----------------------------------------------------------------------


def test_report_to_takes_a_name_a_list_or_nothing(lavis_ready):
    from blip2_internlm.run_config import RunSettings, validate_run_config

    for value, expected in [
        (None, ()),
        ([], ()),
        ("none", ()),
        ("tensorboard", ("tensorboard",)),
        (["wandb", "tensorboard"], ("wandb", "tensorboard")),
    ]:
        validate_run_config({"report_to": value})
        assert RunSettings.read(OmegaConf.create({"report_to": value})).tracking.report_to == expected


def test_an_unknown_tracker_is_a_config_error_naming_the_key_and_the_known_ones(lavis_ready):
    from blip2_internlm.run_config import RunConfigError, validate_run_config

    with pytest.raises(RunConfigError) as raised:
        validate_run_config({"report_to": ["tensorboard", "mlflow"]})
    assert raised.value.problems == [
        "run.report_to = ['tensorboard', 'mlflow']: unknown tracker 'mlflow'; known: tensorboard, wandb (or none)"
    ]
    with pytest.raises(RunConfigError, match=r"^run.report_to = 3: expected a tracker name or a list of them"):
        validate_run_config({"report_to": 3})


@pytest.mark.parametrize("backend, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_tracker_whose_package_is_missing_stops_the_run_at_start_with_the_pip_command(
    lavis_ready, monkeypatch, backend, module
):
    from blip2_internlm._entry import check_device

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as stopped:
        check_device(OmegaConf.create({"device": "cpu", "report_to": [backend]}))
    message = str(stopped.value.code)
    assert f"run.report_to names {backend}, but its package is not installed" in message
    assert "pip install 'blip2-internlm[track]'" in message and f"pip install {backend}" in message


def test_changing_the_trackers_does_not_block_a_resume(lavis_ready):
    from blip2_internlm.runner import config_changes

    saved = {"run": {"report_to": [], "init_lr": 0.01}}
    assert config_changes(saved, {"run": {"report_to": ["wandb"], "wandb_project": "x", "init_lr": 0.01}}) == []


# --- rank 0 only ------------------------------------------------------------------------------


def test_no_tracker_and_no_file_on_other_ranks(lavis_ready, tmp_path):
    from blip2_internlm.tracking import Tracker, TrackingSettings, open_tracker

    settings = TrackingSettings(report_to=("tensorboard", "wandb"))
    tracker = open_tracker(settings, job_dir=tmp_path, job_id="job", config={}, main_process=False)
    assert type(tracker) is Tracker
    tracker.log_scalars(1, {"train/loss": 1.0})
    tracker.close()
    assert list(tmp_path.iterdir()) == []


WORKER = """
import sys
import torch.distributed as dist
import blip2_internlm  # noqa: F401
from lavis.common.dist_utils import get_rank

dist.init_process_group("gloo")
TOY
runner = make_runner(sys.argv[1], distributed=True, max_epoch=1, report_to=["tensorboard", "wandb"])
runner.train()
print("rank", get_rank(), "trained", runner.progress.global_step, "steps")
dist.destroy_process_group()
"""


def test_a_two_rank_run_writes_its_logs_from_rank_0_only(lavis_ready, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("TOY", TOY_SOURCE))
    output = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_CONSOLE": "off", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    env.update({k: str(tmp_path / k.lower()) for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")})
    result = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(output), env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 1 trained 2 steps" in result.stdout  # 32 pairs, batch 8 on each of 2 ranks
    (job_dir,) = output.iterdir()
    (event_file,) = (job_dir / "tensorboard").iterdir()  # one writer, rank 0's
    assert len(list((job_dir / "wandb").glob("offline-run-*"))) == 1
    assert [step for step, _ in events(job_dir)["train/loss"]] == [1, 2]
