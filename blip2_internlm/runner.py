"""LAVIS's epoch runner, made safe for days-long runs (``runner_base`` resolves to ``ReliableRunner``).

What it adds to LAVIS 1.0.2's ``RunnerBase``, each switchable in ``run:`` (see docs/reliability.md):

- checkpoints through ``checkpoint.CheckpointManager`` (atomic, safe to load):
  ``checkpoint_last.pth`` always, ``checkpoint_best.pth`` when validating, ``checkpoint_<epoch>.pth``
  as LAVIS (pruned by ``keep_last_n``), and mid-epoch ``checkpoint_last.pth`` every
  ``save_every_iters`` steps;
- exact resume, mid-epoch included: a checkpoint holds the optimizer, scaler, epoch, batches
  done in the epoch, the best metric and epoch, the non-finite counters and every rank's RNG
  states; the train sampler starts at any batch (``resume_ckpt_path`` or ``resume: auto``);
- a non-finite guard: loss and gradient norm checked on every rank with one all-reduce per
  optimizer step; a bad step is skipped on all ranks alike, counted and logged with its
  sample ids; ``max_nonfinite_steps`` in a row stop the run; ``grad_clip_norm``;
- bad samples skipped, counted and reported (``bad_samples``, ``max_bad_sample_fraction``);
- a rank that loses its peers says so and names the last checkpoint, instead of a bare
  backend error;
- experiment tracking (``run.report_to``: TensorBoard, wandb; ``blip2_internlm.tracking``): loss and
  learning rate every iteration, throughput, counters and GPU memory every ``log_freq`` iterations,
  every evaluation metric, on the global step a resumed run continues (docs/tracking.md).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.logger import MetricLogger, SmoothedValue
from lavis.datasets.data_utils import prepare_sample
from lavis.datasets.datasets.dataloader_utils import IterLoader, MultiIterLoader, PrefetchLoader
from lavis.runners.runner_base import RunnerBase
from torch.utils.data import ChainDataset, DataLoader, DistributedSampler

from blip2_internlm.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointSettings,
    TrainingState,
    set_rng_state,
)
from blip2_internlm.compat.distributed import collective_device
from blip2_internlm.datasets import guard
from blip2_internlm.seeding import run_seed, seed_all
from blip2_internlm.settings import (
    Boolean,
    Device,
    Integer,
    Nullable,
    Number,
    Registered,
    Signals,
    Splits,
    Text,
    Unsupported,
    read_settings,
    registered_names,
    setting,
)
from blip2_internlm.tracking import Tracker, TrackingSettings, open_tracker, scalars

logger = logging.getLogger(__name__)
_CPU = torch.device("cpu")  # a default argument, built once

#: Fault-injection hooks for the specs, ``"STEP[@RANK],..."`` (global steps; on that rank, or all):
#: the loss of those steps becomes NaN; the process SIGKILLs itself before training that step.
#: (The kill during a save is ``checkpoint.INJECT_KILL_IN_SAVE_ENV``.)
INJECT_NONFINITE_ENV = "BLIP2_INTERNLM_INJECT_NONFINITE_LOSS"
INJECT_KILL_ENV = "BLIP2_INTERNLM_INJECT_KILL_AT_STEP"
#: The process sends itself SIGTERM before training that step, as a cluster's preemption notice would.
INJECT_SIGNAL_ENV = "BLIP2_INTERNLM_INJECT_SIGTERM_AT_STEP"


@dataclass(frozen=True)
class RunnerSettings:
    """The ``run:`` keys of the training and evaluation loop (this runner's, and those its base,
    LAVIS's ``RunnerBase``, reads)."""

    task: str | None = setting(
        None, Registered("task", registered_names("task", "lavis.tasks")), "the LAVIS task", required=True
    )
    runner: str = setting(
        "runner_base",
        Registered("runner", registered_names("runner", "lavis.runners")),
        "epoch-based runner_base or iteration-based runner_iter",
    )
    evaluate: bool = setting(False, Boolean(), "evaluate only, no training")
    device: str = setting("cuda", Device(), "where the model runs")
    amp: bool = setting(False, Boolean(), "mixed precision on CUDA (autocast, GradScaler)")
    # LAVIS's train.py adds the rank to it unconverted: an integer, not a string
    seed: int = setting(42, Integer(0), "random seed; each rank adds its rank, each epoch 1000 x its number")
    output_dir: str | None = setting(
        None, Text(), "directory of the job directories (relative to the working directory)", required=True
    )
    max_epoch: int | None = setting(None, Integer(1, cast=True), "training epochs (runner_base)")
    max_iters: int | None = setting(None, Integer(1, cast=True), "training iterations (runner_iter)")
    iters_per_inner_epoch: int | None = setting(
        None, Integer(1, cast=True), "iterations between validations and checkpoints (runner_iter)"
    )
    accum_grad_iters: int = setting(1, Integer(1, cast=True), "iterations whose gradients are summed per step")
    grad_clip_norm: float | None = setting(
        None, Nullable(Number(0, lowest_open=True)), "clip gradients to this total norm; null: off"
    )
    nonfinite_check: bool = setting(True, Boolean(), "watch for non-finite losses and gradients")
    max_nonfinite_steps: int = setting(
        10, Integer(1), "consecutive non-finite steps (GradScaler's overflow skips included) that stop the run"
    )
    # below fp16's smallest normal number, scaled gradients of ordinary size underflow: nothing is learnt
    min_loss_scale: float = setting(
        2.0**-14, Number(0, lowest_open=True), "a GradScaler loss scale below this stops the run (fp16 diverged)"
    )
    log_freq: int = setting(50, Integer(1), "iterations between training log lines")
    batch_size_train: int | None = setting(None, Integer(1), "training batch size per rank", required=True)
    batch_size_eval: int | None = setting(None, Integer(1), "evaluation batch size per rank", required=True)
    num_workers: int | None = setting(None, Integer(0), "data-loader worker processes per rank", required=True)
    train_splits: tuple = setting((), Splits(), "splits trained on")
    valid_splits: tuple = setting((), Splits(), "splits validated on after every epoch (the best checkpoint is kept)")
    test_splits: tuple = setting((), Splits(), "splits tested at the end")
    train_dataset_ratios: None = setting(
        None,
        Unsupported(
            "LAVIS 1.0.2 cannot sample by these weights: runner_base concatenates the training datasets and "
            "ignores them (or hands the mapping to MultiIterLoader as if it were a list), runner_iter stops on "
            "a NameError in RunnerIter.dataloaders; remove the key (the training datasets are then concatenated)"
        ),
        "sampling weights of the training datasets: not supported (the reason is the error)",
    )
    use_dist_eval_sampler: bool = setting(True, Boolean(), "split evaluation data across ranks")
    preemption_signals: tuple = setting(
        ("SIGTERM", "SIGUSR1"),
        Signals(),
        "signals on which every rank finishes its step, saves checkpoint_last.pth and exits with status 75",
    )
    epoch_transition_sleep: float = setting(
        2.0, Number(0), "seconds the loader pauses at an epoch boundary of streamed data (LAVIS: 2)"
    )


#: The exit status of a run that saved and stopped on a preemption signal (EX_TEMPFAIL: try again).
PREEMPTED_EXIT_CODE = 75


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class PeerLostError(RuntimeError):
    """A collective failed: another rank died or stopped answering."""


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint as ``progress``."""

    epoch: int = 0  # the epoch being trained (or just finished, with iters_done == iters_per_epoch)
    iters_done: int = 0  # batches of ``epoch`` already trained
    global_step: int = 0  # batches trained since the run began, over all epochs
    best_agg_metric: float = 0.0
    best_epoch: int = 0
    nonfinite_steps: int = 0  # skipped optimizer steps, whole run
    consecutive_nonfinite: int = 0
    scaler_skips: int = 0  # steps GradScaler skipped (fp16 overflow), whole run


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that can start an epoch at any position.

    Its shuffle depends only on ``seed`` and the epoch, never on the global RNG, so the
    order of epoch k is the same in a run resumed at k as in one that got there itself.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self):
        return self.num_samples - self.start


class EpochLoader:
    """The train loader of a map-style dataset: ``epoch(k, start_batch)`` yields epoch k's batches
    from ``start_batch`` on; ``len()`` is the number of batches in a whole epoch (``drop_last``)."""

    def __init__(self, dataset, batch_size: int, num_workers: int, collate_fn, seed: int, pin_memory: bool):
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = ResumableSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), seed=seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            drop_last=True,
            pin_memory=pin_memory,
        )
        self.batches_per_epoch = self.sampler.num_samples // batch_size

    def __len__(self):
        return self.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0):
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_batch * self.batch_size
        guard.set_epoch(self.dataset, epoch)  # per-sample seeding: augmentations independent of workers
        return iter(self.loader)


def delegate_to_wrapped_loader(self, name):
    """``__getattr__`` of loader wrappers: sampler, dataset, batch_size come from the wrapped loader."""
    if name == "loader":  # not set yet (unpickling, copying): no recursion
        raise AttributeError(name)
    return getattr(self.loader, name)


class _PassThroughLoader:
    """What LAVIS's PrefetchLoader offers the runner, minus the CUDA stream and the copy to CUDA."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    __getattr__ = delegate_to_wrapped_loader


class PausingIterLoader(IterLoader):
    """LAVIS's ``IterLoader`` (an endless iterator over epochs) with its pause at each epoch boundary
    (2 s in LAVIS, "prevent possible deadlock") set by ``run.epoch_transition_sleep``."""

    def __init__(self, dataloader, use_distributed: bool, epoch_sleep: float):
        super().__init__(dataloader, use_distributed=use_distributed)
        self.epoch_sleep = epoch_sleep

    def __next__(self):
        try:
            return next(self.iter_loader)
        except StopIteration:
            self._epoch += 1
            if hasattr(self._dataloader.sampler, "set_epoch") and self._use_distributed:
                self._dataloader.sampler.set_epoch(self._epoch)
            time.sleep(self.epoch_sleep)
            self.iter_loader = iter(self._dataloader)
            return next(self.iter_loader)


def lavis_loader(
    dataset,
    batch_size: int,
    is_train: bool,
    collate_fn,
    *,
    num_workers: int,
    device: torch.device,
    distributed: bool,
    dist_eval_sampler: bool,
    epoch_sleep: float,
):
    """The loader LAVIS's ``RunnerBase.create_loaders`` builds for one dataset, with the device and the
    epoch pause as arguments: a webdataset stream is iterated as it is; map-style data gets LAVIS's
    sampler, the CUDA prefetcher only on CUDA (on a CPU it would make a CUDA stream and copy there),
    and, for training, an endless iterator."""
    import webdataset as wds

    if isinstance(dataset, (ChainDataset, wds.DataPipeline)):  # has its own sampler and collate_fn
        return iter(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=True))
    sampler = None
    if distributed and (is_train or dist_eval_sampler):
        sampler = DistributedSampler(dataset, shuffle=is_train, num_replicas=get_world_size(), rank=get_rank())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=True,
        sampler=sampler,
        shuffle=sampler is None and is_train,
        collate_fn=collate_fn,
        drop_last=is_train,
    )
    loader = PrefetchLoader(loader) if device.type == "cuda" else _PassThroughLoader(loader)
    return PausingIterLoader(loader, distributed, epoch_sleep) if is_train else loader


