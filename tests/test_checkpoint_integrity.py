"""A checkpoint file is either whole or absent: saves are atomic, and a broken file says what is wrong."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from blip2_internlm.checkpoint import UNSAFE_ENV, CheckpointError, load_checkpoint_file, save_checkpoint_file


@pytest.fixture
def checkpoint_bytes(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.arange(1000.0)}, "epoch": 3}, path)
    return path.read_bytes()


def broken(tmp_path, content: bytes):
    path = tmp_path / "checkpoint_last.pth"
    path.write_bytes(content)
    return path


def error_for(path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    return str(err.value)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_a_truncated_checkpoint_is_named_truncated_without_unpickling_advice(tmp_path, checkpoint_bytes, cut):
    path = broken(tmp_path, checkpoint_bytes[: int(len(checkpoint_bytes) * cut)])
    message = error_for(path)
    assert str(path) in message and "truncated" in message
    assert UNSAFE_ENV not in message and "weights_only" not in message and "central directory" not in message


def test_an_empty_file_and_a_two_byte_file_are_truncated_not_unsafe(tmp_path, checkpoint_bytes):
    assert "empty" in error_for(broken(tmp_path, b""))
    message = error_for(broken(tmp_path, checkpoint_bytes[:2]))
    assert "truncated" in message and UNSAFE_ENV not in message


def test_a_truncated_legacy_format_checkpoint_is_named(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(1000.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint_file(path)["w"], torch.arange(1000.0))
    path.write_bytes(path.read_bytes()[:300])
    message = error_for(path)
    assert "truncated" in message and UNSAFE_ENV not in message


@pytest.mark.parametrize("content", [b'{"model": {}}', b"epoch 3\n", b"\x00" * 64])
def test_a_foreign_file_is_not_a_checkpoint(tmp_path, content):
    message = error_for(broken(tmp_path, content))
    assert "not a PyTorch checkpoint" in message and UNSAFE_ENV not in message


def test_a_damaged_safetensors_file_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes()[:100])
    assert str(path) in error_for(path)


def test_an_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint_file({"step": 1}, path)
    save_checkpoint_file({"step": 2}, path)
    assert load_checkpoint_file(path) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint_file({"step": 1}, path)

    def half_written_then_interrupted(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_written_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_file({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]


SAVER = textwrap.dedent(
    """
    import os, resource, signal, sys, torch
    from blip2_internlm.checkpoint import save_checkpoint_file, CheckpointError
    path, mode = sys.argv[1], sys.argv[2]
    save_checkpoint_file({"step": 1, "w": torch.ones(10)}, path)
    big = {"step": 2, "w": torch.ones(64 * 2**20 // 4)}
    if mode == "full-disk":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail, the process lives
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        try:
            save_checkpoint_file(big, path)
        except CheckpointError as err:
            print("ERROR", err, flush=True)
            sys.exit(3)
    else:
        print("SAVING", flush=True)
        while True:
            save_checkpoint_file(big, path)
    """
)


def test_a_sigkill_during_a_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path), "kill"], stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() == "SAVING"
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".*.partial")) and time.monotonic() < deadline:  # caught mid-write
        time.sleep(0.001)
    os.kill(saver.pid, signal.SIGKILL)
    saver.wait()
    assert list(tmp_path.glob(".*.partial")), "the saver was never caught writing"
    assert load_checkpoint_file(path)["step"] in (1, 2)


def test_a_full_disk_during_a_save_is_a_clear_error_and_the_previous_file_survives(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    result = subprocess.run(
        [sys.executable, "-c", SAVER, str(path), "full-disk"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"could not write checkpoint {path}" in result.stdout and "intact" in result.stdout
    assert load_checkpoint_file(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]


def test_a_filesystem_that_cannot_fsync_a_directory_still_saves_and_says_so_once(tmp_path, monkeypatch, caplog):
    import errno
    import logging
    import os

    from blip2_internlm import checkpoint

    real_fsync, directories = os.fsync, set()

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            directories.add(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    path = tmp_path / "checkpoint_last.pth"
    with caplog.at_level(logging.WARNING):
        save_checkpoint_file({"step": 1}, path)
        save_checkpoint_file({"step": 2}, path)
    assert directories and load_checkpoint_file(path) == {"step": 2}
    assert caplog.text.count("cannot fsync a directory") == 1
