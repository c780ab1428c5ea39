"""Distributed set-up and LAVIS's runner on a CPU machine."""

import os

import pytest
import torch
from omegaconf import OmegaConf


def test_backend_is_gloo_without_cuda_and_respects_an_explicit_choice(lavis_ready):
    from blip2_internlm.compat.distributed import pick_backend

    assert pick_backend(OmegaConf.create({"device": "cpu"})) == "gloo"
    assert pick_backend(OmegaConf.create({"device": "cuda", "dist_backend": "gloo"})) == "gloo"
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert pick_backend(OmegaConf.create({"device": "cuda"})) == expected


def test_without_torchrun_the_run_is_not_distributed(lavis_ready, monkeypatch):
    from lavis.common.dist_utils import init_distributed_mode

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    run_cfg = OmegaConf.create({"distributed": True, "dist_url": "env://"})
    init_distributed_mode(run_cfg)
    assert run_cfg.distributed is False


def fake_runner(**run_cfg):
    from types import SimpleNamespace

    return SimpleNamespace(
        config=SimpleNamespace(run_cfg=OmegaConf.create(run_cfg)),
        device=torch.device("cpu"),
        _scaler=None,
        job_id="job",
    )


def test_no_grad_scaler_on_cpu_even_with_amp(lavis_ready):
    from lavis.runners.runner_base import RunnerBase

    assert RunnerBase.scaler.fget(fake_runner(amp=True)) is None


def test_output_dir_is_relative_to_the_working_directory(lavis_ready, tmp_path, monkeypatch):
    from lavis.runners.runner_base import RunnerBase

    monkeypatch.chdir(tmp_path)
    runner = fake_runner(output_dir="output/run")
    RunnerBase.setup_output_dir(runner)
    assert runner.output_dir == tmp_path / "output" / "run" / "job"
    assert (runner.output_dir / "result").is_dir()


def loader_settings(**overrides):
    settings = dict(
        num_workers=0, device=torch.device("cpu"), distributed=False, dist_eval_sampler=True, epoch_sleep=2.0
    )
    return settings | overrides


def test_cpu_loaders_skip_the_cuda_prefetcher(lavis_ready):
    from blip2_internlm.runner import lavis_loader

    data = [{"x": torch.ones(1)}, {"x": torch.zeros(1)}]
    loader = lavis_loader(data, 1, False, None, **loader_settings())
    assert [b["x"].device.type for b in loader] == ["cpu", "cpu"]
    assert len(loader) == 2 and loader.sampler is not None  # what the runner reads through the wrapper


def test_asking_for_cuda_on_a_cpu_machine_says_what_to_do(lavis_ready):
    from blip2_internlm._entry import check_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="run.device=cpu"):
        check_device(OmegaConf.create({"device": "cuda"}))


def _gather_same_image(rank, world, port, results):
    import torch.distributed as dist

    from blip2_internlm.models.blip2_stage1 import same_image_mask

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids = [["img_a", "img_b"], ["img_c", "img_a"]][rank]
    results[rank] = same_image_mask({"image_id": ids}, 2, "cpu").tolist()
    dist.destroy_process_group()


def test_same_image_positives_are_found_across_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_gather_same_image, args=(2, port, results), nprocs=2, join=True)
    # global batch: [img_a, img_b | img_c, img_a]
    assert results[0] == [[True, False, False, True], [False, True, False, False]]
    assert results[1] == [[False, False, True, False], [True, False, False, True]]


def test_the_sampler_is_reachable_through_the_prefetch_loader(lavis_ready):
    # IterLoader reshuffles only if `loader.sampler` has set_epoch; LAVIS's PrefetchLoader hid it
    from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(4)), batch_size=2)
    prefetch = PrefetchLoader.__new__(PrefetchLoader)  # no CUDA stream needed to look at attributes
    prefetch.loader = loader
    assert prefetch.sampler is loader.sampler


def test_epoch_transition_sleep_follows_the_run_config(lavis_ready, monkeypatch):
    from lavis.datasets.datasets import dataloader_utils

    from blip2_internlm import runner

    slept = []
    monkeypatch.setattr(runner.time, "sleep", slept.append)
    monkeypatch.setattr(dataloader_utils.time, "sleep", slept.append)
    loader = runner.lavis_loader(list(range(2)), 2, True, None, **loader_settings(epoch_sleep=0.0))
    batches = [next(loader) for _ in range(3)]
    assert slept == [0.0, 0.0] and len(batches) == 3 and loader.epoch == 2
    default = runner.lavis_loader(list(range(2)), 2, True, None, **loader_settings())
    [next(default) for _ in range(2)]
    assert slept[-1] == 2.0  # LAVIS's pause where the run config says nothing