def start_loader_epoch(loader, epoch: int) -> None:
    """Put a train loader built by ``lavis_loader`` (or several, in a ``MultiIterLoader``) at the start
    of ``epoch``: sampler epoch, per-sample seeds, a fresh iterator."""
    for inner in getattr(loader, "loaders", [loader]):
        if isinstance(inner, IterLoader):
            inner._epoch = epoch
            if inner._use_distributed and hasattr(inner._dataloader.sampler, "set_epoch"):
                inner._dataloader.sampler.set_epoch(epoch)
            guard.set_epoch(inner._dataloader.dataset, epoch)
            inner.iter_loader = iter(inner._dataloader)


def injected_steps(variable: str) -> set[int]:
    """Global steps a fault-injection hook names for this rank."""
    steps = set()
    for item in filter(None, os.environ.get(variable, "").replace(" ", "").split(",")):
        step, _, rank = item.partition("@")
        if not rank or int(rank) == get_rank():
            steps.add(int(step))
    return steps


def sample_ids(samples: dict) -> list:
    """The ids a batch carries, for logs that let a user find the records."""
    for key in ("question_id", "image_id", "instance_id"):
        ids = samples.get(key)
        if ids is not None:
            return ids.tolist() if torch.is_tensor(ids) else list(ids)
    return []


