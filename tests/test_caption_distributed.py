"""The caption command under ``torch.distributed.run``: each rank captions its share, rank 0 writes the file one
process writes, byte for byte, and a cut or failed run is finished by any number of ranks.

Two gloo ranks on the CPU, the tiny model with the trained-checkpoint fixture's weights, seven images in batches
of two: four batches, rank 0 runs two full ones, rank 1 a full one and the last, single image.
"""

import json
import os
import textwrap
from pathlib import Path

import numpy
import pytest
import torch
from conftest import torchrun
from PIL import Image, ImageDraw
from spec_helpers import run_python

BATCH = 2
COLOURS = [(220, 30, 30), (30, 60, 220), (30, 180, 40), (240, 200, 20)]
#: fast decoding: what is compared is the rows, not the captions' quality
DECODING = ["--num-beams", "2", "--max-len", "8"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Seven shapes pictures, each different (the untrained bridge tells coloured backgrounds apart): an odd
    number, so the ranks' shares are uneven."""
    folder = tmp_path_factory.mktemp("images")
    for index in range(7):
        image = Image.new("RGB", (80, 80), COLOURS[(index + 1) % 4])
        left = 6 + 8 * index
        box = (left, 20, left + 36, 56)
        (ImageDraw.Draw(image).ellipse if index % 2 else ImageDraw.Draw(image).rectangle)(box, fill=COLOURS[index % 4])
        image.save(folder / f"scene_{index}.png")
    return folder


def caption_args(checkpoint, images, out) -> list[str]:
    return [
        str(images),
        "--model-type",
        "tiny",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--batch-size",
        str(BATCH),
        "--workers",
        "0",
        "--no-progress",
        *DECODING,
    ]


def one_process(argv):
    """The command in this process, with one thread as each torchrun rank has (OMP_NUM_THREADS=1): the same
    kernels' sums on both sides."""
    from blip2_internlm.tools.caption import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tiny_trained_checkpoint, images, tmp_path_factory):
    """What one process writes: {format: bytes}."""
    _, checkpoint, _ = tiny_trained_checkpoint
    folder = tmp_path_factory.mktemp("one_process")
    written = {}
    for fmt in ("jsonl", "csv"):
        out = folder / f"captions.{fmt}"
        one_process(caption_args(checkpoint, images, out))
        written[fmt] = out.read_bytes()
    return written


@pytest.mark.kernel_sensitive  # the captions are what the tiny model, pretrained on this CPU, writes
def test_two_ranks_write_byte_for_byte_the_file_one_process_writes(
    tiny_trained_checkpoint, images, uninterrupted, tmp_path
):
    _, checkpoint, _ = tiny_trained_checkpoint
    out = tmp_path / "captions.jsonl"

    result = torchrun("-m", "blip2_internlm.tools.caption", *caption_args(checkpoint, images, out), nproc=2)

    assert out.read_bytes() == uninterrupted["jsonl"]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["image"] for row in rows] == [str(images / f"scene_{index}.png") for index in range(7)]
    # rank 0 reports for all ranks, once
    assert result.stdout.count("7 written (7 ok, 0 unreadable), 0 already there, 7 inputs") == 1


# the resumed run's batches are the uninterrupted run's (two whole rows kept, one batch): the same sums
def test_a_cut_output_finished_by_two_ranks_equals_the_uninterrupted_one(
    tiny_trained_checkpoint, images, uninterrupted, tmp_path
):
    _, checkpoint, _ = tiny_trained_checkpoint
    full = uninterrupted["csv"]
    lines = full.splitlines(keepends=True)
    kept = b"".join(lines[:3])  # the header and two rows
    out = tmp_path / "captions.csv"
    out.write_bytes(kept + lines[3][:40])  # as a kill during a write leaves it: the next row cut short

    result = torchrun("-m", "blip2_internlm.tools.caption", *caption_args(checkpoint, images, out), nproc=2)

    assert out.read_bytes() == full
    assert "5 written (5 ok, 0 unreadable), 2 already there, 7 inputs" in result.stdout


