"""The runner's checkpoint bookkeeping, on a toy LAVIS model in one process: best metric kept across a
resume, keep_last_n, auto-resume past unreadable files, and no checkpoint of non-finite weights."""

import logging

import pytest
import torch
from omegaconf import OmegaConf


@pytest.fixture(scope="module")
def toy(lavis_ready):
    from lavis.models.base_model import BaseModel
    from lavis.tasks.base_task import BaseTask

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)
            self.dropout = torch.nn.Dropout(0.25)  # draws from the RNG, which a resume must restore

        def forward(self, samples):
            return {"loss": ((self.linear(self.dropout(samples["x"])).squeeze(-1) - samples["y"]) ** 2).mean()}

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, n=32):
            generator = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, 4, generator=generator)
            self.y = self.x.sum(-1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, index):
            return {"image": self.x[index], "x": self.x[index], "y": self.y[index], "instance_id": index}

    return Toy, Pairs, BaseTask


def make_runner(toy, output_dir, job_id="job", **run):
    import lavis.common.optims  # noqa: F401  (registers the LR schedulers)
    from lavis.common.config import Config

    from blip2_internlm.runner import ReliableRunner, ReliableRunnerIter

    Toy, Pairs, BaseTask = toy
    settings = dict(
        task="image_text_pretrain",
        lr_sched="linear_warmup_cosine_lr",
        init_lr=0.01,
        min_lr=0.01,
        weight_decay=0.0,
        max_epoch=3,
        batch_size_train=8,
        batch_size_eval=8,
        num_workers=0,
        seed=1,
        output_dir=str(output_dir),
        amp=False,
        evaluate=False,
        train_splits=["train"],
        valid_splits=[],
        device="cpu",
        distributed=False,
        log_freq=1000,
    )
    settings.update(run)
    cfg = Config.__new__(Config)
    cfg.config = OmegaConf.create({"run": settings, "model": {}, "datasets": {}})
    torch.manual_seed(0)
    runner_cls = ReliableRunnerIter if settings.get("runner") == "runner_iter" else ReliableRunner
    runner = runner_cls(cfg=cfg, task=BaseTask(), model=Toy(), datasets={"pairs": {"train": Pairs()}}, job_id=job_id)
    runner.evaluate = lambda cur_epoch="best", skip_reload=False: None
    return runner


def scripted_validation(runner, metrics):
    """eval_epoch that reports the next of ``metrics`` as agg_metrics."""
    values = iter(metrics)
    runner.eval_epoch = lambda split_name, cur_epoch, skip_reload=False: {"agg_metrics": next(values)}
    runner.evaluate = lambda cur_epoch="best", skip_reload=False: None


def test_a_resumed_run_keeps_the_best_metric_and_does_not_overwrite_the_best_checkpoint(toy, tmp_path):
    first = make_runner(toy, tmp_path, max_epoch=2, valid_splits=["val"])
    scripted_validation(first, [0.9, 0.5])
    first.train()
    best = first.output_dir / "checkpoint_best.pth"
    best_bytes = best.read_bytes()

    resumed = make_runner(toy, tmp_path, job_id="job", max_epoch=3, valid_splits=["val"], resume="auto")
    scripted_validation(resumed, [0.7])  # epoch 2: better than epoch 1, worse than epoch 0
    resumed.train()
    assert resumed.progress.best_epoch == 0 and resumed.progress.best_agg_metric == 0.9
    # the new job directory holds the earlier best model, unchanged, for the test phase to reload
    assert (resumed.output_dir / "checkpoint_best.pth").read_bytes() == best.read_bytes() == best_bytes


def test_keep_last_n_prunes_old_epoch_checkpoints_but_keeps_last(toy, tmp_path):
    runner = make_runner(toy, tmp_path, max_epoch=4, keep_last_n=2)
    runner.train()
    names = sorted(p.name for p in runner.output_dir.glob("*.pth"))
    assert names == ["checkpoint_2.pth", "checkpoint_3.pth", "checkpoint_last.pth"]


