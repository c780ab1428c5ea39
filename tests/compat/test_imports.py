"""`import blip2_internlm` makes LAVIS 1.0.2 importable and quiet on the pinned stack."""

from spec_helpers import run_python

NO_AUTOLOAD = {"BLIP2_INTERNLM_AUTOLOAD": "0"}  # LAVIS as it is, without the import hook


def test_lavis_and_its_model_zoo_import_after_the_package():
    result = run_python(
        "-c",
        "import blip2_internlm, lavis, transformers\n"
        "from lavis.models import load_model_and_preprocess\n"
        "print(transformers.__version__)",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("4.")


def test_lavis_alone_fails_on_the_moved_transformers_helpers():
    # the reason for restore_moved_transformers_helpers: without it LAVIS does not import
    result = run_python("-c", "import lavis", env=NO_AUTOLOAD)
    assert result.returncode != 0
    assert "apply_chunking_to_forward" in result.stderr


def test_import_emits_no_timm_deprecation_warnings():
    result = run_python("-W", "error::FutureWarning", "-c", "import blip2_internlm")
    assert result.returncode == 0, result.stderr[-2000:]


def test_timm_import_paths_warn_without_the_filter():
    code = (
        "import transformers.modeling_utils as m, transformers.pytorch_utils as p\n"
        "for n in ('apply_chunking_to_forward','find_pruneable_heads_and_indices','prune_linear_layer'):\n"
        "    setattr(m, n, getattr(p, n))\n"
        "import lavis"
    )
    result = run_python("-W", "error::FutureWarning", "-c", code, env=NO_AUTOLOAD)
    assert result.returncode != 0 and "timm" in result.stderr


def test_applying_twice_changes_nothing(lavis_ready):
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    from blip2_internlm import compat

    before = (compat.applied(), Blip2Qformer.generate, Blip2Qformer.from_config)
    compat.prepare_imports()
    compat.patch_lavis()
    assert (compat.applied(), Blip2Qformer.generate, Blip2Qformer.from_config) == before
    assert len(before[0]) >= 10
    assert all(reason for reason in before[0].values()), "every fix states its reason"
