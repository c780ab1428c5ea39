"""The web demo (``python -m blip2_internlm.tools.app``), served from a stage-2 checkpoint and driven by a real
browser: what the page shows is what the model's ``generate`` / ``predict_answers`` return for the same
image and settings, computed here.

Debian's chromium runs headless through Playwright (no browser download).  Without it the browser
specs skip, except under CI (``$CI`` set), where a missing browser is a failure.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from spec_helpers import REPO

from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS

CHROMIUM = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: the page's initial settings
BEAMS, MAX_CAPTION, MAX_ANSWER, TOP_P = 5, 30, 10, 0.9
QUESTION = "图中的形状是什么颜色?"  # chinese_question makes the "?" full-width, as VQA evaluation does
TIMEOUT_MS = 60_000


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser specs (.ci/run installs Debian's chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium_path():
    path = next((p for p in CHROMIUM if os.access(p, os.X_OK)), None)
    if path is None:
        unavailable(f"no chromium at {' or '.join(CHROMIUM)} (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[test]')")
    return path


def perturbed_tiny_model(seed: int):
    """The tiny model type with its trainable weights moved off their initial values, as training would."""
    from lavis.models import load_model_and_preprocess

    model, vis_processors, _ = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model, vis_processors["eval"]


@pytest.fixture(scope="module")
def stage2_checkpoint(lavis_ready, tmp_path_factory):
    """A stage-2-style checkpoint (LAVIS's layout: the state dict without frozen parameters)."""
    from blip2_internlm.checkpoint import save_checkpoint_file

    model, _ = perturbed_tiny_model(seed=1)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    state = {key: value for key, value in model.state_dict().items() if key not in frozen}
    return save_checkpoint_file({"model": state, "epoch": 0}, tmp_path_factory.mktemp("app") / "checkpoint_0.pth")


@pytest.fixture(scope="module")
def reference(stage2_checkpoint):
    """The checkpoint's model, built independently of the app: LAVIS's loader plus the safe weight loader."""
    from lavis.models import load_model_and_preprocess

    from blip2_internlm.checkpoint import load_weights

    model, vis_processors, _ = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)
    load_weights(model, stage2_checkpoint)
    return model, vis_processors["eval"]