def test_keep_last_n_counts_over_the_job_directories_of_one_resumed_run(toy, tmp_path):
    first = make_runner(toy, tmp_path, job_id="first", max_epoch=2, keep_last_n=2)
    first.train()
    (first.output_dir / ".checkpoint_last.pth.999.partial").write_bytes(b"cut short")  # an interrupted save
    resumed = make_runner(toy, tmp_path, job_id="second", max_epoch=4, keep_last_n=2, resume="auto")
    resumed.train()
    kept = sorted(p.name for d in (first.output_dir, resumed.output_dir) for p in d.glob("checkpoint_[0-9]*.pth"))
    assert kept == ["checkpoint_2.pth", "checkpoint_3.pth"]
    assert not list(first.output_dir.glob("*.partial"))
    saved = torch.load(resumed.output_dir / "checkpoint_last.pth", weights_only=True)
    assert saved["job_dirs"] == [str(first.output_dir), str(resumed.output_dir)]


def test_auto_resume_skips_an_unreadable_newest_checkpoint_and_names_it(toy, tmp_path, caplog):
    runner = make_runner(toy, tmp_path, max_epoch=2)
    runner.train()
    newest, epoch_1 = runner.output_dir / "checkpoint_last.pth", runner.output_dir / "checkpoint_1.pth"
    assert newest.stat().st_ino == epoch_1.stat().st_ino  # a hard link: cutting it in place would cut both
    data = newest.read_bytes()
    newest.unlink()
    newest.write_bytes(data[:100])  # a file of its own, cut as a crash mid-copy would leave it
    assert torch.load(epoch_1, weights_only=True)["progress"]["epoch"] == 1  # the fallback is intact
    resumed = make_runner(toy, tmp_path, max_epoch=3, resume="auto")
    with caplog.at_level(logging.INFO):
        resumed.train()
    assert f"skipping {newest}" in caplog.text and "truncated" in caplog.text
    assert f"resuming from {epoch_1}" in caplog.text  # the next most advanced: epoch 1, not epoch 0
    assert resumed.start_epoch == 2 and resumed.progress.epoch == 2


def test_auto_resume_takes_the_most_advanced_checkpoint_not_the_newest_file(toy, tmp_path, caplog):
    import os

    ahead = make_runner(toy, tmp_path, job_id="ahead", max_epoch=2)
    ahead.train()
    behind = make_runner(toy, tmp_path, job_id="behind", max_epoch=1)
    behind.train()
    for path in ahead.output_dir.glob("*.pth"):  # the more advanced run's files are the older ones
        os.utime(path, (1_000_000, 1_000_000))
    resumed = make_runner(toy, tmp_path, max_epoch=3, resume="auto")
    with caplog.at_level(logging.INFO):
        resumed.train()
    assert f"resuming from {ahead.output_dir}" in caplog.text and resumed.start_epoch == 2


def test_nothing_to_resume_warns_with_auto_and_stops_with_required(toy, tmp_path, caplog):
    from blip2_internlm.checkpoint import CheckpointError

    with caplog.at_level(logging.WARNING):
        make_runner(toy, tmp_path / "a", max_epoch=1, resume="auto").train()
    assert any(r.levelno == logging.WARNING and "no loadable checkpoint" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match="run.resume = required: no loadable checkpoint under"):
        make_runner(toy, tmp_path / "b", max_epoch=1, resume="required").train()


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_keys(toy, tmp_path):
    from blip2_internlm.checkpoint import CheckpointError

    make_runner(toy, tmp_path, max_epoch=1).train()
    other = make_runner(toy, tmp_path, max_epoch=2, resume="auto", init_lr=0.02, batch_size_train=4)
    with pytest.raises(CheckpointError, match=r"run.batch_size_train: 8 -> 4; run.init_lr: 0.01 -> 0.02"):
        other.train()
    allowed = make_runner(
        toy, tmp_path, max_epoch=2, resume="auto", init_lr=0.02, resume_allow_config_change=True
    )  # the override; training longer (max_epoch) is never a change
    allowed.train()
    assert allowed.start_epoch == 1


