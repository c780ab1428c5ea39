"""``python -m blip2_internlm.tools.caption`` against hostile inputs: damaged, disguised, huge, empty
and not-a-file images are each a row, captioned or with its error, and never end the run; an
``--out`` that the command did not write is refused and left byte for byte as it was.

One command run, on the untrained tiny model, goes over all the hostile inputs at once; the output
checks need no model (a foreign ``--out`` is refused before the model loads)."""

import contextlib
import io
import json
import os
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

QUIET = ["--no-progress"]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Random pixels: they compress badly, so cutting a file in half cuts into its pixel data."""
    channels = len(mode)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging, should a walk ever follow a symlink loop again."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


#: Each hostile input, by its name in the output, and what its row holds: a caption (None), or an
#: error containing this text.
OUTCOMES = {
    # in the folder: what a folder walk finds, sorted
    "16bit_gray.png": None,
    "bomb_10000x10000.png": "image too large: 10000 x 10000 = 100000000 pixels, limit 89478485 (--max-pixels)",
    "bomb_20000x20000.png": "image too large: 20000 x 20000 = 400000000 pixels, limit 89478485 (--max-pixels)",
    "cmyk.jpg": None,
    "empty.png": "cannot decode image: cannot identify image file",
    "inside.png": None,  # in folder.jpg/: a folder named like an image is walked as a folder
    "one_pixel.png": None,
    "png_named.jpg": None,
    "text_named.png": "cannot decode image: cannot identify image file",
    "truncated.jpg": "cannot decode image: image file is truncated",
    "truncated.png": "cannot decode image: image file is truncated",
    "wide_16000x16.png": None,
    # named in a list: what a folder walk and a glob skip, not being regular files
    "folder.jpg": "cannot decode image: not an image file but a folder",
    "loop.png": "cannot decode image: [Errno 40] Too many levels of symbolic links",
    "pipe.png": "cannot decode image: not an image file but a named pipe",
    "/dev/null": "cannot decode image: not an image file but a device",
}


def make_hostile_inputs(root):
    """The hostile folder (with two symlinks back up the tree) and a list naming what is not a regular file."""
    folder = root / "hostile"
    folder.mkdir()
    noise(64, 64).save(root / "whole.jpg", quality=95)
    noise(64, 64).save(root / "whole.png")
    (folder / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:1500])
    (folder / "truncated.png").write_bytes((root / "whole.png").read_bytes()[:4000])
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb_20000x20000.png").write_bytes(png_claiming(20000, 20000))  # above twice PIL's limit: PIL raises
    (folder / "bomb_10000x10000.png").write_bytes(png_claiming(10000, 10000))  # between: PIL only warns, then decodes
    noise(32, 32).save(folder / "png_named.jpg", format="PNG")
    (folder / "text_named.png").write_text("not an image, whatever the name says\n")
    noise(1, 1).save(folder / "one_pixel.png")
    noise(16000, 16).save(folder / "wide_16000x16.png")
    Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).save(folder / "16bit_gray.png")
    noise(32, 32).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "folder.jpg").mkdir()
    noise(8, 8).save(folder / "folder.jpg" / "inside.png")
    os.symlink("loop.png", folder / "loop.png")
    os.mkfifo(folder / "pipe.png")
    os.symlink(".", folder / "here")  # two links back up: a glob that follows them never ends
    os.symlink("..", folder / "up")
    listed = root / "not_files.txt"
    listed.write_text("hostile/folder.jpg\nhostile/loop.png\nhostile/pipe.png\n/dev/null\n")
    return folder, listed


def run_in_process(argv) -> str:
    from blip2_internlm.tools.caption import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), deadline(300):
        assert main(argv) == 0
    return printed.getvalue()


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def short_name(image: str) -> str:
    return image if image.startswith("/dev/") else os.path.basename(image)


@pytest.fixture(scope="module")
def hostile_run(lavis_ready, tmp_path_factory):
    """The folder, a glob over it and the list, in one run of the untrained tiny model:
    (inputs, options, output file, what it printed)."""
    root = tmp_path_factory.mktemp("hostile")
    folder, listed = make_hostile_inputs(root)
    out = root / "captions.jsonl"
    inputs = [str(folder), str(folder / "**" / "*"), str(listed)]
    options = ["--model-type", "tiny", "--out", str(out), "--batch-size", "4", "--workers", "2", "--max-len", "5"]
    return inputs, options + QUIET, out, run_in_process(inputs + options + QUIET)


def test_every_hostile_input_is_one_row_captioned_or_with_its_error_and_the_run_finishes(hostile_run):
    _, _, out, printed = hostile_run
    written = rows(out)

    assert [short_name(row["image"]) for row in written] == list(OUTCOMES)  # each once, in input order
    for row in written:
        expected = OUTCOMES[short_name(row["image"])]
        if expected is None:
            assert isinstance(row["text"], str) and "error" not in row, row
        else:
            assert row["text"] is None and expected in row["error"], row
    captioned = sum(expected is None for expected in OUTCOMES.values())
    assert f"{len(OUTCOMES)} written ({captioned} ok, {len(OUTCOMES) - captioned} unreadable)" in printed


def test_a_rerun_resumes_past_the_unreadable_rows_and_max_pixels_applies_to_the_new_images(hostile_run, tmp_path):
    inputs, options, out, _ = hostile_run
    before = out.read_bytes()
    new = tmp_path / "new.png"
    noise(16, 16).save(new)

    printed = run_in_process([*inputs, str(new), *options, "--max-pixels", "255"])

    assert out.read_bytes().startswith(before)
    (added,) = rows(out)[len(OUTCOMES) :]
    assert added["error"] == "image too large: 16 x 16 = 256 pixels, limit 255 (--max-pixels)"
    assert f"1 written (0 ok, 1 unreadable), {len(OUTCOMES)} already there" in printed


def test_the_size_is_checked_from_the_header_and_pils_own_limit_is_left_as_it_was(tmp_path):
    import torch

    from blip2_internlm.tools.caption import DEFAULT_MAX_PIXELS, ImageFiles, Item

    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's default decompression-bomb limit
    image, bomb = tmp_path / "16x16.png", tmp_path / "bomb.png"
    noise(16, 16).save(image)
    bomb.write_bytes(png_claiming(20000, 20000))
    items = [Item(str(path), str(path)) for path in (image, bomb)]

    def files(max_pixels):
        return ImageFiles(items, lambda picture: torch.zeros(3, 2, 2), max_pixels)

    assert files(256)[0][2] is None  # at the limit: decoded
    assert files(255)[0][2] == "image too large: 16 x 16 = 256 pixels, limit 255 (--max-pixels)"
    assert files(DEFAULT_MAX_PIXELS)[1][2].startswith("image too large: 20000 x 20000")
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS


def test_a_glob_does_not_follow_symlinks_back_up_the_tree(tmp_path):
    from blip2_internlm.tools.caption import collect_items

    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.png"):
        noise(8, 8).save(tmp_path / name)
    for name, target in (("sub/here", "."), ("sub/up", ".."), ("up", ".")):
        os.symlink(target, tmp_path / name)

    with deadline(60):
        found = collect_items([str(tmp_path / "**" / "*.png")])

    assert [item.image for item in found] == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")]


# --- an --out the command did not write ----------------------------------------------------------

ROW = (
    '{"image": "a.png", "prompt": "", "text": "x", "settings": {"mode": "caption", "num_beams": 5, '
    '"max_len": 30, "min_len": 1, "sample": false, "model": {"arch": "blip2_internlm", "model_type": "tiny"}}}\n'
)

FOREIGN_OUTPUTS = {
    "one JSON line without a newline": (
        "out.jsonl",
        b'{"caption": "a cat"}',
        "its last line, line 1, has no newline and is not the start of a row",
    ),
    "one JSON line, another tool's": (
        "out.jsonl",
        b'{"image": "a.png", "caption": "a cat"}\n',
        "line 1 is not a row: no 'prompt', 'settings', 'text'",
    ),
    "a row, then a line of something else": ("out.jsonl", ROW.encode() + b"total: 1\n", "line 2 is not JSON"),
    "a row with a key the command never writes": (
        "out.jsonl",
        ROW.replace('"text"', '"caption"').encode(),
        "line 1 is not a row: no 'text'",
    ),
    "a LAVIS annotation file": (
        "out.jsonl",
        b'[\n  {"image": "a.png", "caption": "a cat"}\n]\n',
        "line 1 is not JSON",
    ),
    "an image": ("out.jsonl", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\n", "it is not UTF-8 text"),
    "a CSV with other columns": ("out.csv", b"image,caption\na.png,a cat\n", "its header is ['image', 'caption']"),
}


@pytest.mark.parametrize("case", FOREIGN_OUTPUTS)
def test_an_out_file_this_command_did_not_write_is_refused_naming_why_and_left_byte_for_byte(case, tmp_path, capsys):
    from blip2_internlm.tools.caption import main

    name, content, why = FOREIGN_OUTPUTS[case]
    out = tmp_path / name
    out.write_bytes(content)
    image = tmp_path / "a.png"
    noise(8, 8).save(image)

    with pytest.raises(SystemExit) as refused:
        main([str(image), "--model-type", "tiny", "--out", str(out), *QUIET])

    error = capsys.readouterr().err
    assert refused.value.code == 2
    assert f"{out}: not an output of this command ({why}" in error, error
    assert out.read_bytes() == content


def test_a_folder_as_out_is_a_usage_error(tmp_path, capsys):
    from blip2_internlm.tools.caption import main

    image = tmp_path / "a.png"
    noise(8, 8).save(image)
    with pytest.raises(SystemExit) as refused:
        main([str(image), "--model-type", "tiny", "--out", str(tmp_path), *QUIET])
    assert refused.value.code == 2 and f"{tmp_path}: --out is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("rows_before_the_cut", [0, 2])
def test_a_last_line_cut_by_a_kill_is_still_resumed_and_only_it_is_cut_off(fmt, rows_before_the_cut, tmp_path):
    from blip2_internlm.tools.caption import GenerationSettings, Item, RowWriter, output_row, read_done

    generation = GenerationSettings(mode="caption", prompt="", num_beams=5, max_len=30, min_len=1)
    out = tmp_path / f"captions.{fmt}"
    with RowWriter(out, fmt) as writer:
        writer.write([output_row(Item(f"{n}.png", f"{n}.png"), generation, "中文") for n in range(3)])
    lines = out.read_bytes().splitlines(keepends=True)
    header = lines[:1] if fmt == "csv" else []
    kept = b"".join(header + lines[len(header) : len(header) + rows_before_the_cut])
    cut_line = lines[len(header) + rows_before_the_cut]
    mid_character = cut_line.index("中".encode()) + 1
    for cut in (cut_line[:1], cut_line[:mid_character], cut_line[:-1]):  # a byte, mid character, all but the newline
        out.write_bytes(kept + cut)
        done = read_done(out, fmt, generation.settings(), generation.prompt)
        assert done == {(f"{n}.png", None) for n in range(rows_before_the_cut)}
        assert out.read_bytes() == kept
    if fmt == "csv":  # a header cut short
        out.write_bytes(header[0][:5])
        assert read_done(out, fmt, generation.settings(), generation.prompt) == set()
        assert out.read_bytes() == b""
