"""``python -m blip2_internlm.tools.caption``: the batch captioning / VQA command, on a tiny model trained
through stage 1 and a short stage 2 on the synthetic shapes."""

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import torchrun
from omegaconf import OmegaConf
from PIL import Image
from spec_helpers import REPO, run_python

CAPTION_EVAL = REPO / "configs/tiny/caption_eval.yaml"
BATCH = "4"  # the CLI's and the evaluation's: 16 batches over the 64 test images
QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(stage1_run, tmp_path_factory):
    """Stage 2 for five short epochs: enough for captions that depend on the image."""
    stage1_dir, _ = stage1_run
    output = tmp_path_factory.mktemp("stage2")
    torchrun(
        "-m",
        "blip2_internlm.train",
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage2.yaml"),
        "--options",
        f"model.pretrained={stage1_dir / 'checkpoint_2.pth'}",
        f"run.output_dir={output}",
        "run.max_epoch=5",
    )
    (job_dir,) = output.iterdir()
    return job_dir / "checkpoint_4.pth"


@pytest.fixture(scope="module")
def shapes(lavis_ready):
    """The held-out shapes images that configs/tiny/caption_eval.yaml evaluates on."""
    from blip2_internlm.datasets.builders import default_data_root, generator_args
    from blip2_internlm.datasets.shapes import generate_shapes

    args = generator_args(OmegaConf.load(CAPTION_EVAL).datasets.shapes_caption.generator)
    root = default_data_root(args)
    generate_shapes(root, **args)
    return Path(root)


@pytest.fixture(scope="module")
def evaluated(checkpoint, shapes, tmp_path_factory):
    """``{image_id: caption}`` of ``blip2_internlm.evaluate`` on the test split."""
    output = tmp_path_factory.mktemp("caption_eval")
    result = run_python(
        "-m",
        "blip2_internlm.evaluate",
        "--cfg-path",
        str(CAPTION_EVAL),
        "--options",
        f"model.finetuned={checkpoint}",
        f"run.output_dir={output}",
        f"run.batch_size_eval={BATCH}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = output.glob("*/result/test_epochbest.json")
    return {record["image_id"]: record["caption"] for record in json.loads(results.read_text())}


def caption_args(checkpoint, shapes, out) -> list[str]:
    """The test split's caption annotations, as the evaluation config reads them."""
    return [
        str(shapes / "annotations" / "caption_zh_test.json"),
        "--image-root",
        str(shapes),
        "--cfg-path",
        str(CAPTION_EVAL),
        "--checkpoint",
        str(checkpoint),
        "--batch-size",
        BATCH,
        "--out",
        str(out),
        *QUIET,
    ]


def run_in_process(argv) -> str:
    """The command in this process (the tiny model loads in a second, an interpreter with LAVIS
    in several); what it prints."""
    from blip2_internlm.tools.caption import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "captions.jsonl"
    return out, run_in_process(caption_args(checkpoint, shapes, out))


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def records(path):
    return json.loads(path.read_text(encoding="utf-8"))


# the command and the evaluation run the same model in the same batches of BATCH on one CPU: the same sums,
# bit for bit; what the trained checkpoint captions is this CPU's (its training ran on its kernels)
@pytest.mark.kernel_sensitive
def test_captions_equal_what_caption_evaluation_generates_for_the_same_checkpoint_and_images(
    uninterrupted, evaluated, shapes
):
    out, printed = uninterrupted
    ids = {record["image"]: record["image_id_int"] for record in records(shapes / "annotations/caption_zh_test.json")}
    captions = {ids[row["image"]]: row["text"] for row in rows(out)}
    assert captions == evaluated
    assert len(set(captions.values())) > 3, "the checkpoint should caption images differently"
    assert "64 written (64 ok, 0 unreadable)" in printed
    settings = rows(out)[0]["settings"]
    assert (settings["num_beams"], settings["max_len"], settings["min_len"]) == (3, 30, 1)  # the config's run section


# the resumed run batches the remaining images differently: equal texts need a row's sums not to depend on
# the batch's other rows (same prompt, no padding), and its decisions' gaps to exceed any GEMM-blocking change
@pytest.mark.kernel_sensitive
def test_a_killed_run_resumes_to_each_image_once_with_the_uninterrupted_texts(
    uninterrupted, checkpoint, shapes, tmp_path
):
    reference = rows(uninterrupted[0])
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "blip2_internlm.tools.caption", *caption_args(checkpoint, shapes, out)]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while process.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < 8):
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    assert 8 <= complete.count(b"\n") < len(reference), "the kill should land mid-run"
    # and as a kill during a write leaves it: the last line cut in the middle
    last_line = complete.rstrip(b"\n").rfind(b"\n") + 1
    out.write_bytes(complete[:last_line] + complete[last_line : last_line + 40])
    kept = complete[:last_line].count(b"\n")

    printed = run_in_process(caption_args(checkpoint, shapes, out))

    assert f"{kept} already there" in printed
    assert rows(out) == reference