def test_the_epoch_is_saved_before_its_evaluation_so_a_failing_evaluation_loses_no_training(toy, tmp_path):
    from blip2_internlm.checkpoint import load_checkpoint_file

    runner = make_runner(toy, tmp_path, max_epoch=2, valid_splits=["val"])

    def corrupt_validation_image(split_name, cur_epoch, skip_reload=False):
        raise OSError("image file is truncated")

    runner.eval_epoch = corrupt_validation_image
    with pytest.raises(OSError, match="truncated"):
        runner.train()
    saved = load_checkpoint_file(runner.output_dir / "checkpoint_last.pth")
    assert saved["progress"]["epoch"] == 0 and saved["progress"]["iters_done"] == runner.iters_per_epoch
    resumed = make_runner(toy, tmp_path, max_epoch=2, valid_splits=["val"], resume="auto")
    scripted_validation(resumed, [0.5])
    resumed.train()
    assert resumed.start_epoch == 1 and (resumed.output_dir / "checkpoint_best.pth").is_file()


def test_grad_scaler_skips_in_a_row_stop_a_diverged_fp16_run(toy, tmp_path):
    from blip2_internlm.runner import NonFiniteTrainingError

    runner = make_runner(toy, tmp_path, max_nonfinite_steps=3)
    model, optimizer = runner.unwrap_dist_model(runner.model), runner.optimizer
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def step(i, gradient):
        scaler.scale(torch.ones(()))  # as the runner scales each loss before its backward
        for param in model.parameters():
            param.grad = torch.full_like(param, gradient)
        return runner._optimizer_step(optimizer, scaler, True, [i], 0, i)

    step(0, float("inf")), step(1, float("inf"))
    assert runner.progress.scaler_skips == 2 and runner.progress.consecutive_nonfinite == 2
    step(2, 1.0)  # a good step ends the streak
    assert runner.progress.consecutive_nonfinite == 0
    step(3, float("inf")), step(4, float("inf"))
    with pytest.raises(NonFiniteTrainingError, match=r"GradScaler skipped 3 steps in a row"):
        step(5, float("inf"))


def test_a_collapsed_loss_scale_stops_the_run(toy, tmp_path):
    from blip2_internlm.runner import NonFiniteTrainingError

    runner = make_runner(toy, tmp_path, max_nonfinite_steps=100)
    model = runner.unwrap_dist_model(runner.model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-13)

    def overflow(i):
        scaler.scale(torch.ones(()))
        for param in model.parameters():
            param.grad = torch.full_like(param, float("nan"))
        runner._optimizer_step(runner.optimizer, scaler, True, [i], 0, i)

    overflow(0)  # the scale halves to 2**-14: at the floor, not below
    with pytest.raises(NonFiniteTrainingError, match=r"loss scale fell to 3.05176e-05, below run.min_loss_scale"):
        overflow(1)


def test_no_checkpoint_is_written_with_a_non_finite_weight(toy, tmp_path):
    from blip2_internlm.checkpoint import CheckpointError

    runner = make_runner(toy, tmp_path, max_epoch=1)
    with torch.no_grad():
        runner.unwrap_dist_model(runner.model).linear.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="linear.weight"):
        runner.save_checkpoint(0, epoch_done=True)
    assert not list(runner.output_dir.glob("*.pth"))


