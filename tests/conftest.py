"""Shared fixtures.  No tests/__init__.py: the LAVIS wheel installs a top-level `tests`
package, so pytest runs with --import-mode=importlib (see pyproject.toml)."""

import os

import pytest
from spec_helpers import REPO
# generated assets and synthetic data are reused across runs unless CI says otherwise
os.environ.setdefault("BLIP2_INTERNLM_CACHE", str(REPO / ".cache" / "blip2_internlm"))


@pytest.fixture(scope="session")
def lavis_ready():
    import blip2_internlm  # noqa: F401  (applies compat, imports lavis)

    return True


@pytest.fixture(scope="session")
def tiny_stage1_model(lavis_ready):
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    return Blip2Qformer.from_pretrained("tiny")


@pytest.fixture
def fresh_tiny_stage1_model(lavis_ready):
    import torch
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    torch.manual_seed(0)
    return Blip2Qformer.from_pretrained("tiny")


def torchrun(*args, nproc=2, timeout=300):
    """`python -m torch.distributed.run --standalone --nproc_per_node=N *args`, checked."""
    from spec_helpers import run_python

    result = run_python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory):
    """The tiny stage-1 smoke run (2 gloo ranks): (job directory, CompletedProcess)."""
    output = tmp_path_factory.mktemp("stage1")
    result = torchrun(
        "-m", "blip2_internlm.train", "--cfg-path", str(REPO / "configs/tiny/pretrain_stage1.yaml"),
        "--options", f"run.output_dir={output}", "run.max_epoch=3",
    )
    (job_dir,) = output.iterdir()
    return job_dir, result