def test_an_unreadable_image_is_an_error_row_and_counted_and_the_others_are_captioned(
    checkpoint, shapes, tmp_path, capsys
):
    from blip2_internlm.tools.caption import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        shutil.copy(shapes / "images" / "test" / f"test_{index:05d}.png", folder / f"{index}.png")
    Image.open(folder / "0.png").convert("RGB").save(tmp_path / "whole.jpg", quality=95)
    (folder / "1_corrupt.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])  # cut short
    listed = tmp_path / "list.txt"
    listed.write_text("gone.png\n")
    out = tmp_path / "captions.jsonl"

    code = main(
        [
            str(folder),
            str(listed),
            "--model-type",
            "tiny",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--workers",
            "2",
            *QUIET,
        ]
    )

    assert code == 0
    by_image = {os.path.basename(row["image"]): row for row in rows(out)}
    assert list(by_image) == ["0.png", "1.png", "1_corrupt.jpg", "2.png", "gone.png"]
    assert "truncated" in by_image["1_corrupt.jpg"]["error"].lower() and by_image["1_corrupt.jpg"]["text"] is None
    assert "gone.png" in by_image["gone.png"]["error"]
    assert all(by_image[name]["text"] and "error" not in by_image[name] for name in ("0.png", "1.png", "2.png"))
    assert "5 written (3 ok, 2 unreadable)" in capsys.readouterr().out


# the command and predict_answers run the same batches of 3 on one CPU: the same sums, bit for bit
@pytest.mark.kernel_sensitive
def test_vqa_with_questions_per_image_from_jsonl_equals_predict_answers(checkpoint, shapes, tmp_path):
    import torch

    from blip2_internlm.inference import load_model_and_preprocess
    from blip2_internlm.tiny.pretrain_text import VQA_PROMPTS
    from blip2_internlm.tools.caption import main

    asked = records(shapes / "annotations/vqa_zh_test.json")[:6]
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({key: r[key] for key in ("image", "question", "question_id")}) + "\n" for r in asked)
    )
    out = tmp_path / "answers.jsonl"

    assert (
        main(
            [
                str(questions),
                "--image-root",
                str(shapes),
                "--model-type",
                "tiny",
                "--checkpoint",
                str(checkpoint),
                "--lang",
                "zh",
                "--out",
                str(out),
                "--batch-size",
                "3",
                "--workers",
                "0",
                *QUIET,
            ]
        )
        == 0
    )

    model, vis_processors, _ = load_model_and_preprocess("blip2_internlm", "tiny", checkpoint=checkpoint)
    images = torch.stack([vis_processors["eval"](Image.open(shapes / r["image"]).convert("RGB")) for r in asked])
    expected = []
    for start in (0, 3):
        batch = {"image": images[start : start + 3], "text_input": [r["question"] for r in asked[start : start + 3]]}
        expected += model.predict_answers(batch, prompt=VQA_PROMPTS["zh"])
    answers = rows(out)
    assert [row["text"] for row in answers] == expected
    assert [(row["question"], row["question_id"]) for row in answers] == [
        (r["question"], r["question_id"]) for r in asked
    ]
    assert {row["prompt"] for row in answers} == {VQA_PROMPTS["zh"]}