def all_reduce_max(values: list[float], device) -> list[float]:
    """One all-reduce (MAX) of a few flags; the identity in a single process."""
    if not is_dist_avail_and_initialized():
        return values
    flags = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


@dataclass
class StepOutcome:
    nonfinite: str | None = None  # "loss" or "gradient norm" when the step was skipped on every rank
    scaler_skipped: bool = False  # GradScaler found an overflow and skipped the step itself


def guarded_optimizer_step(
    optimizer,
    scaler,
    loss_finite: bool,
    *,
    grad_clip_norm: float | None = None,
    nonfinite_check: bool = True,
    collective_device=_CPU,
) -> StepOutcome:
    """The optimizer step of one accumulated batch, skipped on every rank alike when any rank saw a
    non-finite loss or the gradient norm is not finite; gradients are zeroed either way.

    One all-reduce of two flags per step.  With a GradScaler, non-finite gradients are its own
    business (fp16 overflow: it skips and lowers the scale), reported as ``scaler_skipped``.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = None
    if grad_clip_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    elif nonfinite_check and scaler is None and params:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if nonfinite_check:
        grad_bad = scaler is None and grad_norm is not None and not bool(torch.isfinite(grad_norm))
        loss_bad, grad_bad = all_reduce_max([float(not loss_finite), float(grad_bad)], collective_device)
        if loss_bad or grad_bad:
            optimizer.zero_grad()
            return StepOutcome(nonfinite="loss" if loss_bad else "gradient norm")
    outcome = StepOutcome()
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        outcome.scaler_skipped = scaler.get_scale() < scale
    else:
        optimizer.step()
    optimizer.zero_grad()
    return outcome


class ReliableRunner(RunnerBase):
    def __init__(self, cfg, task, model, datasets, job_id):
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)
        # validated when LAVIS's Config was built (compat fix run_config_validated_at_start)
        self.loop = read_settings(RunnerSettings, cfg.run_cfg)
        self.checkpoint_settings = read_settings(CheckpointSettings, cfg.run_cfg)
        data = read_settings(guard.DataGuardSettings, cfg.run_cfg)
        self.datasets = guard.guard_datasets(
            self.datasets, policy=data.bad_samples, train_splits=self.loop.train_splits, seed=self.loop.seed
        )
        self.progress = Progress()
        self._resume_rng: list | None = None  # every rank's RNG states, for a mid-epoch resume
        self.bad_samples = guard.BadSampleTally(max_fraction=data.max_bad_sample_fraction)
        self._checkpoints: CheckpointManager | None = None
        self._preempted_by: str | None = None  # the signal's name, once one arrived
        self._previous_handlers: dict = {}
        self._last_save_time = time.monotonic()
        self.tracking = read_settings(TrackingSettings, cfg.run_cfg)
        self._tracker: Tracker | None = None
        self._training = False  # inside train(), which closes the tracker; a bare evaluate() closes its own
        self._throughput_window = (time.perf_counter(), 0)  # (clock, global step) of the last log point

    # --- settings ------------------------------------------------------------------------

    @property
    def collective_device(self):
        return collective_device() if is_dist_avail_and_initialized() else torch.device("cpu")

    @property
    def checkpoints(self) -> CheckpointManager:
        """This job's checkpoints (its output directory exists once LAVIS's constructor has run)."""
        if self._checkpoints is None:
            self._checkpoints = CheckpointManager(
                Path(self.output_dir),
                keep_last_n=self.checkpoint_settings.keep_last_n,
                allow_unsafe=self.checkpoint_settings.allow_unsafe_checkpoints,
                epoch_file=self.checkpoint_name,
            )
        return self._checkpoints

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints.last

    def training_state(self) -> TrainingState:
        return TrainingState(self.unwrap_dist_model(self.model), self.optimizer, self.scaler)

    @property
    def tracker(self) -> Tracker:
        """The trackers of ``run.report_to`` on rank 0 (a no-op elsewhere), opened on first use: by
        ``train`` right after a resume, so a resumed run's steps go on from its checkpoint's; by
        ``evaluate`` when it runs alone."""
        if self._tracker is None:
            self._tracker = open_tracker(
                self.tracking,
                job_dir=Path(self.output_dir),
                job_id=Path(self.output_dir).name,
                config=self.config.to_dict(),
                start_step=self.progress.global_step,
                main_process=is_main_process(),
            )
        return self._tracker

    def close_tracker(self) -> None:
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    # --- loaders -------------------------------------------------------------------------

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        """Map-style train data gets an ``EpochLoader`` (resumable at any batch); everything else
        (evaluation, webdataset streams, map-style data mixed with streams) the loaders LAVIS builds,
        from ``lavis_loader``."""
        settings = dict(
            num_workers=int(num_workers),
            device=self.device,
            distributed=self.use_distributed,
            dist_eval_sampler=bool(self.use_dist_eval_sampler),
            epoch_sleep=self.loop.epoch_transition_sleep,
        )
        seed = self.loop.seed
        loaders = []
        for dataset, batch_size, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)):  # several datasets of one split, drawn by ratio
                parts = [
                    lavis_loader(d, batch_size, is_train, collate_fn[i], **settings) for i, d in enumerate(dataset)
                ]
                loaders.append(MultiIterLoader(loaders=parts, ratios=dataset_ratios))
            elif is_train and guard.is_map_style(dataset):
                loaders.append(
                    EpochLoader(
                        dataset, int(batch_size), int(num_workers), collate_fn, seed, self.device.type == "cuda"
                    )
                )
            else:
                loaders.append(lavis_loader(dataset, batch_size, is_train, collate_fn, **settings))
        return loaders

    # --- the run -------------------------------------------------------------------------

    def train(self):
        start_time = time.time()
        self.log_config()
        if not self.evaluate_only:
            self._resume()
        self._training = True
        try:
            self.tracker.flush()  # opens it: a tracker that cannot be used stops the run before its first step
            self._train_and_test(start_time)
        finally:
            self._training = False
            self.close_tracker()

    def _train_and_test(self, start_time: float) -> None:
        if not self.evaluate_only:
            self._install_preemption_handlers()
        self._last_save_time = time.monotonic()
        cur_epoch = self.start_epoch
        try:
            for cur_epoch in range(self.start_epoch, self.max_epoch):
                if not self.evaluate_only:
                    logger.info("Start training epoch %d", cur_epoch)
                    train_stats = self.train_epoch(cur_epoch)
                    self.log_stats(split_name="train", stats=train_stats)
                self._validate_and_save(cur_epoch)
                if self.evaluate_only:
                    break
                self._barrier()
        except PeerLostError:
            raise
        except RuntimeError as err:
            if is_dist_avail_and_initialized() and _is_collective_failure(err):
                raise PeerLostError(self._peer_lost_message(err)) from err
            raise
        finally:
            self._restore_signal_handlers()

        test_epoch = "best" if len(self.valid_splits) > 0 else cur_epoch
        self.evaluate(cur_epoch=test_epoch, skip_reload=self.evaluate_only)
        logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))

    def evaluate(self, cur_epoch="best", skip_reload=False):
        """LAVIS's test phase, its metrics also sent to the trackers as ``<split>/<metric>``."""
        try:
            test_logs = super().evaluate(cur_epoch=cur_epoch, skip_reload=skip_reload)
            for split_name, metrics in (test_logs or {}).items():
                if isinstance(metrics, dict):
                    self.tracker.log_scalars(self.progress.global_step, scalars(split_name, metrics))
            self.tracker.flush()
        finally:
            if not self._training:  # evaluate.py calls this alone
                self.close_tracker()
        return test_logs

    # --- preemption and time-based saves --------------------------------------------------

    def _install_preemption_handlers(self) -> None:
        """``run.preemption_signals`` (a cluster's notice before a kill, torchrun's to the survivors)
        only set a flag: the current step finishes, then every rank saves and exits together."""

        def note(signum, frame):
            self._preempted_by = signal.Signals(signum).name

        if threading.current_thread() is not threading.main_thread():
            logger.warning("Not in the main thread: %s cannot be handled", ", ".join(self.loop.preemption_signals))
            return
        for name in self.loop.preemption_signals:
            self._previous_handlers[name] = signal.signal(getattr(signal, name), note)

    def _restore_signal_handlers(self) -> None:
        for name, handler in self._previous_handlers.items():
            signal.signal(getattr(signal, name), handler)
        self._previous_handlers = {}

    def _preempted_or_save_due(self) -> tuple[bool, bool]:
        """After each optimizer step: has any rank been signalled, and has rank 0's clock reached
        ``run.save_every_minutes``?  One small all-reduce decides both for every rank."""
        minutes = self.checkpoint_settings.save_every_minutes
        due = bool(minutes) and is_main_process() and time.monotonic() - self._last_save_time >= 60 * minutes
        flags = [float(self._preempted_by is not None), float(due)]
        preempted, due = all_reduce_max(flags, self.collective_device)
        return bool(preempted), bool(due)

    def _save_and_exit_on_preemption(self, epoch: int) -> None:
        self.save_checkpoint(epoch, epoch_done=False)
        # no rank leaves before rank 0 has written: a launcher stops the others when one exits
        self._barrier()
        logger.warning(
            "Preempted (%s on %s): saved epoch %d, %d batches into it, to %s; exiting with status %d. "
            "Relaunch with --options run.resume=auto to continue exactly from there.",
            self._preempted_by or "a signal",
            "this rank" if self._preempted_by else "another rank",
            epoch,
            self.progress.iters_done,
            self.last_checkpoint,
            PREEMPTED_EXIT_CODE,
        )
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def _validate_and_save(self, cur_epoch: int) -> None:
        """Save the epoch, then validate it: an evaluation that fails (a corrupt image, out of memory,
        a timeout) loses no training.  A new best metric is saved with the checkpoint it names."""
        if not self.evaluate_only:
            self.save_checkpoint(cur_epoch, epoch_done=True)
        if not self.valid_splits:
            return
        is_best = False
        try:
            for split_name in self.valid_splits:
                logger.info("Evaluating on %s.", split_name)
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                if val_log is not None and is_main_process():
                    if "agg_metrics" not in val_log:
                        raise KeyError(f"the {split_name} evaluation reported no agg_metrics")
                    agg_metrics = float(val_log["agg_metrics"])
                    if agg_metrics > self.progress.best_agg_metric and split_name == "val":
                        self.progress.best_epoch, self.progress.best_agg_metric = cur_epoch, agg_metrics
                        is_best = True
                    val_log.update({"best_epoch": self.progress.best_epoch})
                    self.log_stats(val_log, split_name)
                    self.tracker.log_scalars(self.progress.global_step, scalars(split_name, val_log))
                    self.tracker.flush()
        except Exception as err:
            if not self.evaluate_only:
                logger.error(
                    "The evaluation of epoch %d failed (%s: %s); the epoch's training is saved in %s. "
                    "Fix the cause and relaunch with --options run.resume=auto to go on from the next epoch.",
                    cur_epoch,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                    self.last_checkpoint,
                )
            raise
        if not self.evaluate_only and self._broadcast_from_main(is_best):
            self.save_checkpoint(cur_epoch, epoch_done=True, is_best=True)

    def train_epoch(self, epoch):
        """One epoch from ``self.progress.iters_done`` (non-zero after a mid-epoch resume)."""
        self.model.train()
        loader = self.train_loader  # built lazily, drawing random numbers: before seeding
        seed_all(run_seed(self.loop.seed, get_rank(), epoch=int(epoch)))
        start = self.progress.iters_done if self.progress.epoch == epoch else 0
        batches = self._epoch_batches(loader, epoch, start)
        if self._resume_rng is not None:  # after the loader drew its worker seeds, as the interrupted run did
            set_rng_state(self._resume_rng[get_rank()])
            self._resume_rng = None
        self.progress.epoch, self.progress.iters_done = epoch, start
        self.bad_samples.reset()
        return self._train_iters(epoch, batches, start, self.iters_per_epoch)

    @property
    def iters_per_epoch(self) -> int:
        return len(self.train_loader)

    def _epoch_batches(self, loader, epoch: int, start: int):
        if isinstance(loader, EpochLoader):
            return loader.epoch(epoch, start)
        start_loader_epoch(loader, epoch)
        if start:
            logger.warning(
                "Resuming mid-epoch on streamed data: skipping %d batches by drawing them; "
                "the order of the rest is not that of the interrupted run.",
                start,
            )
            for _ in range(start):
                next(loader)
        return loader

    def _train_iters(self, epoch: int, batches, start: int, iters_per_epoch: int) -> dict:
        model, optimizer, scaler = self.model, self.optimizer, self.scaler
        accum = self.accum_grad_iters
        inject_nan, inject_kill = injected_steps(INJECT_NONFINITE_ENV), injected_steps(INJECT_KILL_ENV)
        inject_signal = injected_steps(INJECT_SIGNAL_ENV)
        metric_logger = MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        metric_logger.add_meter("loss", SmoothedValue(window_size=1, fmt="{value:.4f}"))
        header = f"Train: data epoch: [{epoch}]"
        batch_size = self.loop.batch_size_train
        loss_finite = True
        step_ids: list = []
        step_losses: list = []
        step_lrs: list = []  # (global step, learning rate) of each iteration of the optimizer step
        self._throughput_window = (time.perf_counter(), self.progress.global_step)
        iterator = iter(batches)
        for i in metric_logger.log_every(range(start, iters_per_epoch), self.log_freq, header):
            if self.progress.global_step in inject_kill:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.progress.global_step in inject_signal:
                os.kill(os.getpid(), signal.SIGTERM)
            samples = next(iterator)
            self.bad_samples.add(batch_size, samples.pop("bad_samples", []) if isinstance(samples, dict) else [])
            samples = prepare_sample(samples, cuda_enabled=self.cuda_enabled)
            samples.update({"epoch": epoch, "num_iters_per_epoch": iters_per_epoch, "iters": i})
            self.lr_scheduler.step(cur_epoch=epoch, cur_step=i)
            with torch.autocast(self.device.type, enabled=scaler is not None):
                loss = self.task.train_step(model=model, samples=samples)
            if self.progress.global_step in inject_nan:
                loss = loss * float("nan")
            loss_value = loss.detach()
            loss_finite = loss_finite and bool(torch.isfinite(loss_value))
            step_losses.append(loss_value)
            step_ids += sample_ids(samples)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            self.progress.global_step += 1
            step_lrs.append((self.progress.global_step, optimizer.param_groups[0]["lr"]))

            if (i + 1) % accum == 0:
                kept = self._optimizer_step(optimizer, scaler, loss_finite, step_ids, epoch, i)
                # a skipped step's losses would make the epoch mean NaN
                losses = [value.item() for value in step_losses] if kept else []
                for value in losses:
                    metric_logger.update(loss=value)
                self._track_iterations(step_lrs, losses)
                loss_finite, step_ids, step_losses, step_lrs = True, [], [], []
                self.progress.iters_done = i + 1
                every = self.checkpoint_settings.save_every_iters
                preempted, time_due = self._preempted_or_save_due()
                if preempted:
                    self._save_and_exit_on_preemption(epoch)
                if (every and (i + 1) % every == 0 or time_due) and i + 1 < iters_per_epoch:
                    self.save_checkpoint(epoch, epoch_done=False)
                if (i + 1) % self.log_freq == 0:
                    totals = self._check_bad_samples()
                    if i + 1 < iters_per_epoch:  # the epoch's end logs its own
                        self._track_progress(epoch, i + 1, iters_per_epoch, totals.bad)
            metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        self.progress.iters_done = iters_per_epoch
        totals = self._check_bad_samples(final=True)

        metric_logger.synchronize_between_processes()
        loss_meter = metric_logger.meters["loss"]
        epoch_loss = {"train/epoch_loss": loss_meter.global_avg} if loss_meter.count else {}
        self._track_progress(epoch, iters_per_epoch, iters_per_epoch, totals.bad, epoch_loss)
        logger.info("Averaged stats: %s", metric_logger.global_avg())
        stats = {k: f"{meter.global_avg:.3f}" for k, meter in metric_logger.meters.items()}
        stats.update(
            nonfinite_steps=self.progress.nonfinite_steps,
            scaler_skips=self.progress.scaler_skips,
            bad_samples=self.bad_samples.bad,
        )
        return stats

    def _optimizer_step(self, optimizer, scaler, loss_finite: bool, step_ids: list, epoch: int, i: int) -> bool:
        """Step unless any rank saw a non-finite loss or gradient; True if the step's losses were finite."""
        outcome = guarded_optimizer_step(
            optimizer,
            scaler,
            loss_finite,
            grad_clip_norm=self.loop.grad_clip_norm,
            nonfinite_check=self.loop.nonfinite_check,
            collective_device=self.collective_device,
        )
        if outcome.nonfinite:
            self._count_nonfinite(epoch, i, step_ids, outcome.nonfinite)
            return False
        if not outcome.scaler_skipped:
            self.progress.consecutive_nonfinite = 0
            return True
        # GradScaler found inf/NaN gradients (fp16 overflow) and skipped the step itself: a run whose
        # every step overflows has diverged, so these skips count towards the same limit
        self.progress.scaler_skips += 1
        self.progress.consecutive_nonfinite += 1
        scale = scaler.get_scale()
        logger.warning(
            "GradScaler skipped the step at epoch %d iteration %d (fp16 overflow, scale lowered to %g); "
            "%d such steps so far, %d in a row",
            epoch,
            i,
            scale,
            self.progress.scaler_skips,
            self.progress.consecutive_nonfinite,
        )
        limit, floor = self.loop.max_nonfinite_steps, self.loop.min_loss_scale
        if self.progress.consecutive_nonfinite >= limit or scale < floor:
            why = (
                f"GradScaler skipped {self.progress.consecutive_nonfinite} steps in a row "
                f"(run.max_nonfinite_steps = {limit})"
                if self.progress.consecutive_nonfinite >= limit
                else f"the loss scale fell to {scale:g}, below run.min_loss_scale = {floor:g}"
            )
            raise NonFiniteTrainingError(
                f"{why}: the fp16 run has diverged; stopping at epoch {epoch} iteration {i}. "
                f"Last good checkpoint: {self.last_checkpoint or 'none written in this run'}. Lower run.init_lr, "
                "set run.grad_clip_norm, or train in bf16."
            )
        return True  # the loss was finite: it counts in the epoch's mean

    def _count_nonfinite(self, epoch: int, i: int, step_ids: list, what: str) -> None:
        self.progress.nonfinite_steps += 1
        self.progress.consecutive_nonfinite += 1
        logger.warning(
            "Non-finite %s at epoch %d iteration %d (rank %d): step skipped on every rank "
            "(%d in a row, %d in the run). Sample ids on this rank: %s",
            what,
            epoch,
            i,
            get_rank(),
            self.progress.consecutive_nonfinite,
            self.progress.nonfinite_steps,
            step_ids,
        )
        if self.progress.consecutive_nonfinite >= self.loop.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{self.progress.consecutive_nonfinite} optimizer steps in a row had a non-finite {what} "
                f"(run.max_nonfinite_steps = {self.loop.max_nonfinite_steps}); "
                f"stopping at epoch {epoch} iteration {i}. "
                f"Last good checkpoint: {self.last_checkpoint or 'none written in this run'}. Lower run.init_lr, "
                "set run.grad_clip_norm, or check the data of the logged sample ids."
            )

    def _check_bad_samples(self, final: bool = False) -> guard.BadSampleTally:
        """All ranks decide together, on the global counts, whether the data is broken at scale;
        returns the epoch's tally of all ranks."""
        totals = self.bad_samples.all_reduce()
        if final and is_main_process() and totals.bad:
            logger.warning("Bad samples this epoch: %s", totals.summary())
        totals.check(epoch_end=final)
        return totals

    # --- tracking ------------------------------------------------------------------------

    def _track_iterations(self, step_lrs: list, losses: list[float]) -> None:
        """Each iteration of an optimizer step: its learning rate, and its loss (this rank's, as the
        log lines print it) unless the step was skipped as non-finite."""
        for index, (step, lr) in enumerate(step_lrs):
            values = {"train/lr": lr}
            if losses:
                values["train/loss"] = losses[index]
            self.tracker.log_scalars(step, values)

    def _track_progress(self, epoch: int, iters_done: int, iters_per_epoch: int, bad_samples: int, extra=None):
        """Every ``log_freq`` iterations and at each epoch's end: where the run stands, its speed since
        the last such point, its counters (the bad samples of the epoch so far, all ranks) and, on
        CUDA, this rank's peak memory; then a flush, so a crash loses little."""
        step, now = self.progress.global_step, time.perf_counter()
        started, first_step = self._throughput_window
        values = {
            "train/epoch": epoch + iters_done / iters_per_epoch,
            "train/nonfinite_steps": self.progress.nonfinite_steps,
            "train/scaler_skips": self.progress.scaler_skips,
            "train/bad_samples": bad_samples,
        }
        if step > first_step and now > started:
            samples = (step - first_step) * self.loop.batch_size_train * get_world_size()
            values["train/samples_per_s"] = samples / (now - started)
        if self.device.type == "cuda":
            values["gpu/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            values["gpu/max_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        self.tracker.log_scalars(step, {**values, **(extra or {})})
        self.tracker.flush()
        self._throughput_window = (now, step)

    # --- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, epoch: int, epoch_done: bool, is_best: bool = False) -> None:
        """Every rank calls this (the RNG states of all ranks are gathered); rank 0 writes."""
        self._last_save_time = time.monotonic()
        if self._tracker is not None:  # what was logged up to the checkpoint survives a kill after it
            self._tracker.flush()
        self.checkpoints.save(
            self.training_state(),
            epoch=epoch,
            epoch_done=epoch_done,
            progress=asdict(self.progress),
            # the config, and what the model config's auto keys resolved to, and on which machine
            extra=dict(
                config=self.config.to_dict(),
                resolved_defaults=_resolved_defaults(self.unwrap_dist_model(self.model)),
            ),
            is_best=is_best,
            per_epoch_file=epoch_done and not self.valid_splits,
        )

    def checkpoint_name(self, epoch: int) -> str:
        return f"checkpoint_{epoch}.pth"

    def _resume(self) -> None:
        explicit = self.checkpoint_settings.resume_ckpt_path
        mode = self.checkpoint_settings.resume
        if explicit is not None:
            self._load_checkpoint(explicit)
        elif mode in ("auto", "required"):
            found = self.checkpoints.find_latest(map_location=self.device)
            root = Path(self.output_dir).parent
            if found is None and mode == "required":
                raise CheckpointError(f"run.resume = required: no loadable checkpoint under {root}")
            if found is None:
                logger.warning("run.resume = auto: no loadable checkpoint under %s, starting from scratch", root)
            else:
                logger.info("run.resume = %s: resuming from %s", mode, found[0])
                self._load_checkpoint(str(found[0]), checkpoint=found[1])

    def _load_checkpoint(self, url_or_filename, checkpoint: dict | None = None):
        """Resume from a checkpoint: ``run.resume_ckpt_path`` or the newest found by ``resume: auto``."""
        if checkpoint is None:
            path, checkpoint = self.checkpoints.read(url_or_filename, map_location=self.device)
        else:
            path = str(url_or_filename)
        changed = config_changes(checkpoint.get("config"), self.config.to_dict())
        if changed and not self.checkpoint_settings.resume_allow_config_change:
            raise CheckpointError(
                f"{path} was written by a run configured differently in what changes the model, the optimizer or "
                f"the data: {'; '.join(changed)}. Resume it with its own config, or set "
                "run.resume_allow_config_change: true to go on with this one."
            )
        if changed:
            logger.warning("Resuming %s under a changed config (allowed): %s", path, "; ".join(changed))
        self.checkpoints.restore(self.training_state(), path, checkpoint)
        progress = checkpoint.get("progress")
        if progress is None:  # a LAVIS checkpoint: epoch boundaries only, no counters
            self.progress = Progress(epoch=checkpoint["epoch"] + 1)
        else:
            self.progress = Progress(**progress)
            if self.progress.iters_done >= self.iters_per_epoch:
                self.progress.epoch, self.progress.iters_done = self.progress.epoch + 1, 0
            elif checkpoint.get("world_size") == get_world_size():
                self._resume_rng = checkpoint["rng"]
            else:
                logger.warning(
                    "%s was written by %s ranks, this run has %d: RNG states are not restored",
                    path,
                    checkpoint.get("world_size"),
                    get_world_size(),
                )
        self.start_epoch = self.progress.epoch
        if is_main_process():
            self.checkpoints.adopt(Path(path), checkpoint)
        logger.info(
            "Resumed from %s: epoch %d, %d batches into it, best %s at epoch %d",
            path,
            self.progress.epoch,
            self.progress.iters_done,
            self.progress.best_agg_metric,
            self.progress.best_epoch,
        )

    def _reload_best_model(self, model):
        """The test phase's model: the best checkpoint's trainable weights, loaded safely."""
        return self.checkpoints.reload_best(model)

    # --- distributed ---------------------------------------------------------------------

    def _barrier(self) -> None:
        if is_dist_avail_and_initialized():
            dist.barrier()

    def _broadcast_from_main(self, value):
        if not is_dist_avail_and_initialized():
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _peer_lost_message(self, err: Exception) -> str:
        return (
            f"rank {get_rank()} lost contact with another rank ({str(err).splitlines()[0]}); the job cannot "
            f"continue. Last checkpoint: {self.last_checkpoint or 'none written in this run'}. "
            "Relaunch with --options run.resume=auto to continue from it."
        )


def _is_collective_failure(err: Exception) -> bool:
    text = str(err).lower()
    return isinstance(err, dist.DistBackendError) or any(
        word in text for word in ("connection closed", "connection reset", "gloo", "nccl", "timed out", "broken pipe")
    )


class ReliableRunnerIter(ReliableRunner):
    """LAVIS's ``runner_iter`` (training counted in iterations, evaluated and saved every
    ``iters_per_inner_epoch``) with the same checkpoints, resume and guards: an inner epoch is
    what an epoch is to ``ReliableRunner``, and the data runs on across inner epochs."""

    def __init__(self, cfg, task, model, datasets, job_id):
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)
        self.max_iters, self.iters_per_inner_epoch = self.loop.max_iters, self.loop.iters_per_inner_epoch
        if not (self.max_iters and self.iters_per_inner_epoch):
            raise ValueError("runner_iter needs run.max_iters > 0 and run.iters_per_inner_epoch > 0")
        self._stream = None

    @property
    def max_epoch(self):
        return self.max_iters // self.iters_per_inner_epoch

    @property
    def iters_per_epoch(self) -> int:
        return self.iters_per_inner_epoch

    def _epoch_batches(self, loader, epoch: int, start: int):
        if self._stream is None:  # first inner epoch of this process: the data continues where it stood
            position = epoch * self.iters_per_inner_epoch + start
            self._stream = self._data_stream(loader, position) if isinstance(loader, EpochLoader) else loader
            if position and not isinstance(loader, EpochLoader):
                logger.warning(
                    "Resuming streamed data at iteration %d: the stream restarts, not where it stood", position
                )
        return self._stream

    @staticmethod
    def _data_stream(loader: EpochLoader, position: int):
        """Batches of data epoch after data epoch from overall batch ``position`` on.

        The first epoch's iterator is made here, not on the first ``next``: making one draws
        from the global RNG, which a mid-epoch resume restores right after this call.
        """
        data_epoch, start = divmod(position, len(loader))
        first = loader.epoch(data_epoch, start)

        def stream(batches, data_epoch):
            while True:
                yield from batches
                data_epoch += 1
                batches = loader.epoch(data_epoch)

        return stream(first, data_epoch)

    def checkpoint_name(self, epoch: int) -> str:
        return f"checkpoint_{(epoch + 1) * self.iters_per_inner_epoch}.pth"  # by iterations, as LAVIS names them


