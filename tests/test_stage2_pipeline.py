"""Stage 2 through LAVIS's runner from the stage-1 checkpoint, then caption evaluation and zero-shot VQA scored by
LAVIS's own VQATask and VQAEval, each with two gloo processes."""

import json

import pytest
from conftest import torchrun
from spec_helpers import REPO

SMALL_DATA = "datasets.{}.generator.train=256"


@pytest.fixture(scope="module")
def stage2_run(stage1_run, tmp_path_factory):
    stage1_dir, _ = stage1_run
    output = tmp_path_factory.mktemp("stage2")
    result = torchrun(
        "-m",
        "blip2_internlm.train",
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage2.yaml"),
        "--options",
        f"model.pretrained={stage1_dir / 'checkpoint_2.pth'}",
        f"run.output_dir={output}",
        "run.max_epoch=1",
        SMALL_DATA.format("shapes_caption"),
    )
    (job_dir,) = output.iterdir()
    return job_dir, result


def test_stage2_trains_from_the_stage1_checkpoint(stage2_run):
    job_dir, result = stage2_run
    assert "Loaded " in result.stderr + result.stdout  # the key report of the stage-1 load
    stats = [json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines() if line.startswith('{"train_')]
    assert len(stats) == 1 and float(stats[0]["train_loss"]) > 0
    assert (job_dir / "checkpoint_0.pth").is_file()


def test_the_checkpoint_records_what_each_auto_key_resolved_to_and_on_which_machine(stage2_run):
    from blip2_internlm import hardware
    from blip2_internlm.checkpoint import load_checkpoint_file

    job_dir, result = stage2_run
    saved = load_checkpoint_file(job_dir / "checkpoint_0.pth")["resolved_defaults"]
    assert saved["device"] == "cpu" and saved["machine"]["isa_class"] == hardware.cpu_isa_class()
    # the tiny config asks fp32 and leaves the kernel to the machine: what the run used is written down
    assert saved["llm_precision"] == {"setting": "fp32", "resolved": "fp32"}
    assert saved["cpu_fp32_linear"] == {"setting": "auto", "resolved": hardware.fastest_cpu_fp32_linear()}
    assert "model defaults on cpu" in result.stderr + result.stdout  # printed once at start


def test_zero_shot_vqa_prints_vqav2_metrics(stage2_run, tmp_path):
    job_dir, _ = stage2_run
    result = torchrun(
        "-m",
        "blip2_internlm.evaluate",
        "--cfg-path",
        str(REPO / "configs/tiny/vqa_zeroshot.yaml"),
        "--options",
        f"model.finetuned={job_dir / 'checkpoint_0.pth'}",
        f"run.output_dir={tmp_path}",
        "datasets.shapes_vqa.generator.train=256",
    )
    printed = result.stdout[result.stdout.index("{") :]
    metrics = json.loads(printed[: printed.rindex("}") + 1])["test"]
    assert {"agg_metrics", "yes/no", "number", "other"} <= set(metrics)
    assert 0 <= metrics["agg_metrics"] <= 100


def test_caption_evaluation_scores_offline(stage2_run, tmp_path):
    job_dir, _ = stage2_run
    result = torchrun(
        "-m",
        "blip2_internlm.evaluate",
        "--cfg-path",
        str(REPO / "configs/tiny/caption_eval.yaml"),
        "--options",
        f"model.finetuned={job_dir / 'checkpoint_0.pth'}",
        f"run.output_dir={tmp_path}",
        SMALL_DATA.format("shapes_caption"),
    )
    (job,) = tmp_path.iterdir()
    scores = json.loads((job / "evaluate.txt").read_text().splitlines()[-1])["test"]
    assert scores["tokenizer"] == "char"
    assert {"exact_match", "Bleu_4", "CIDEr", "agg_metrics"} <= set(scores)
    assert "exact_match" in result.stdout
