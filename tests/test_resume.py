"""An interrupted stage resumes from its last checkpoint and ends where an uninterrupted run ends."""

import json

import pytest
import torch
from conftest import torchrun
from spec_helpers import REPO

OPTIONS = ["run.max_epoch=2", "datasets.shapes_caption.generator.train=128", "run.batch_size_train=8"]


def stage2(tmp_path, stage1_checkpoint, name, *extra):
    output = tmp_path / name
    torchrun(
        "-m",
        "blip2_internlm.train",
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage2.yaml"),
        "--options",
        f"model.pretrained={stage1_checkpoint}",
        f"run.output_dir={output}",
        *OPTIONS,
        *extra,
    )
    return sorted(output.iterdir())[-1]


@pytest.fixture(scope="module")
def runs(stage1_run, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    stage1_checkpoint = stage1_run[0] / "checkpoint_2.pth"
    straight = stage2(tmp_path, stage1_checkpoint, "straight")
    interrupted = stage2(tmp_path, stage1_checkpoint, "interrupted", "run.max_epoch=1")
    resumed = stage2(tmp_path, stage1_checkpoint, "resumed", f"run.resume_ckpt_path={interrupted / 'checkpoint_0.pth'}")
    return straight, resumed


def test_resumed_run_trains_only_the_remaining_epoch(runs):
    _, resumed = runs
    epochs = [line for line in (resumed / "log.txt").read_text().splitlines() if line.startswith('{"train_')]
    assert len(epochs) == 1 and not (resumed / "checkpoint_0.pth").exists()


def test_resumed_run_ends_with_the_same_weights_and_loss(runs):
    straight, resumed = runs
    a = torch.load(straight / "checkpoint_1.pth", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoint_1.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = [
        json.loads(line)["train_loss"]
        for d in runs
        for line in (d / "log.txt").read_text().splitlines()
        if line.startswith('{"train_')
    ]
    assert last[-1] == last[1]  # the straight run's second epoch == the resumed run's only epoch