def test_gradient_clipping_bounds_the_gradient_the_optimizer_sees(toy, tmp_path):
    norms = {}
    for name, clip in (("clipped", 1e-3), ("free", None)):
        runner = make_runner(toy, tmp_path / name, max_epoch=1, grad_clip_norm=clip)
        optimizer, step = runner.optimizer, runner.optimizer.step
        seen = norms[name] = []

        def recording_step(*args, step=step, optimizer=optimizer, seen=seen, **kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            seen.append(torch.nn.utils.get_total_norm(grads).item())
            return step(*args, **kwargs)

        optimizer.step = recording_step
        runner.train()
    assert len(norms["clipped"]) == len(norms["free"]) == 4
    assert max(norms["clipped"]) <= 1e-3 * (1 + 1e-4) < min(norms["free"])


def interrupt_at(runner, step):
    """The run dies before training global step ``step`` (as a crash would)."""
    train_step = runner.task.train_step

    def dying_train_step(model, samples):
        if runner.progress.global_step == step:
            raise KeyboardInterrupt
        return train_step(model=model, samples=samples)

    runner.task.train_step = dying_train_step


RUNS = {
    # 32 pairs, batch 8: 4 batches a data epoch
    "epoch": dict(max_epoch=3, save_every_iters=1),  # killed at step 6: resumes at epoch 1, batch 2
    "iter": dict(runner="runner_iter", max_iters=15, iters_per_inner_epoch=5, save_every_iters=2),  # inner 1, batch 2
}


@pytest.mark.parametrize("mode", sorted(RUNS))
def test_a_run_killed_mid_epoch_resumes_to_bitwise_equal_weights_and_optimizer_state(toy, tmp_path, mode):
    straight = make_runner(toy, tmp_path / "straight", **RUNS[mode])
    straight.train()

    killed = make_runner(toy, tmp_path / "run", **RUNS[mode])
    interrupt_at(killed, 7 if mode == "iter" else 6)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = make_runner(toy, tmp_path / "run", job_id="again", resume="auto", **RUNS[mode])
    resumed.train()
    assert resumed.progress.global_step == straight.progress.global_step

    a = torch.load(straight.output_dir / "checkpoint_last.pth", weights_only=True)
    b = torch.load(resumed.output_dir / "checkpoint_last.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [
        (x["exp_avg"], y["exp_avg"]) for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
    ]
    assert moments and all(torch.equal(x, y) for x, y in moments)


def test_a_preemption_signal_finishes_the_step_saves_and_a_resume_is_bitwise_equal(toy, tmp_path):
    import os
    import signal

    from blip2_internlm.runner import PREEMPTED_EXIT_CODE

    straight = make_runner(toy, tmp_path / "straight", max_epoch=3)
    straight.train()
    preempted = make_runner(toy, tmp_path / "run", max_epoch=3)
    train_step = preempted.task.train_step

    def notice_during_step_6(model, samples):
        if preempted.progress.global_step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(model=model, samples=samples)

    preempted.task.train_step = notice_during_step_6
    with pytest.raises(SystemExit) as stopped:
        preempted.train()
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone with the run
    saved = torch.load(preempted.output_dir / "checkpoint_last.pth", weights_only=True)["progress"]
    assert (saved["global_step"], saved["epoch"], saved["iters_done"]) == (7, 1, 3)  # step 6 finished

    resumed = make_runner(toy, tmp_path / "run", job_id="again", resume="auto", max_epoch=3)
    resumed.train()
    a = torch.load(straight.output_dir / "checkpoint_last.pth", weights_only=True)
    b = torch.load(resumed.output_dir / "checkpoint_last.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_save_every_minutes_writes_inside_an_epoch_when_the_time_has_come(toy, tmp_path, monkeypatch):
    from blip2_internlm import runner as runner_module

    clock = iter(range(0, 10_000, 40))  # every reading 40 s later than the one before
    monkeypatch.setattr(runner_module.time, "monotonic", lambda: next(clock))
    runner = make_runner(toy, tmp_path, max_epoch=1, save_every_minutes=1)
    saves = []
    save = runner.save_checkpoint
    runner.save_checkpoint = lambda epoch, epoch_done, is_best=False: (
        saves.append((epoch, epoch_done, runner.progress.iters_done)),
        save(epoch, epoch_done, is_best),
    )
    runner.train()
    mid_epoch = [iters for _, done, iters in saves if not done]
    assert mid_epoch and all(0 < iters < runner.iters_per_epoch for iters in mid_epoch)


def test_the_runner_hands_its_device_and_epoch_pause_to_every_loader_it_builds(toy, tmp_path):
    """Train data LAVIS's way (a list of datasets drawn by ratio) and evaluation data: on a CPU run no
    CUDA prefetcher, and the epoch pause of run.epoch_transition_sleep."""
    from lavis.datasets.datasets.dataloader_utils import MultiIterLoader, PrefetchLoader

    from blip2_internlm.runner import PausingIterLoader

    runner = make_runner(toy, tmp_path, epoch_transition_sleep=0.25)
    _, Pairs, _ = toy
    mixed, evaluation = runner.create_loaders(
        [[Pairs(), Pairs()], Pairs()], 0, [4, 4], [True, False], [[None, None], None], dataset_ratios=[1, 1]
    )
    assert isinstance(mixed, MultiIterLoader)
    assert all(isinstance(inner, PausingIterLoader) and inner.epoch_sleep == 0.25 for inner in mixed.loaders)
    assert not any(isinstance(inner._dataloader, PrefetchLoader) for inner in mixed.loaders)
    assert not isinstance(evaluation, PrefetchLoader) and len(evaluation) == len(Pairs()) // 4 + bool(len(Pairs()) % 4)