@pytest.fixture(scope="module")
def upload_image(tmp_path_factory):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (235, 235, 235))
    ImageDraw.Draw(image).rectangle((8, 20, 30, 42), fill=(30, 60, 220))
    path = tmp_path_factory.mktemp("upload") / "upload.png"
    image.save(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(chromium_path, stage2_checkpoint, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app-log") / "app.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "blip2_internlm.tools.app",
                "--model-type",
                "tiny",
                "--checkpoint",
                str(stage2_checkpoint),
                "--device",
                "cpu",
                "--port",
                str(port),
            ],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not come up (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # Streamlit and anything it started
        process.wait()


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url, upload_image):
    """A fresh session with ``upload.png`` uploaded and its caption shown."""
    from playwright.sync_api import expect

    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    page.locator("[data-testid='stFileUploader'] input[type=file]").set_input_files(upload_image)
    expect(page.locator(".st-key-caption")).to_contain_text("upload.png · 中文", timeout=TIMEOUT_MS)
    yield page
    page.close()


def shown(page, key: str, details: str) -> tuple[str, str]:
    """(text, details line) of the caption or answer once it shows ``details`` (the settings it was made with)."""
    from playwright.sync_api import expect

    block = page.locator(f".st-key-{key}")
    expect(block).to_contain_text(details, timeout=TIMEOUT_MS)
    return block.get_by_test_id("stText").inner_text(), block.get_by_test_id("stCaptionContainer").inner_text()


def image_tensor(vis_processor, path: Path):
    from PIL import Image

    return vis_processor(Image.open(path).convert("RGB")).unsqueeze(0)


def model_caption(reference, path, lang, *, num_beams=BEAMS, top_p=None, seed=0):
    model, vis_processor = reference
    if top_p is not None:
        torch.manual_seed(seed)
    (caption,) = model.generate(
        {"image": image_tensor(vis_processor, path)},
        prompt=CAPTION_PROMPTS[lang],
        num_beams=num_beams,
        max_length=MAX_CAPTION,
        use_nucleus_sampling=top_p is not None,
        top_p=top_p or 0.9,
    )
    return caption


def model_answer(reference, path, question, lang):
    model, vis_processor = reference
    (answer,) = model.predict_answers(
        {"image": image_tensor(vis_processor, path), "text_input": [question]},
        prompt=VQA_PROMPTS[lang],
        num_beams=BEAMS,
        max_len=MAX_ANSWER,
    )
    return answer


def test_the_checkpoint_decides_the_reference_outputs(reference, upload_image):
    """Precondition of the specs below: an app that ignored the checkpoint would show other text."""
    untrained, vis_processor = perturbed_tiny_model(seed=2)
    assert model_caption((untrained, vis_processor), upload_image, "zh") != model_caption(reference, upload_image, "zh")
    assert model_answer((untrained, vis_processor), upload_image, "图中的形状是什么颜色？", "zh") != model_answer(
        reference, upload_image, "图中的形状是什么颜色？", "zh"
    )


def test_an_uploaded_image_gets_the_models_caption_with_its_latency(page, reference, upload_image):
    caption, details = shown(page, "caption", "upload.png · 中文 · beam 5 · max 30 tokens")
    assert caption == model_caption(reference, upload_image, "zh")
    assert caption
    assert re.match(r"\d+ ms on cpu · ", details)


def test_a_question_is_answered_by_predict_answers_and_follows_the_language(page, reference, upload_image):
    page.get_by_role("textbox", name="Question", exact=True).fill(QUESTION)
    page.get_by_role("button", name="Ask").click()
    answer, details = shown(page, "answer", f"{QUESTION} · upload.png · 中文 · beam 5")
    assert answer == model_answer(reference, upload_image, "图中的形状是什么颜色？", "zh")
    assert re.match(r"\d+ ms on cpu · ", details)

    page.get_by_text("English", exact=True).click()
    caption, _ = shown(page, "caption", "upload.png · English · beam 5")
    answer, _ = shown(page, "answer", "upload.png · English · beam 5")
    assert caption == model_caption(reference, upload_image, "en")
    assert answer == model_answer(reference, upload_image, "图中的形状是什么颜色？", "en")


def test_sampling_and_beam_controls_reach_generate(page, reference, upload_image):
    page.get_by_text("Nucleus sampling (captions)").click()
    seed = page.get_by_label("Seed")
    seed.fill("3")
    seed.press("Enter")
    sampled, _ = shown(page, "caption", "upload.png · 中文 · sampling top-p 0.9 seed 3")
    assert sampled == model_caption(reference, upload_image, "zh", top_p=TOP_P, seed=3)

    page.get_by_text("Nucleus sampling (captions)").click()
    beam_size = page.get_by_role("slider", name="Beam size")
    beam_size.focus()
    beam_size.press("Home")
    greedy, _ = shown(page, "caption", "upload.png · 中文 · beam 1")
    assert greedy == model_caption(reference, upload_image, "zh", num_beams=1)


def test_a_decompression_bomb_upload_shows_a_message_not_a_traceback(browser, app_url, tmp_path):
    """A 48 KB PNG that claims 20,000 x 20,000 pixels, uploaded through the browser: the page says why it
    refuses it and shows no exception (docs/app.md, "Limits"; tests/test_app_page.py has the other files)."""
    from playwright.sync_api import expect
    from test_app_inputs import png_bomb

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(20_000, 20_000))
    page = browser.new_page()
    try:
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        page.locator("[data-testid='stFileUploader'] input[type=file]").set_input_files(bomb)
        expect(page.get_by_test_id("stAlertContentError")).to_have_text(
            "bomb.png has more pixels than Pillow will decode; the limit is 25,000,000 pixels (width x height).",
            timeout=TIMEOUT_MS,
        )
        expect(page.get_by_test_id("stException")).to_have_count(0)
        expect(page.locator(".st-key-caption")).to_have_count(0)
    finally:
        page.close()


def test_make_app_without_a_demo_run_says_to_run_make_demo(lavis_ready, tmp_path):
    from blip2_internlm.tools.app import main

    with pytest.raises(SystemExit) as exit_:
        main(["--from-demo", str(tmp_path / "demo")])  # what `make app` runs, before any server starts
    assert f"no stage-2 checkpoint under {tmp_path / 'demo' / 'stage2'}: run `make demo` first" in str(exit_.value)


def test_the_demo_model_is_the_newest_stage2_jobs_last_checkpoint(tmp_path):
    from blip2_internlm.tools.app import demo_stage2_checkpoint

    stage2 = tmp_path / "stage2"
    older, newer = stage2 / "20260101000000", stage2 / "20260102000000"
    for job, names in (
        (older, ["checkpoint_0.pth", "checkpoint_5.pth", "checkpoint_last.pth"]),
        (newer, ["checkpoint_2.pth", "checkpoint_10.pth"]),
    ):
        job.mkdir(parents=True)
        for name in names:
            (job / name).write_bytes(b"")
    (stage2 / "20260103000000").mkdir()  # a job that died before its first epoch
    assert demo_stage2_checkpoint(tmp_path) == newer / "checkpoint_10.pth"  # a job without checkpoint_last
    (newer / "checkpoint_last.pth").write_bytes(b"")
    assert demo_stage2_checkpoint(tmp_path) == newer / "checkpoint_last.pth"  # what the demo evaluates
