"""Helpers for the specs (importable because pyproject sets pytest's pythonpath to tests/)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(*args, env=None, timeout=300, cwd=REPO):
    """Run `python *args` in a fresh interpreter; return the CompletedProcess.

    On timeout the whole process group is killed (torchrun's workers included), so a hung
    run fails the test instead of outliving it.
    """
    full_env = {**os.environ, **(env or {})}
    with subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def installed_lavis_dir() -> Path:
    """site-packages/lavis as pip installed it (this package patches it in memory only)."""
    import importlib.util

    return Path(importlib.util.find_spec("lavis").origin).parent


def build_tiny_blip2(**overrides):
    """``Blip2InternLM`` from its ``tiny`` model type with model-config ``overrides``, seeded: every call
    with the same overrides gives the same weights."""
    import torch

    from blip2_internlm.factory import build_model

    torch.manual_seed(0)
    return build_model("blip2_internlm", "tiny", options=overrides, is_eval=False)
