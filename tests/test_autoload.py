"""LAVIS's own scripts see the plugin with no edits (issue #8, docs/autoload.md).

Every test runs a fresh interpreter of this venv, in which ``pip install -e .`` (``make
venv``) put ``blip2_internlm-autoload.pth`` into site-packages.  None of the scripts
below imports ``blip2_internlm``.
"""

import json
import sysconfig
import textwrap
from pathlib import Path

import pytest
from spec_helpers import REPO, run_python

PTH = Path(sysconfig.get_paths()["purelib"]) / "blip2_internlm-autoload.pth"
OFF = {"BLIP2_INTERNLM_AUTOLOAD": "0"}
ON = {"BLIP2_INTERNLM_AUTOLOAD": "1"}  # whatever the caller's shell says

# LAVIS 1.0.2's repo-root train.py, unmodified in substance: it knows nothing of blip2_internlm
LAVIS_TRAIN_PY = """
import argparse
import random

import numpy as np
import torch
import torch.backends.cudnn as cudnn

import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode
from lavis.common.logger import setup_logger
from lavis.common.optims import (
    LinearWarmupCosineLRScheduler,
    LinearWarmupStepLRScheduler,
)
from lavis.common.registry import registry
from lavis.common.utils import now

# imports modules for registration
from lavis.datasets.builders import *
from lavis.models import *
from lavis.processors import *
from lavis.runners import *
from lavis.tasks import *


def parse_args():
    parser = argparse.ArgumentParser(description="Training")
    parser.add_argument("--cfg-path", required=True, help="path to configuration file.")
    parser.add_argument("--options", nargs="+", help="override some settings in the used config")
    return parser.parse_args()


def setup_seeds(config):
    seed = config.run_cfg.seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cudnn.benchmark = False
    cudnn.deterministic = True


def get_runner_class(cfg):
    return registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))


def main():
    job_id = now()
    cfg = Config(parse_args())
    init_distributed_mode(cfg.run_cfg)
    setup_seeds(cfg)
    setup_logger()
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)

    runner = get_runner_class(cfg)(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    runner.train()


if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module", autouse=True)
def hook_installed():
    if not PTH.is_file():
        pytest.fail(f"{PTH} is missing: install the package (`pip install -e .`, as `make venv` does)")
    assert "blip2_internlm_autoload" in PTH.read_text()


def test_the_pth_is_the_only_startup_cost():
    heavy = "sorted(m for m in ('torch', 'transformers', 'lavis', 'blip2_internlm', 'numpy') if m in sys.modules)"
    code = (
        "import sys, blip2_internlm_autoload as a\n"
        f"print(a.installed(), {heavy})\n"
        "import importlib.util\n"
        "print(importlib.util.find_spec('lavis').origin.endswith('lavis/__init__.py'), " + heavy + ")"
    )
    result = run_python("-c", code, env=ON, cwd=PTH.parent.parent)  # outside the repo
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True []", "True []"]  # finding LAVIS imports nothing either
    assert run_python("-c", code, env=OFF).stdout.splitlines() == ["False []", "True []"]


def lavis_train(tmp_path, name, cfg, *options):
    """Run LAVIS's train.py through torchrun, as LAVIS does (its runner calls dist.barrier()
    whatever the config says); return (job folder, model arch, model type, dataset names)."""
    script = tmp_path / "train.py"
    script.write_text(LAVIS_TRAIN_PY)
    output = tmp_path / name
    result = run_python(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(script),
        "--cfg-path",
        str(REPO / "configs/tiny" / cfg),
        "--options",
        "run.max_epoch=1",
        "run.batch_size_train=8",
        f"run.output_dir={output}",
        "datasets.shapes_caption.generator.train=16",
        "datasets.shapes_caption.generator.val=8",
        "datasets.shapes_caption.generator.test=8",
        *options,
        env=ON,
        cwd=tmp_path,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (job_dir,) = output.iterdir()
    log = (job_dir / "log.txt").read_text()
    config, _ = json.JSONDecoder().raw_decode(log)  # the runner logs the merged config first
    epochs = [json.loads(line) for line in log.splitlines() if line.startswith('{"train_')]
    assert len(epochs) == 1 and float(epochs[0]["train_loss"]) > 0
    assert (job_dir / "checkpoint_0.pth").is_file()
    return job_dir, config["model"]["arch"], config["model"]["model_type"], list(config["datasets"])


@pytest.fixture(scope="module")
def stage1_job(tmp_path_factory):
    return lavis_train(tmp_path_factory.mktemp("lavis_train"), "stage1", "pretrain_stage1.yaml")


def test_an_unmodified_lavis_train_script_trains_stage1_on_plugin_data(stage1_job):
    # LAVIS's own arch, with the plugin's model type and dataset builder
    assert stage1_job[1:] == ("blip2", "tiny", ["shapes_caption"])


def test_an_unmodified_lavis_train_script_trains_the_plugin_model(stage1_job, tmp_path):
    if not (REPO / "configs/tiny/pretrain_stage2.yaml").is_file():
        pytest.skip("no tiny stage-2 config")
    checkpoint = stage1_job[0] / "checkpoint_0.pth"
    job = lavis_train(tmp_path, "stage2", "pretrain_stage2.yaml", f"model.pretrained={checkpoint}")
    assert job[1:] == ("blip2_internlm", "tiny", ["shapes_caption"])


def test_an_unmodified_lavis_train_script_trains_the_instruction_model_with_lora(stage1_job, tmp_path):
    checkpoint = stage1_job[0] / "checkpoint_0.pth"
    job_dir, *described = lavis_train(
        tmp_path,
        "instruct",
        "instruct_templates.yaml",
        f"model.pretrained={checkpoint}",
        "model.llm_lora={r: 4, alpha: 8}",
        "datasets.shapes_vqa.generator.train=16",
    )
    assert described == ["blip2_internlm_instruct", "tiny", ["shapes_caption", "shapes_vqa"]]
    import torch

    saved = torch.load(job_dir / "checkpoint_0.pth", map_location="cpu", weights_only=True)["model"]
    assert any(".lora_A." in key for key in saved) and not any(".base_layer." in key for key in saved)


def test_load_model_and_preprocess_finds_the_plugin_models(tmp_path):
    code = textwrap.dedent("""
        import sys
        from lavis.models import load_model_and_preprocess
        assert "blip2_internlm" in sys.modules
        from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
        for arch in ("blip2", "blip2_internlm"):
            model, vis_processors, txt_processors = load_model_and_preprocess(arch, "tiny", is_eval=True)
            print(type(model).__name__, sorted(vis_processors), model.training)
            assert (arch == "blip2") == isinstance(model, Blip2Qformer)  # stage 1 is LAVIS's model
        import lavis, blip2_internlm_autoload
        print(lavis.__spec__.loader is lavis.__loader__, blip2_internlm_autoload.installed())
    """)
    result = run_python("-c", code, env=ON, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "Blip2Stage1 ['eval', 'train'] False",  # LAVIS's Blip2Qformer, reading its asset keys
        "Blip2InternLM ['eval', 'train'] False",
        "True False",  # LAVIS keeps its own spec; the hook is gone once it has run
    ]


def test_the_switch_turns_it_off_and_lavis_fails_as_before():
    result = run_python("-c", "import lavis", env=OFF)
    assert result.returncode != 0
    assert "apply_chunking_to_forward" in result.stderr


def test_importing_the_plugin_first_still_works():
    code = (
        "import importlib.util, blip2_internlm, lavis\n"
        "assert importlib.util.find_spec('lavis') is lavis.__spec__\n"
        "from lavis.common.registry import registry\n"
        "print(registry.get_builder_class('shapes_caption').__name__)"
    )
    result = run_python("-c", code, env=ON)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ShapesCaptionBuilder"


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_repo_root_scripts_run_like_lavis_s(script):
    result = run_python(script, "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--cfg-path" in result.stdout and "--options" in result.stdout
