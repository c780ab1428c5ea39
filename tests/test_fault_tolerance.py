"""No single fault loses or poisons a training run (tiny stage 2, two gloo ranks, real SIGKILLs).

Every run here injects a NaN loss at one step, so the resume specs also show that a skipped
step is replayed identically after a resume.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from spec_helpers import REPO, run_python

from blip2_internlm.checkpoint import load_checkpoint_file, nonfinite_tensors

# 128 images, batch 8 on each of 2 ranks: 8 steps per epoch
OPTIONS = [
    "run.max_epoch=2",
    "datasets.shapes_caption.generator.train=128",
    "run.batch_size_train=8",
    "run.save_every_iters=3",
]
NAN_STEP = 5  # epoch 0, iteration 5, on rank 1 only: every rank must still skip it
NAN = {"BLIP2_INTERNLM_INJECT_NONFINITE_LOSS": f"{NAN_STEP}@1"}


def stage2(output, stage1_checkpoint, *extra, env=None):
    return run_python(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "blip2_internlm.train",
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage2.yaml"),
        "--options",
        f"model.pretrained={stage1_checkpoint}",
        f"run.output_dir={output}",
        *OPTIONS,
        *extra,
        env={**NAN, **(env or {})},
        timeout=600,
    )


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def job_dirs(output):
    return sorted(p for p in output.iterdir() if p.is_dir())


def weights(path):
    return load_checkpoint_file(path)["model"]


def train_stats(job_dir):
    return [json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines() if line.startswith('{"train_')]


@pytest.fixture(scope="module")
def stage1_checkpoint(stage1_run):
    return stage1_run[0] / "checkpoint_2.pth"


@pytest.fixture(scope="module")
def straight(stage1_checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    result = ok(stage2(output, stage1_checkpoint))
    (job_dir,) = job_dirs(output)
    return job_dir, result


def test_a_nan_loss_on_one_rank_is_skipped_on_every_rank_and_the_run_completes(straight):
    job_dir, result = straight
    stats = train_stats(job_dir)
    assert [int(s["train_nonfinite_steps"]) for s in stats] == [1, 1]  # the run's count, per epoch line
    assert all(float(s["train_loss"]) == float(s["train_loss"]) for s in stats)  # no NaN in the epoch means
    log = result.stdout + result.stderr
    assert f"Non-finite loss at epoch 0 iteration {NAN_STEP}" in log and "Sample ids on this rank" in log
    for name in ("checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_last.pth"):
        assert not nonfinite_tensors(weights(job_dir / name)), name


def test_checkpoints_are_last_and_per_epoch(straight):
    job_dir, _ = straight
    names = sorted(p.name for p in job_dir.iterdir() if p.suffix == ".pth")
    assert names == ["checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_last.pth"]
    last = load_checkpoint_file(job_dir / "checkpoint_last.pth")
    assert last["progress"]["epoch"] == 1 and last["progress"]["iters_done"] == 8
    assert len(last["rng"]) == 2  # both ranks' RNG states


def test_a_rank_killed_mid_epoch_resumes_automatically_to_bitwise_equal_weights(straight, stage1_checkpoint, tmp_path):
    killed = stage2(tmp_path, stage1_checkpoint, env={"BLIP2_INTERNLM_INJECT_KILL_AT_STEP": "13@1"})
    assert killed.returncode != 0
    (first_job,) = job_dirs(tmp_path)
    progress = load_checkpoint_file(first_job / "checkpoint_last.pth")["progress"]
    assert (progress["epoch"], progress["iters_done"]) == (1, 3)  # the mid-epoch save at step 11

    resumed = ok(stage2(tmp_path, stage1_checkpoint, "run.resume=auto"))
    assert "run.resume = auto: resuming from" in resumed.stdout + resumed.stderr
    second_job = job_dirs(tmp_path)[-1]
    assert second_job != first_job  # a new job directory; the interrupted one is kept as it was
    straight_dir, _ = straight
    a, b = weights(straight_dir / "checkpoint_1.pth"), weights(second_job / "checkpoint_1.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_preemption_notice_to_one_rank_saves_on_every_rank_and_resumes_bitwise(straight, stage1_checkpoint, tmp_path):
    from blip2_internlm.runner import PREEMPTED_EXIT_CODE

    # rank 1 gets SIGTERM before global step 10 (epoch 1, iteration 2); both ranks finish that step
    preempted = stage2(tmp_path, stage1_checkpoint, env={"BLIP2_INTERNLM_INJECT_SIGTERM_AT_STEP": "10@1"})
    output = preempted.stdout + preempted.stderr
    assert preempted.returncode != 0 and f"exiting with status {PREEMPTED_EXIT_CODE}" in output
    (first_job,) = job_dirs(tmp_path)
    progress = load_checkpoint_file(first_job / "checkpoint_last.pth")["progress"]
    assert (progress["epoch"], progress["iters_done"], progress["global_step"]) == (1, 3, 11)

    ok(stage2(tmp_path, stage1_checkpoint, "run.resume=auto"))
    straight_dir, _ = straight
    a, b = weights(straight_dir / "checkpoint_1.pth"), weights(job_dirs(tmp_path)[-1] / "checkpoint_1.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_a_checkpoint_save_keeps_the_previous_one_and_resume_continues(
    straight, stage1_checkpoint, tmp_path
):
    # saves: iteration 3, iteration 6, end of epoch 0, iteration 3 of epoch 1 (the 4th: killed mid-write)
    killed = stage2(tmp_path, stage1_checkpoint, env={"BLIP2_INTERNLM_INJECT_KILL_IN_SAVE": "4"})
    assert killed.returncode != 0
    (first_job,) = job_dirs(tmp_path)
    assert list(first_job.glob(".checkpoint_last.pth.*.partial")), "the kill did not land inside the save"
    progress = load_checkpoint_file(first_job / "checkpoint_last.pth")["progress"]
    assert (progress["epoch"], progress["iters_done"]) == (0, 8)

    resumed = ok(stage2(tmp_path, stage1_checkpoint, "run.resume=auto"))
    train_lines = train_stats(job_dirs(tmp_path)[-1])
    assert len(train_lines) == 1  # only epoch 1 was left
    straight_dir, _ = straight
    a, b = weights(straight_dir / "checkpoint_1.pth"), weights(job_dirs(tmp_path)[-1] / "checkpoint_1.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resuming from" in resumed.stdout + resumed.stderr


def test_a_diverging_run_stops_naming_the_last_good_checkpoint_and_saves_no_non_finite_weight(
    stage1_checkpoint, tmp_path
):
    result = stage2(tmp_path, stage1_checkpoint, "run.init_lr=1e12", "run.warmup_lr=1e12", "run.max_nonfinite_steps=2")
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "optimizer steps in a row had a non-finite" in log and "Last good checkpoint" in log
    for path in tmp_path.rglob("*.pth"):
        assert not nonfinite_tensors(weights(path)), path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_when_a_rank_is_killed_the_other_exits_with_a_clear_message_instead_of_hanging(stage1_checkpoint, tmp_path):
    """Ranks launched without torchrun (as a scheduler would): nobody kills the survivor for us."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "blip2_internlm.train",
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage2.yaml"),
        "--options",
        f"model.pretrained={stage1_checkpoint}",
        f"run.output_dir={tmp_path}",
        *OPTIONS,
        "run.dist_timeout_minutes=1",
    ]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "BLIP2_INTERNLM_INJECT_KILL_AT_STEP": "4@1"},
        )
        for rank in (0, 1)
    ]
    try:
        survivor_output, _ = ranks[0].communicate(timeout=240)
    finally:
        for process in ranks:
            process.kill()
    assert ranks[1].wait() == -9
    assert ranks[0].returncode != 0
    assert "lost contact with another rank" in survivor_output and "run.resume=auto" in survivor_output
    assert "checkpoint_last.pth" in survivor_output  # the mid-epoch save at step 3 is named