# --- a failing rank: a stand-in model whose caption is the image's grey level, and that fails on one level ---


class GreyModel(torch.nn.Module):
    """Captions an image with its grey level; raises, as a CUDA out-of-memory would, on $FAIL_ON_GREY."""

    prompt = ""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, samples, **kwargs):
        greys = [round(float(image.mean())) for image in samples["image"]]
        if str(os.environ.get("FAIL_ON_GREY")) in map(str, greys):
            raise RuntimeError(f"CUDA out of memory (grey {os.environ['FAIL_ON_GREY']})")
        return [f"grey {grey}" for grey in greys]


def load_grey_model(*args, **kwargs):
    """``load_model_and_preprocess`` for GreyModel: (model, vis processors, text processors)."""
    return GreyModel(), {"eval": lambda image: torch.from_numpy(numpy.asarray(image, dtype=numpy.float32))}, {}


#: the command under torchrun with GreyModel
GREY_WORKER = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import blip2_internlm.inference
    from test_caption_distributed import load_grey_model
    from blip2_internlm.tools.caption import main

    blip2_internlm.inference.load_model_and_preprocess = load_grey_model
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture
def greys(tmp_path, monkeypatch):
    """Seven grey images, GreyModel's worker script, the command's arguments and what one process writes."""
    import blip2_internlm.inference
    from blip2_internlm.tools.caption import main

    folder = tmp_path / "greys"
    folder.mkdir()
    for index in range(7):
        Image.new("RGB", (4, 4), (10 * index,) * 3).save(folder / f"grey_{index}.png")
    worker = tmp_path / "grey_worker.py"
    worker.write_text(GREY_WORKER, encoding="utf-8")
    args = [str(folder), "--model-type", "grey", "--batch-size", str(BATCH), "--workers", "0", "--no-progress"]
    reference = tmp_path / "reference.jsonl"
    monkeypatch.setattr(blip2_internlm.inference, "load_model_and_preprocess", load_grey_model)
    assert main([*args, "--out", str(reference)]) == 0
    return folder, worker, args, reference


def grey_ranks(worker, args, out, env=None):
    return run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), *args, "--out", str(out),
        env=env or {}, timeout=120,
    )  # fmt: skip


def test_every_row_keeps_its_own_images_text_across_ranks(greys, tmp_path):
    """A text per image (its grey level), so a row given another image's text would show, whatever a trained
    model writes on this CPU."""
    folder, worker, args, reference = greys
    out = tmp_path / "greys.jsonl"

    assert grey_ranks(worker, args, out).returncode == 0

    assert out.read_bytes() == reference.read_bytes()
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(row["image"], row["text"]) for row in rows] == [
        (str(folder / f"grey_{index}.png"), f"grey {10 * index}") for index in range(7)
    ]


def test_a_failing_rank_stops_every_rank_naming_it_and_one_process_finishes_the_file(greys, tmp_path, capsys):
    from blip2_internlm.tools.caption import main

    folder, worker, args, reference = greys
    out = tmp_path / "greys.jsonl"

    # grey 30 is image 3, in the second batch: rank 1's first
    failed = grey_ranks(worker, args, out, env={"FAIL_ON_GREY": "30"})

    assert failed.returncode != 0
    assert (
        f"error: rank 1: the batch of 2 images from {folder / 'grey_2.png'} on failed: "
        f"RuntimeError: CUDA out of memory (grey 30); {out} holds the rows before them" in failed.stderr
    )
    assert "Traceback" in failed.stderr  # the failing rank's own
    reference_lines = reference.read_bytes().splitlines(keepends=True)
    assert out.read_bytes() == b"".join(reference_lines[:BATCH])  # the first batch, rank 0's

    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0  # one process resumes what two left

    assert "5 written (5 ok, 0 unreadable), 2 already there" in capsys.readouterr().out
    assert out.read_bytes() == reference.read_bytes()
