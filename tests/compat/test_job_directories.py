"""A launch never writes into another launch's job directory, even with the same job id."""

import multiprocessing
import socket
from datetime import datetime
from types import SimpleNamespace

from omegaconf import OmegaConf


def stub_runner(output_dir, job_id):
    run_cfg = OmegaConf.create({"output_dir": str(output_dir)})
    return SimpleNamespace(config=SimpleNamespace(run_cfg=run_cfg), job_id=job_id)


def set_up(output_dir, job_id):
    from lavis.runners.runner_base import RunnerBase

    runner = stub_runner(output_dir, job_id)
    RunnerBase.setup_output_dir(runner)
    return runner


def test_runners_with_the_same_job_id_get_directories_of_their_own(lavis_ready, tmp_path):
    runners = [set_up(tmp_path / "out", "202501011200") for _ in range(3)]
    assert [r.job_id for r in runners] == ["202501011200", "202501011200_2", "202501011200_3"]
    assert [r.output_dir for r in runners] == [tmp_path / "out" / r.job_id for r in runners]
    assert all((r.output_dir / "result").is_dir() and r.result_dir == r.output_dir / "result" for r in runners)


def test_a_leftover_directory_of_an_earlier_launch_is_not_reused(lavis_ready, tmp_path):
    earlier = tmp_path / "job"
    earlier.mkdir()
    (earlier / "log.txt").write_text("earlier launch\n")
    runner = set_up(tmp_path, "job")
    assert runner.output_dir == tmp_path / "job_2"
    assert (earlier / "log.txt").read_text() == "earlier launch\n"


def _claim_many(output_dir, start, claimed, count):
    start.wait()  # both processes mkdir at the same moment
    claimed.put([set_up(output_dir, "job").job_id for _ in range(count)])


def test_processes_racing_for_one_job_id_never_share_a_directory(lavis_ready, tmp_path):
    context = multiprocessing.get_context("fork")  # the children inherit the imported LAVIS
    start, claimed = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_claim_many, args=(tmp_path, start, claimed, 20)) for _ in range(2)]
    for racer in racers:
        racer.start()
    names = claimed.get(timeout=120) + claimed.get(timeout=120)
    for racer in racers:
        racer.join(timeout=60)
    assert sorted(names) == sorted(["job"] + [f"job_{n}" for n in range(2, 41)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def _rank(rank, port, output_dir, chosen):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        chosen.put((rank, str(set_up(output_dir, "job").output_dir)))
    finally:
        dist.destroy_process_group()


def test_every_rank_writes_into_the_directory_rank_zero_claimed(lavis_ready, tmp_path):
    (tmp_path / "job").mkdir()  # taken, so rank 0 claims job_2; rank 1 must follow it, not its own guess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    chosen = context.Queue()
    ranks = [context.Process(target=_rank, args=(rank, port, tmp_path, chosen)) for rank in range(2)]
    for process in ranks:
        process.start()
    results = dict(chosen.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    assert results == {0: str(tmp_path / "job_2"), 1: str(tmp_path / "job_2")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job", "job_2"]


def test_job_ids_are_timestamps_to_the_second(lavis_ready):
    from blip2_internlm._entry import shared_job_id

    job_id = shared_job_id()
    assert len(job_id) == 14 and datetime.strptime(job_id, "%Y%m%d%H%M%S").strftime("%Y%m%d%H%M%S") == job_id
