"""Shared fixtures.  No tests/__init__.py: the LAVIS wheel installs a top-level `tests`
package, so pytest runs with --import-mode=importlib (see pyproject.toml)."""

import os

import pytest
from spec_helpers import REPO

# generated assets and synthetic data are reused across runs unless CI says otherwise
os.environ.setdefault("BLIP2_INTERNLM_CACHE", str(REPO / ".cache" / "blip2_internlm"))
# Inductor's compiled code, one cache per kernel cap: its cache key ignores ATEN_CPU_CAPABILITY, and code
# compiled under one capability fails to build or aborts the process under another (make test-emulated)
_CAPS = "-".join(
    os.environ.get(k, "") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
)
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / f"inductor-{_CAPS.strip('-').lower() or 'native'}")
)


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

    result = run_python(
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory):
    """The tiny stage-1 smoke run (2 gloo ranks): (job directory, CompletedProcess)."""
    output = tmp_path_factory.mktemp("stage1")
    result = torchrun(
        "-m",
        "blip2_internlm.train",
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage1.yaml"),
        "--options",
        f"run.output_dir={output}",
        "run.max_epoch=3",
    )
    (job_dir,) = output.iterdir()
    return job_dir, result


#: A shapes set small enough to build in a second, for specs that read images through datasets.
SMALL_SHAPES = {"train": 12, "val": 4, "test": 4, "image_size": 64, "seed": 0, "max_objects": 1}


@pytest.fixture(scope="module")
def tiny_eval_model(lavis_ready):
    """The tiny ``blip2_internlm`` in eval mode, seeded: the same weights in every process that builds it so."""
    import torch
    from lavis.models import load_model_and_preprocess

    torch.manual_seed(0)
    return load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)[0]


@pytest.fixture(scope="session")
def tiny_trained_checkpoint(lavis_ready, tmp_path_factory):
    """A tiny ``blip2_internlm`` whose trainable weights moved away from any fresh build, and its checkpoint
    as a LAVIS runner saves one (trainable weights only, under "model"): (model, path, state)."""
    import torch

    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.factory import build_model

    model = build_model("blip2_internlm", "tiny")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items() if name not in frozen}
    path = tmp_path_factory.mktemp("weights") / "checkpoint_best.pth"
    save_checkpoint_file({"model": state, "epoch": 3}, path)
    return model, path, state


@pytest.fixture(scope="session")
def small_shapes_root(lavis_ready):
    from blip2_internlm.datasets.builders import default_data_root, generator_args
    from blip2_internlm.datasets.shapes import generate_shapes

    args = generator_args(SMALL_SHAPES)
    root = default_data_root(args)
    generate_shapes(root, **args)
    return root
