"""Checkpoints load without running pickled code, and every load says what it matched."""

import pytest
import torch
from torch import nn

from blip2_internlm.checkpoint import UNSAFE_ENV, CheckpointError, load_checkpoint_file, load_weights


class PlantsAFile:
    """A pickle payload: unpickling it calls open(path, "w"), i.e. runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": PlantsAFile(marker)}, path)
    return path, marker


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(malicious_checkpoint, monkeypatch):
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    path, marker = malicious_checkpoint
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value) and UNSAFE_ENV in str(err.value)
    assert not marker.exists()


def test_unsafe_loading_is_an_explicit_opt_in(malicious_checkpoint):
    path, marker = malicious_checkpoint
    checkpoint = load_checkpoint_file(path, allow_unsafe=True)
    assert torch.equal(checkpoint["model"]["w"], torch.zeros(2))
    assert marker.exists()


def test_plain_lavis_checkpoints_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    torch.save({"model": {"w": torch.ones(3)}, "epoch": 2, "config": {"run": {"lr": 1e-4}}}, tmp_path / "a.pth")
    assert load_checkpoint_file(tmp_path / "a.pth")["epoch"] == 2
    save_file({"w": torch.ones(3)}, str(tmp_path / "b.safetensors"))
    assert torch.equal(load_checkpoint_file(tmp_path / "b.safetensors")["w"], torch.ones(3))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        load_checkpoint_file(tmp_path / "nope.pth")


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.Qformer = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2)


def test_load_report_lists_missing_and_unexpected_keys(tmp_path):
    torch.save(
        {"model": {"Qformer.weight": torch.ones(2, 2), "Qformer.bias": torch.ones(2), "extra": torch.ones(1)}},
        tmp_path / "c.pth",
    )
    model = TwoPart()
    report = load_weights(model, tmp_path / "c.pth", required_prefixes=("Qformer.",))
    assert sorted(report.loaded) == ["Qformer.bias", "Qformer.weight"]
    assert sorted(report.missing) == ["frozen.bias", "frozen.weight"]
    assert report.unexpected == ["extra"]
    assert torch.equal(model.Qformer.weight, torch.ones(2, 2))


def test_a_checkpoint_that_leaves_required_weights_uninitialised_is_an_error(tmp_path):
    torch.save({"model": {"frozen.weight": torch.ones(2, 2)}}, tmp_path / "d.pth")
    with pytest.raises(CheckpointError, match="d.pth does not initialise 2 required weights"):
        load_weights(TwoPart(), tmp_path / "d.pth", required_prefixes=("Qformer.",))


def test_shape_mismatch_names_the_file(tmp_path):
    torch.save({"model": {"Qformer.weight": torch.ones(3, 3)}}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="e.pth does not fit the model"):
        load_weights(TwoPart(), tmp_path / "e.pth")
