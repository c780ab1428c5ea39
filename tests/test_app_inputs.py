"""What the web demo (``blip2_internlm.tools.app``) accepts from a visitor, without a model: the image
reader's size, pixel and format checks on hostile files, the prompt template filled without
``str.format``, the length check, the bounded generation queue, and the command's limit flags.

Every hostile file is generated here, a few KB each: a PNG whose header claims 20,000 x 20,000
pixels (a real decompression bomb: its IDAT inflates to that many zero pixels), a truncated JPEG,
an empty file, a text file named ``.png``, a TIFF named ``.png``; and the thin or tiny images that
must still be accepted (1 x 1, 16,000 x 16).
"""

import io
import struct
import threading
import time
import zlib

import pytest
from PIL import Image, ImageFile

from blip2_internlm.tools.app import (
    IMAGE_FORMATS,
    Busy,
    GenerationQueue,
    PageLimits,
    QueueLimits,
    Refused,
    argument_parser,
    check_length,
    fill_prompt,
    read_image,
)

LIMITS = PageLimits()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: all-zero rows compress to almost nothing."""
    row = b"\0" + bytes((width + 7) // 8)  # filter byte, then the packed pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def encoded(image, format_: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format_, **options)
    return buffer.getvalue()


def solid(size=(32, 32), color=(200, 30, 30)):
    return Image.new("RGB", size, color)


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the spec: what is refused must be refused from the header."""

    def load(self):
        raise AssertionError(f"{self.size} pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


# --- images -----------------------------------------------------------------------------------


def test_a_png_claiming_20000_by_20000_pixels_is_refused_with_a_message(no_decoding):
    bomb = png_bomb(20_000, 20_000)
    assert len(bomb) < 64 * 1024  # the 48 KB bomb
    with pytest.raises(Refused) as refusal:
        read_image(bomb, "bomb.png", LIMITS)
    assert str(refusal.value) == (
        "bomb.png has more pixels than Pillow will decode; the limit is 25,000,000 pixels (width x height)."
    )


def test_an_image_over_the_pixel_cap_but_under_pillows_is_refused_from_its_header(no_decoding):
    with pytest.raises(Refused, match=r"^big\.png has 6000 x 6000 pixels; the limit is 25,000,000 pixels"):
        read_image(png_bomb(6000, 6000), "big.png", LIMITS)
    with pytest.raises(Refused, match=r"has 101 x 100 pixels; the limit is 10,000 pixels"):
        read_image(encoded(solid((101, 100)), "PNG"), "small.png", PageLimits(max_image_pixels=10_000))


def test_a_file_over_the_upload_limit_is_refused_before_it_is_parsed(monkeypatch):
    limits = PageLimits(max_upload_mb=1)
    at_limit = encoded(solid(), "PNG").ljust(1024 * 1024, b"\0")  # trailing bytes after IEND are ignored
    assert read_image(at_limit, "at-limit.png", limits).size == (32, 32)
    monkeypatch.setattr(Image, "open", None)  # not even the header is read
    with pytest.raises(Refused, match=r"^over\.png is 1\.0 MB; the limit is 1 MB\.$"):
        read_image(at_limit + b"\0", "over.png", limits)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.png", b"", "empty.png is empty."),
        ("notes.png", b"not an image, just text\n" * 20, "notes.png is not a JPEG, PNG, WebP, BMP or GIF image."),
        ("scan.png", encoded(solid(), "TIFF"), "scan.png is not a JPEG, PNG, WebP, BMP or GIF image."),
        ("icon.png", encoded(solid((16, 16)), "ICO"), "icon.png is not a JPEG, PNG, WebP, BMP or GIF image."),
    ],
    ids=["zero-byte", "text-named-png", "tiff-named-png", "ico-named-png"],
)
def test_anything_but_an_allowed_format_is_refused_whatever_its_name(name, data, message):
    with pytest.raises(Refused) as refusal:
        read_image(data, name, LIMITS)
    assert str(refusal.value) == message


