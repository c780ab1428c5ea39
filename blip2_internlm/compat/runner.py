"""LAVIS's runner on CPU: no CUDA-only DDP arguments and no GradScaler."""

import torch

from blip2_internlm.compat import fix


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


@fix
def output_dir_relative_to_cwd():
    """RunnerBase resolves run.output_dir under the installed lavis package, i.e. inside site-packages."""
    from pathlib import Path

    from lavis.common.registry import registry
    from lavis.runners.runner_base import RunnerBase

    def setup_output_dir(self):
        output_dir = Path(self.config.run_cfg.output_dir).expanduser().absolute() / self.job_id
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        # set, not register: register_path refuses a second runner in the same process
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        self.result_dir, self.output_dir = result_dir, output_dir

    RunnerBase.setup_output_dir = setup_output_dir


class _PassThroughLoader:
    """What PrefetchLoader offers the runner, minus the CUDA stream and the copy to CUDA."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # sampler, dataset, batch_size: the runner reads them
        return getattr(self.loader, name)


@fix
def prefetch_loader_only_on_cuda():
    """RunnerBase wraps every loader in PrefetchLoader, which creates a CUDA stream and copies batches to CUDA even for run.device: cpu."""
    import contextvars
    import functools

    from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
    from lavis.runners import runner_base

    loader_device = contextvars.ContextVar("loader_device", default=None)

    def prefetch_loader(loader):
        device = loader_device.get()
        return PrefetchLoader(loader) if device is not None and device.type == "cuda" else _PassThroughLoader(loader)

    create_loaders = runner_base.RunnerBase.create_loaders

    @functools.wraps(create_loaders)
    def create_loaders_on_device(self, *args, **kwargs):
        token = loader_device.set(self.device)
        try:
            return create_loaders(self, *args, **kwargs)
        finally:
            loader_device.reset(token)

    runner_base.PrefetchLoader = prefetch_loader
    runner_base.RunnerBase.create_loaders = create_loaders_on_device


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
