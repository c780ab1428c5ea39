"""Helpers for the specs (importable because pyproject sets pytest's pythonpath to tests/)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(*args, env=None, timeout=300, cwd=REPO):
    """Run `python *args` in a fresh interpreter; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def installed_lavis_dir() -> Path:
    """site-packages/lavis as pip installed it (this package patches it in memory only)."""
    import importlib.util

    return Path(importlib.util.find_spec("lavis").origin).parent