def test_a_truncated_jpeg_is_refused_not_padded(lavis_ready):
    """``lavis_ready`` imports LAVIS, which turns on Pillow's LOAD_TRUNCATED_IMAGES; this package turns it off."""
    jpeg = encoded(Image.effect_noise((128, 128), 64).convert("RGB"), "JPEG", quality=95)
    with pytest.raises(Refused, match=r"^cut\.jpg could not be decoded as an image \(OSError: "):
        read_image(jpeg[: len(jpeg) // 2], "cut.jpg", LIMITS)


@pytest.mark.parametrize("format_", IMAGE_FORMATS)
def test_every_allowed_format_is_read_as_rgb(format_):
    image = read_image(encoded(solid(color=(0, 0, 255)), format_), "upload", LIMITS)
    assert (image.mode, image.size) == ("RGB", (32, 32))
    red, green, blue = image.getpixel((16, 16))
    assert blue > 200 and red < 40 and green < 40


def test_the_content_decides_the_format_not_the_name():
    assert read_image(encoded(solid(), "JPEG"), "photo.png", LIMITS).size == (32, 32)


def test_an_animated_gif_is_read_as_its_first_frame():
    frames = [solid((8, 8), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    image = read_image(gif, "animated.gif", LIMITS)
    assert image.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("size", [(1, 1), (16_000, 16)], ids=["1x1", "16000x16"])
def test_tiny_and_thin_images_within_the_limits_are_accepted(size):
    image = read_image(encoded(solid(size), "PNG"), "thin.png", LIMITS)
    assert (image.mode, image.size) == ("RGB", size)


# --- prompts and lengths --------------------------------------------------------------------------


def test_a_format_spec_in_a_prompt_is_plain_text():
    """``"{:>1000000000}".format(q)`` would build a gigabyte string; here it is 14 characters of prompt."""
    assert fill_prompt("{:>1000000000} {}", "q") == "{:>1000000000} q"
    assert fill_prompt("{0.__class__} {} {x}", "q") == "{0.__class__} q {x}"


def test_every_placeholder_is_filled_and_a_template_without_one_gets_the_question_appended():
    assert fill_prompt("Question: {} Short answer:", "why") == "Question: why Short answer:"
    assert fill_prompt("{} / {}", "a") == "a / a"
    assert fill_prompt("Question: ", "why") == "Question: why"  # what predict_answers does without {}
    assert fill_prompt("", "why") == "why"
    assert fill_prompt("{}", "{}") == "{}"  # a question is never read as a template


def test_a_text_over_its_limit_is_refused_naming_what_and_how_long():
    check_length("question", "x" * 500, 500)
    with pytest.raises(Refused, match=r"^The question has 501 characters; the limit is 500\.$"):
        check_length("question", "x" * 501, 500)


# --- the queue --------------------------------------------------------------------------------------


class Holder:
    """A thread that holds the model's turn until released."""

    def __init__(self, queue: GenerationQueue):
        self.entered, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.hold, args=(queue,), daemon=True)
        self.thread.start()
        assert self.entered.wait(10)

    def hold(self, queue):
        with queue.turn():
            self.entered.set()
            self.release.wait(30)

    def done(self):
        self.release.set()
        self.thread.join(10)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_take_turns_first_come_first_served():
    queue = GenerationQueue(QueueLimits(max_waiting=3, wait_seconds=30))
    holder, served = Holder(queue), []

    def request(number):
        with queue.turn():
            served.append(number)

    waiters = []
    for number in range(3):
        waiters.append(threading.Thread(target=request, args=(number,)))
        waiters[-1].start()
        wait_until(lambda n=number: queue.waiting == n + 1)  # in line before the next one comes
    holder.done()
    for waiter in waiters:
        waiter.join(10)
    assert served == [0, 1, 2]
    assert queue.waiting == 0


def test_beyond_max_waiting_a_request_is_told_busy_at_once():
    queue = GenerationQueue(QueueLimits(max_waiting=2, wait_seconds=30))
    holder, served = Holder(queue), []

    def request():
        with queue.turn():
            served.append(True)

    waiters = [threading.Thread(target=request) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    wait_until(lambda: queue.waiting == 2)
    started = time.monotonic()
    with pytest.raises(Busy, match=r"^The model is busy \(2 requests are already waiting\); try again"):
        with queue.turn():
            pass
    assert time.monotonic() - started < 5  # not after the 30 s wait
    holder.done()
    for waiter in waiters:
        waiter.join(10)
    assert served == [True, True]  # the ones in line were served


def test_a_request_that_waits_too_long_is_told_busy_and_leaves_the_line():
    queue = GenerationQueue(QueueLimits(max_waiting=4, wait_seconds=0.2))
    holder = Holder(queue)
    with pytest.raises(Busy, match=r"^The model stayed busy for 0\.2 s; try again in a moment\.$"):
        with queue.turn():
            pass
    assert queue.waiting == 0
    holder.done()
    with queue.turn():  # free again: no wait
        pass


def test_with_no_waiting_allowed_only_the_running_request_is_served():
    queue = GenerationQueue(QueueLimits(max_waiting=0, wait_seconds=30))
    with queue.turn():
        pass  # a free model is taken whatever the limit
    holder = Holder(queue)
    with pytest.raises(Busy, match=r"\(0 requests are already waiting\)"):
        with queue.turn():
            pass
    holder.done()


def test_a_failed_generation_frees_the_model_for_the_next_request():
    queue = GenerationQueue(QueueLimits(max_waiting=1, wait_seconds=0.5))
    with pytest.raises(RuntimeError, match="the model failed"):
        with queue.turn():
            raise RuntimeError("the model failed")
    with queue.turn():
        pass


# --- flags --------------------------------------------------------------------------------------


def test_the_limit_flags_and_their_defaults():
    args = argument_parser().parse_args(["--model-type", "tiny"])
    assert (args.max_upload_mb, args.max_image_pixels, args.max_prompt_chars, args.max_question_chars) == (
        LIMITS.max_upload_mb,
        LIMITS.max_image_pixels,
        LIMITS.max_prompt_chars,
        LIMITS.max_question_chars,
    )
    assert (args.max_waiting, args.wait_timeout) == (QueueLimits().max_waiting, QueueLimits().wait_seconds)
    assert (LIMITS.max_upload_mb, LIMITS.max_prompt_chars, QueueLimits().max_waiting) == (20, 500, 4)


@pytest.mark.parametrize(
    "flag", ["--max-upload-mb=0", "--max-image-pixels=-1", "--max-waiting=-1", "--wait-timeout=0", "--wait-timeout=nan"]
)
def test_a_limit_out_of_range_is_an_argument_error(flag, capsys):
    with pytest.raises(SystemExit):
        argument_parser().parse_args(["--model-type", "tiny", flag])
    assert flag.split("=")[0] in capsys.readouterr().err