#: Keys whose change does not change what a resumed run trains: where files are, how long to train,
#: how often to log or save, and how to resume.
_RESUME_INDIFFERENT = {
    "model": {"llm_model", "vit_weights", "qformer_text_model", "pretrained", "finetuned", "load_pretrained"},
    "run": {
        "max_epoch",
        "max_iters",
        "output_dir",
        "log_freq",
        "num_workers",
        "batch_size_eval",
        "valid_splits",
        "test_splits",
        "evaluate",
        "device",
        "distributed",
        "dist_url",
        "dist_backend",
        "dist_timeout_minutes",
        "world_size",
        "rank",
        "gpu",
        "epoch_transition_sleep",
        "resume",
        "resume_ckpt_path",
        "resume_allow_config_change",
        "save_every_iters",
        "save_every_minutes",
        "keep_last_n",
        "allow_unsafe_checkpoints",
        "feature_cache",
        "report_to",
        "wandb_project",
    },
}


def config_changes(saved: dict | None, current: dict) -> list[str]:
    """``model.key: saved -> now`` for every key of the model, the datasets and the run that differs
    between a checkpoint's config and this run's and changes what training does; a checkpoint without
    a config (LAVIS's, or a bare state dict) has nothing to compare."""
    if not saved:
        return []

    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): tree}

    changes = []
    for section in ("model", "datasets", "run"):
        before, after = flat(saved.get(section) or {}), flat(current.get(section) or {})
        ignored = _RESUME_INDIFFERENT.get(section, set())
        for key in sorted(set(before) | set(after)):
            top = key.split(".")[0]
            if top in ignored or (section == "datasets" and ".build_info." in f".{key}."):
                continue
            if before.get(key) != after.get(key):
                changes.append(f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


def _resolved_defaults(model) -> dict | None:
    """The model's ``resolved_defaults()`` (``blip2_internlm``), None for a model without them (stage 1)."""
    resolve = getattr(model, "resolved_defaults", None)
    return resolve() if callable(resolve) else None
