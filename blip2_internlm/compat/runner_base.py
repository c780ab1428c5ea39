"""LAVIS's runner: ``runner_base``/``runner_iter`` are this package's fault-tolerant runners
(``blip2_internlm.runner``, which builds the loaders and owns checkpoints and epoch seeding), and
what they inherit from ``RunnerBase`` works on a CPU (DDP, GradScaler, job directories, evaluation)."""

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


@fix
def epoch_reshuffle_behind_prefetch_loader():
    """IterLoader calls sampler.set_epoch only if its loader has a sampler; PrefetchLoader hides it, so GPU runs see one shuffle for all epochs."""
    from lavis.datasets.datasets.dataloader_utils import PrefetchLoader

    from blip2_internlm.runner import delegate_to_wrapped_loader

    PrefetchLoader.__getattr__ = delegate_to_wrapped_loader


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


@fix
def reliable_runners():
    """RunnerBase/RunnerIter write checkpoints in place, cannot resume mid-epoch and train on through NaN losses and bad samples."""
    from lavis.common.registry import registry

    from blip2_internlm.runner import ReliableRunner, ReliableRunnerIter

    # set, not register: LAVIS's registry refuses a second class under a taken name
    registry.mapping["runner_name_mapping"]["runner_base"] = ReliableRunner
    registry.mapping["runner_name_mapping"]["runner_iter"] = ReliableRunnerIter
