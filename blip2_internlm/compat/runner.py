"""LAVIS's runner: CPU runs (DDP, GradScaler, prefetching, evaluation), loader epochs, resumable epochs."""

import contextvars
import itertools
from pathlib import Path

import torch

from blip2_internlm.compat.fixes import fix


@fix
def ddp_device_ids_only_on_cuda():
    """RunnerBase wraps DDP with device_ids=[gpu], which DDP rejects for CPU modules."""
    from lavis.runners.runner_base import RunnerBase
    from torch.nn.parallel import DistributedDataParallel

    def model(self):
        if self._model.device != self.device:
            self._model = self._model.to(self.device)
            self._wrapped_model = None
        if self._wrapped_model is None:
            if self.use_distributed:
                device_ids = [self.config.run_cfg.gpu] if self.device.type == "cuda" else None
                find_unused = bool(self.config.run_cfg.get("find_unused_parameters", False))
                self._wrapped_model = DistributedDataParallel(
                    self._model, device_ids=device_ids, find_unused_parameters=find_unused
                )
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    RunnerBase.model = property(model)


@fix
def grad_scaler_only_on_cuda():
    """RunnerBase builds torch.cuda.amp.GradScaler whenever run.amp is set; on CPU it only warns and disables itself."""
    from lavis.runners.runner_base import RunnerBase

    def scaler(self):
        if self.config.run_cfg.get("amp", False) and self.device.type == "cuda" and self._scaler is None:
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    RunnerBase.scaler = property(scaler)


def claim_job_dir(output_root, job_id: str) -> str:
    """Create the first free one of ``job_id``, ``job_id_2``, ``job_id_3``, ... under ``output_root``
    and return its name; mkdir is atomic, so two launches racing for one name never share it."""
    output_root = Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    for name in itertools.chain([job_id], (f"{job_id}_{n}" for n in itertools.count(2))):
        try:
            (output_root / name).mkdir()
            return name
        except FileExistsError:
            continue


@fix
def fresh_job_dir_relative_to_cwd():
    """RunnerBase puts output_dir in site-packages and reuses job dirs: launches with one id overwrite each other."""
    from lavis.common.dist_utils import is_dist_avail_and_initialized, is_main_process
    from lavis.common.registry import registry
    from lavis.runners.runner_base import RunnerBase

    def setup_output_dir(self):
        output_root = Path(self.config.run_cfg.output_dir).expanduser().absolute()
        job_id = [claim_job_dir(output_root, str(self.job_id)) if is_main_process() else None]
        if is_dist_avail_and_initialized():
            torch.distributed.broadcast_object_list(job_id, src=0)
        self.job_id = job_id[0]
        output_dir = output_root / self.job_id
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)  # other ranks may be on another node's disk
        # set, not register: register_path refuses a second runner in the same process
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        self.result_dir, self.output_dir = result_dir, output_dir

    RunnerBase.setup_output_dir = setup_output_dir


def _delegate_to_loader(self, name):
    """``__getattr__`` of loader wrappers: sampler, dataset, batch_size come from the wrapped loader."""
    if name == "loader":  # not set yet (unpickling, copying): no recursion
        raise AttributeError(name)
    return getattr(self.loader, name)


