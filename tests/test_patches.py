"""patches/ holds the LAVIS source fixes as diffs that apply to the pip-installed 1.0.2."""

import importlib.util
import shutil
import subprocess

import pytest
from spec_helpers import REPO, installed_lavis_dir

PATCHES = sorted((REPO / "patches").glob("*.patch"))


@pytest.fixture
def pristine_lavis(tmp_path):
    shutil.copytree(installed_lavis_dir(), tmp_path / "lavis", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_there_are_patches_for_the_seeds_lavis_bugs():
    names = [p.name for p in PATCHES]
    assert any("image-id" in n for n in names) and any("vg" in n for n in names)


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_each_patch_applies_cleanly_and_compiles(pristine_lavis, patch):
    result = subprocess.run(
        ["patch", "-p1", "--forward", "-i", str(patch)], cwd=pristine_lavis, capture_output=True, text=True
    )
    assert result.returncode == 0 and "FAILED" not in result.stdout, result.stdout + result.stderr
    assert "fuzz" not in result.stdout and "offset" not in result.stdout.lower(), result.stdout
    touched = [line.split()[1][2:] for line in patch.read_text().splitlines() if line.startswith("+++ ")]
    for relative in touched:
        compile((pristine_lavis / relative).read_text(), relative, "exec")


def test_patched_lavis_maps_image_ids_like_the_runtime_fix(pristine_lavis, lavis_ready):
    from blip2_internlm.ids import stable_image_id

    subprocess.run(["patch", "-p1", "-i", str(PATCHES[0])], cwd=pristine_lavis, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("patched_lavis_utils", pristine_lavis / "lavis/common/utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for image_id in ("coco_123456", "vg_1", 7, -3, "7"):
        assert module.stable_image_id(image_id) == stable_image_id(image_id)
