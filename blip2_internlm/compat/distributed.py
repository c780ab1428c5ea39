"""Distributed set-up that works with gloo on CPU as well as NCCL on GPUs."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from blip2_internlm.compat.fixes import fix
from blip2_internlm.settings import Boolean, Choice, Integer, Nullable, Number, Text, read_settings, setting


@dataclass(frozen=True)
class DistributedSettings:
    """The ``run:`` keys of the process group (``rank``, ``world_size``, ``gpu`` and ``distributed`` are
    set by ``init_distributed_mode`` from torchrun's environment)."""

    distributed: bool = setting(False, Boolean(), "use torch.distributed when launched by torchrun")
    dist_url: str = setting("env://", Text(), "init_method of the process group")
    dist_backend: str | None = setting(
        None, Nullable(Choice("nccl", "gloo", "mpi")), "process-group backend; null: nccl on CUDA, else gloo"
    )
    dist_timeout_minutes: float = setting(
        30.0, Number(0, lowest_open=True), "how long a collective waits for a rank that stopped answering"
    )
    world_size: int = setting(1, Integer(1), "number of ranks")
    rank: int = setting(0, Integer(0), "this process's rank")
    gpu: int = setting(0, Integer(0), "this process's local CUDA device index")
    find_unused_parameters: bool = setting(False, Boolean(), "DDP's find_unused_parameters")


def pick_backend(run_cfg) -> str:
    """``run.dist_backend`` if set, else NCCL on CUDA runs and gloo everywhere else."""
    chosen = read_settings(DistributedSettings, run_cfg).dist_backend
    if chosen:
        return str(chosen)
    wants_cuda = str(run_cfg.get("device", "cuda")).startswith("cuda")
    return "nccl" if wants_cuda and torch.cuda.is_available() else "gloo"


def init_distributed_mode(args):
    """LAVIS's ``init_distributed_mode`` without its CUDA-only assumptions.

    Reads the torchrun (or SLURM) environment, chooses the backend with ``pick_backend``,
    touches CUDA only for NCCL, and uses a finite timeout (``run.dist_timeout_minutes``,
    default 30) so a dead rank ends the job instead of hanging it for a year.
    """
    from lavis.common.dist_utils import setup_for_distributed

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        print("Not using distributed mode")
        args.distributed = False
        return

    args.distributed = True
    args.dist_backend = pick_backend(args)
    if args.dist_backend == "nccl":
        torch.cuda.set_device(args.gpu)
    print(
        f"| distributed init (rank {args.rank}, world {args.world_size}, {args.dist_backend}): {args.dist_url}",
        flush=True,
    )
    dist.init_process_group(
        backend=args.dist_backend,
        init_method=args.dist_url,
        world_size=args.world_size,
        rank=args.rank,
        timeout=datetime.timedelta(minutes=read_settings(DistributedSettings, args).dist_timeout_minutes),
    )
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def collective_device() -> torch.device:
    """Where tensors for collectives must live: CUDA for NCCL, CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@fix
def init_distributed_mode_cpu_aware():
    """LAVIS hard-codes NCCL and torch.cuda.set_device, so torchrun on a CPU machine crashes."""
    import lavis.common.dist_utils as dist_utils

    dist_utils.init_distributed_mode = init_distributed_mode


@fix
def metric_sync_on_backend_device():
    """SmoothedValue puts its all-reduce tensor on "cuda", which gloo on CPU cannot use."""
    from lavis.common import dist_utils
    from lavis.common.logger import SmoothedValue

    def synchronize_between_processes(self):
        if not dist_utils.is_dist_avail_and_initialized():
            return
        totals = torch.tensor([self.count, self.total], dtype=torch.float64, device=collective_device())
        dist.barrier()
        dist.all_reduce(totals)
        self.count, self.total = int(totals[0].item()), totals[1].item()

    SmoothedValue.synchronize_between_processes = synchronize_between_processes