def test_folder_glob_and_list_inputs_give_the_same_sorted_images(tmp_path):
    from blip2_internlm.tools.caption import collect_items

    names = ["b.png", "a.jpg", "sub/c.png", "sub/deeper/a.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    listed = tmp_path / "images.txt"
    listed.write_text("# one path per line\n" + "\n".join(sorted(names, reverse=True)) + "\n\n")

    def resolved(items):
        return [os.path.realpath(item.path) for item in items]

    expected = sorted(os.path.realpath(tmp_path / name) for name in names)
    from_folder = resolved(collect_items([tmp_path]))
    from_glob = resolved(collect_items([str(tmp_path / "**" / "*")]))
    from_list = resolved(collect_items([listed]))
    assert from_folder == from_glob == expected
    assert sorted(from_list) == expected  # a list keeps its own order
    assert resolved(collect_items([tmp_path, str(tmp_path / "*.png"), listed])) == expected  # each image once


def test_csv_output_resumes_and_a_rerun_with_other_settings_is_refused(checkpoint, shapes, tmp_path, capsys):
    from blip2_internlm.tools.caption import main

    images = [str(shapes / "images" / "test" / f"test_{index:05d}.png") for index in range(3)]
    out = tmp_path / "captions.csv"
    common = ["--model-type", "tiny", "--checkpoint", str(checkpoint), "--out", str(out), "--workers", "0", *QUIET]

    assert main([*images[:2], *common]) == 0
    assert main([*images, *common]) == 0
    assert "1 written (1 ok, 0 unreadable), 2 already there" in capsys.readouterr().out
    table = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [row["image"] for row in table] == images and all(row["text"] for row in table)
    with pytest.raises(SystemExit) as refused:
        main([*images, *common, "--num-beams", "2"])
    assert refused.value.code == 2 and "other settings" in capsys.readouterr().err


def test_usage_errors_and_a_missing_model_exit_non_zero_naming_the_cause(tmp_path, capsys):
    from blip2_internlm.tools.caption import main

    out = ["--out", str(tmp_path / "out.jsonl")]
    with pytest.raises(SystemExit) as usage:
        main([str(tmp_path / "nowhere"), "--model-type", "tiny", *out])
    assert usage.value.code == 2 and "nowhere: no such file or folder" in capsys.readouterr().err

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main([str(image), "--model-type", "tiny", "--checkpoint", str(tmp_path / "missing.pth"), *out]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main([str(image), "--model-type", "tiny", "--options", "llm_modle=x", *out]) == 2
    assert "'llm_modle'" in capsys.readouterr().err


def test_the_bench_times_the_command_loop_against_generate_on_the_same_images(lavis_ready, tmp_path):
    from blip2_internlm.tools import bench

    recorder = bench.Bench("tiny", "cpu", repeats=1, out_dir=tmp_path)
    bench.caption_cli(recorder, batches=2)

    measured = [(row["task"], row["status"], row["images"]) for row in recorder.rows]
    assert measured == [("caption_cli", "ok", 2 * recorder.batch_size)] * 2
    assert "generate" in recorder.rows[0]["variant"] and "command loop" in recorder.rows[1]["variant"]
    assert any("overhead" in note for note in recorder.notes)


def test_an_instruction_model_answers_the_instruction_for_every_image_as_chat_does(
    lavis_ready, shapes, tiny_trained_checkpoint, tmp_path, capsys
):
    import torch

    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.factory import build_model
    from blip2_internlm.tools.caption import main

    torch.manual_seed(0)
    model = build_model("blip2_internlm_instruct", "tiny")
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    checkpoint = save_checkpoint_file(
        {"model": {k: v for k, v in model.state_dict().items() if k in trainable}}, tmp_path / "instruct.pth"
    )
    images = sorted((shapes / "images" / "test").glob("*.png"))[:3]
    instruction = "Describe this image in detail."
    out = tmp_path / "described.jsonl"
    common = ["--model-type", "tiny", "--checkpoint", str(checkpoint), "--workers", "0", *QUIET]
    argv = [*map(str, images), "--arch", "blip2_internlm_instruct", *common, "--num-beams", "1", "--max-len", "12"]
    assert main([*argv, "--instruction", instruction, "--out", str(out)]) == 0
    from lavis.processors import load_processor

    processor = load_processor("blip_image_eval", OmegaConf.create({"image_size": 64}))
    asked = [{"role": "user", "content": instruction}]
    expected = [model.chat(processor(Image.open(path).convert("RGB")), asked, max_length=12) for path in images]
    assert [row["text"] for row in rows(out)] == expected
    assert {row["prompt"] for row in rows(out)} == {instruction}
    # a BLIP-2 model has no instructions to follow
    blip2 = ["--model-type", "tiny", "--checkpoint", str(tiny_trained_checkpoint[1]), "--workers", "0", *QUIET]
    with pytest.raises(SystemExit) as usage:
        main([str(images[0]), *blip2, "--instruction", instruction, "--out", str(tmp_path / "no.jsonl")])
    assert usage.value.code == 2 and "--instruction needs an instruction model" in capsys.readouterr().err