class _PassThroughLoader:
    """What PrefetchLoader offers the runner, minus the CUDA stream and the copy to CUDA."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    __getattr__ = _delegate_to_loader


#: Set by RunnerBase.create_loaders (patched below) for the loaders it builds.
_LOADER_SETTINGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loader_settings", default=None)


def _loader_setting(name: str, default=None):
    return (_LOADER_SETTINGS.get() or {}).get(name, default)


@fix
def prefetch_loader_only_on_cuda():
    """RunnerBase wraps every loader in PrefetchLoader, which creates a CUDA stream and copies batches to CUDA even for run.device: cpu."""
    import functools

    from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
    from lavis.runners import runner_base

    def prefetch_loader(loader):
        device = _loader_setting("device")
        return PrefetchLoader(loader) if device is not None and device.type == "cuda" else _PassThroughLoader(loader)

    create_loaders = runner_base.RunnerBase.create_loaders

    @functools.wraps(create_loaders)
    def create_loaders_on_device(self, *args, **kwargs):
        settings = {"device": self.device, "epoch_sleep": float(self.config.run_cfg.get("epoch_transition_sleep", 2.0))}
        token = _LOADER_SETTINGS.set(settings)
        try:
            return create_loaders(self, *args, **kwargs)
        finally:
            _LOADER_SETTINGS.reset(token)

    runner_base.PrefetchLoader = prefetch_loader
    runner_base.RunnerBase.create_loaders = create_loaders_on_device


@fix
def epoch_reshuffle_behind_prefetch_loader():
    """IterLoader calls sampler.set_epoch only if its loader has a sampler; PrefetchLoader hides it, so GPU runs see one shuffle for all epochs."""
    from lavis.datasets.datasets.dataloader_utils import PrefetchLoader

    PrefetchLoader.__getattr__ = _delegate_to_loader


@fix
def configurable_epoch_transition_sleep():
    """IterLoader sleeps 2 s at every epoch boundary ("prevent possible deadlock"); run.epoch_transition_sleep sets it, 0 on CPU runs."""
    import time

    from lavis.datasets.datasets.dataloader_utils import IterLoader

    init = IterLoader.__init__

    def init_with_sleep(self, dataloader, use_distributed=False):
        init(self, dataloader, use_distributed)
        self.epoch_sleep = _loader_setting("epoch_sleep", 2.0)

    def next_batch(self):
        try:
            return next(self.iter_loader)
        except StopIteration:
            self._epoch += 1
            if hasattr(self._dataloader.sampler, "set_epoch") and self._use_distributed:
                self._dataloader.sampler.set_epoch(self._epoch)
            time.sleep(self.epoch_sleep)
            self.iter_loader = iter(self._dataloader)
            return next(self.iter_loader)

    IterLoader.__init__ = init_with_sleep
    IterLoader.__next__ = next_batch


@fix
def evaluation_on_the_models_device():
    """RunnerBase.eval_epoch calls task.evaluation without cuda_enabled, whose default True moves every batch to CUDA."""
    from lavis.tasks.base_task import BaseTask

    evaluation = BaseTask.evaluation

    def evaluation_on_device(self, model, data_loader, cuda_enabled=None):
        if cuda_enabled is None:
            cuda_enabled = next(model.parameters()).is_cuda
        return evaluation(self, model, data_loader, cuda_enabled=cuda_enabled)

    BaseTask.evaluation = evaluation_on_device


def start_loader_epoch(loader, epoch: int) -> None:
    """Put LAVIS's train loader(s) at the start of ``epoch``: sampler epoch, per-sample seeds, a fresh iterator."""
    from lavis.datasets.datasets.dataloader_utils import IterLoader

    from blip2_internlm.datasets.guard import set_epoch

    for inner in getattr(loader, "loaders", [loader]):  # MultiIterLoader holds several
        if isinstance(inner, IterLoader):
            inner._epoch = epoch
            if inner._use_distributed and hasattr(inner._dataloader.sampler, "set_epoch"):
                inner._dataloader.sampler.set_epoch(epoch)
            set_epoch(inner._dataloader.dataset, epoch)
            inner.iter_loader = iter(inner._dataloader)


@fix
def resumable_epochs():
    """LAVIS seeds once per run and advances the sampler epoch by counting passes, so a run resumed at epoch k draws other batches and dropout masks than one that got there itself."""
    import random

    import numpy as np
    from lavis.common.dist_utils import get_rank
    from lavis.runners.runner_base import RunnerBase

    train_epoch = RunnerBase.train_epoch

    def train_epoch_from_its_number(self, epoch):
        loader = self.train_loader  # built lazily, drawing random numbers: before seeding
        seed = int(self.config.run_cfg.get("seed", 42)) + get_rank() + 1000 * int(epoch)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        start_loader_epoch(loader, int(epoch))
        return train_epoch(self, epoch)

    RunnerBase.train_epoch = train_epoch_from_its_number
