"""The OpenAI-compatible server (``python -m blip2_internlm.serve``) on loopback, serving a tiny stage-2
checkpoint, driven by the official ``openai`` client: each answer is the text the model's own ``generate`` /
``predict_answers`` give for the same image and settings (computed here on the same model), streamed or
not; concurrent requests share one model call and get the texts they get one by one; a full queue is 429,
a request past its timeout 504; hostile images and malformed requests are 400 naming what is wrong.

The server runs in a thread of this process (uvicorn on a socket bound to port 0), so a spec can hold the
model call (``batcher.run_batch``) to make queueing deterministic.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image, ImageDraw
from test_app_inputs import png_bomb

from blip2_internlm.serve.batcher import BatchLimits
from blip2_internlm.serve.server import ServeSettings
from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS

MODEL_ID = "blip2_internlm/tiny"
TIMEOUT = 120  # seconds: any single request of these specs


# --- a server in a thread -------------------------------------------------------------------------


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on a free loopback port in a thread; its base URL; stopped (gracefully) after."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def image_with(index: int) -> Image.Image:
    """A 64 x 64 image of a coloured ellipse, different for each ``index``."""
    image = Image.new("RGB", (64, 64), (index * 40 % 255, 200 - index * 30 % 200, 90))
    ImageDraw.Draw(image).ellipse((10 + index * 3, 10, 40 + index * 2, 50), fill=(255 - index * 20, index * 25, 30))
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def user(url: str, text: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def ask(url: str, messages: list[dict], **options):
    """The openai client's chat completion; options the client does not know go in ``extra_body``."""
    extra = {key: options.pop(key) for key in ("mode", "num_beams") if key in options}
    return client(url).chat.completions.create(model=MODEL_ID, messages=messages, extra_body=extra or None, **options)


class HeldModel:
    """Wraps a batcher's model call so that it waits until :meth:`release`: requests then queue behind it."""

    def __init__(self, batcher):
        self.batcher, self.run = batcher, batcher.run_batch
        self.entered, self.released = threading.Event(), threading.Event()
        batcher.run_batch = self

    def __call__(self, key, items):
        self.entered.set()
        assert self.released.wait(TIMEOUT), "the spec never released the model"
        return self.run(key, items)

    def release(self):
        self.released.set()
        self.batcher.run_batch = self.run


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- the model and its server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_trained_checkpoint):
    """The trained tiny checkpoint as the server loads it (``tools.app.load_served_model``)."""
    from blip2_internlm.tools.app import ModelSource, load_served_model

    _, path, _ = tiny_trained_checkpoint
    return load_served_model(ModelSource(checkpoint=str(path), model_type="tiny"))


def make_app(served, tmp_root=None, **settings):
    from blip2_internlm.serve.engine import ModelRunner
    from blip2_internlm.serve.server import create_app

    batch = BatchLimits(**settings.pop("batch", {}))
    runner = ModelRunner(served, CAPTION_PROMPTS["zh"], VQA_PROMPTS["zh"])
    return create_app(runner, ServeSettings(MODEL_ID, batch=batch, image_root=tmp_root, **settings))


@pytest.fixture(scope="module")
def server(served):
    app = make_app(served)
    with running(app) as url:
        yield url, app


def pixels(served, *images) -> torch.Tensor:
    return torch.stack([served.vis_processor(image) for image in images])


@torch.inference_mode()
def caption(served, image, **decoding):
    (text,) = served.model.generate({"image": pixels(served, image)}, prompt=CAPTION_PROMPTS["zh"], **decoding)
    return text


@torch.inference_mode()
def answer(served, image, question: str, num_beams=5, max_len=10) -> str:
    from blip2_internlm.tools.app import filled_question

    question = filled_question(served, question, VQA_PROMPTS["zh"])
    samples = {"image": pixels(served, image), "text_input": [question]}
    (text,) = served.model.predict_answers(samples, prompt="{}", num_beams=num_beams, max_len=max_len)
    return text


QUESTIONS = [
    "what color is the shape?",
    "图中是什么形状？",
    "图中有几个形状？",
    "what shape is it?",
    "颜色",
    "where is it?",
]


# --- what the client gets -------------------------------------------------------------------------


def test_an_image_alone_gets_the_caption_generate_gives_in_an_openai_shaped_response(served, server):
    url, _ = server
    expected = caption(served, image_with(1), num_beams=5, max_length=30)
    assert expected  # the trained tiny model writes a caption: an empty text would prove nothing
    response = ask(url, [user(data_uri(png(image_with(1))))])
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    assert response.object == "chat.completion" and response.model == MODEL_ID and response.id.startswith("chatcmpl-")
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens > 0
    assert response.usage.prompt_tokens > served.model.query_tokens.shape[1]  # queries, <s> and the prompt
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_an_image_with_text_gets_the_answer_predict_answers_gives(served, server):
    url, _ = server
    for question in QUESTIONS[:2]:
        expected = answer(served, image_with(2), question)
        response = ask(url, [user(data_uri(png(image_with(2))), question)], max_tokens=10)
        assert response.choices[0].message.content == expected


def test_the_settings_a_request_names_reach_the_model(served, server):
    url, _ = server
    image = image_with(3)
    greedy = caption(served, image, num_beams=1, max_length=30)
    response = ask(url, [user(data_uri(png(image)))], num_beams=1, max_tokens=30)
    assert response.choices[0].message.content == greedy
    assert response.choices[0].finish_reason == "stop"  # the model ended its caption (min_length 1: not at once)
    cut = ask(url, [user(data_uri(png(image)))], num_beams=1, max_tokens=1)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1
    assert cut.choices[0].message.content == caption(served, image, num_beams=1, max_length=1)
    # mode prompt: the text is the whole prompt after the image's queries
    with torch.inference_mode():
        (expected,) = served.model.generate({"image": pixels(served, image)}, prompt="图中", num_beams=2, max_length=9)
    response = ask(url, [user(data_uri(png(image)), "图中")], mode="prompt", num_beams=2, max_tokens=9)
    assert response.choices[0].message.content == expected


def test_a_sampled_request_with_a_seed_gets_what_that_seed_gives_even_among_others(served, server):
    url, app = server
    image = image_with(4)
    texts = {}
    for seed in (3, 4):
        torch.manual_seed(seed)
        with torch.inference_mode():
            (texts[seed],) = served.model.generate(
                {"image": pixels(served, image)},
                prompt="图中",
                use_nucleus_sampling=True,
                top_p=0.9,
                temperature=1.0,
                max_length=12,
            )
    request = dict(mode="prompt", temperature=1.0, top_p=0.9, max_tokens=12)
    sizes_before = len(app.state.batcher.batch_sizes)
    with ThreadPoolExecutor(4) as pool:
        seeds = [3, 4, 3, 4]
        futures = [pool.submit(ask, url, [user(data_uri(png(image)), "图中")], seed=s, **request) for s in seeds]
        got = [future.result().choices[0].message.content for future in futures]
    assert got == [texts[s] for s in seeds]
    assert list(app.state.batcher.batch_sizes)[sizes_before:] == [1, 1, 1, 1]  # a seeded sample runs alone


def test_a_streamed_answer_concatenates_to_the_same_text(served, server):
    url, _ = server
    expected = answer(served, image_with(5), QUESTIONS[0])
    stream = ask(url, [user(data_uri(png(image_with(5))), QUESTIONS[0])], stream=True)
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # the raw stream: server-sent events ending with [DONE]
    body = {"model": MODEL_ID, "messages": [user(data_uri(png(image_with(5))))], "stream": True}
    raw = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(event.startswith("data: ") for event in events)


def test_models_and_health(server):
    url, _ = server
    assert [model.id for model in client(url).models.list()] == [MODEL_ID]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID


# --- batching -------------------------------------------------------------------------------------


def test_concurrent_requests_share_one_model_call_and_get_their_own_texts(served):
    images = [image_with(i) for i in range(6)]
    alone = [answer(served, image, question) for image, question in zip(images, QUESTIONS, strict=True)]
    assert len(set(alone)) > 1  # different answers: a mix-up between requests would show
    app = make_app(served, batch={"max_batch": 16, "window_seconds": 0.05})
    with running(app) as url:
        batcher = app.state.batcher
        held = HeldModel(batcher)
        with ThreadPoolExecutor(8) as pool:
            plug = pool.submit(ask, url, [user(data_uri(png(images[0])))])  # a caption: another batch key
            assert held.entered.wait(TIMEOUT)
            futures = [
                pool.submit(ask, url, [user(data_uri(png(image)), question)])
                for image, question in zip(images, QUESTIONS, strict=True)
            ]
            wait_until(lambda: batcher.queued == len(images))
            held.release()
            got = [future.result().choices[0].message.content for future in futures]
            plug.result()
        assert got == alone
        assert list(batcher.batch_sizes) == [1, len(images)]
        assert httpx.get(f"{url}/health").json()["largest_batch"] == len(images)


def test_a_full_queue_answers_429_with_an_openai_error(served):
    app = make_app(served, batch={"max_batch": 1, "max_queue": 1})
    with running(app) as url:
        held = HeldModel(app.state.batcher)
        request = [user(data_uri(png(image_with(1))))]
        with ThreadPoolExecutor(2) as pool:
            running_one = pool.submit(ask, url, request)
            assert held.entered.wait(TIMEOUT)
            waiting_one = pool.submit(ask, url, request)
            wait_until(lambda: app.state.batcher.queued == 1)
            with pytest.raises(openai.RateLimitError) as refused:
                ask(url, request)
            held.release()
            assert running_one.result().choices[0].message.content == waiting_one.result().choices[0].message.content
    error = refused.value.body
    assert refused.value.status_code == 429 and error["type"] == "rate_limit_error" and error["code"] == "queue_full"
    assert "--max-queue 1" in error["message"]


def test_a_request_past_its_timeout_answers_504_and_leaves_the_queue(served):
    app = make_app(served, request_timeout=0.5)
    with running(app) as url:
        held = HeldModel(app.state.batcher)
        request = [user(data_uri(png(image_with(1))))]
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(ask, url, request)
            assert held.entered.wait(TIMEOUT)
            with pytest.raises(openai.APIStatusError) as late:
                ask(url, request, num_beams=1)  # another key: it waits in the queue
            assert app.state.batcher.queued == 0  # withdrawn: it never runs
            held.release()
            with pytest.raises(openai.APIStatusError):
                first.result()  # held past its own timeout too
    assert late.value.status_code == 504 and "no answer within 0.5 s" in late.value.body["message"]
    assert list(app.state.batcher.batch_sizes) == [1]


# --- refusals -------------------------------------------------------------------------------------


def post(url: str, body) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/chat/completions", content=data, timeout=TIMEOUT)


def refusal(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (png_bomb(20_000, 20_000), "has more pixels than Pillow will decode; the limit is 25,000,000 pixels"),
        (png_bomb(6000, 6000), "has 6000 x 6000 pixels; the limit is 25,000,000 pixels"),
        (b"plain text\n" * 10, "is not a JPEG, PNG, WebP, BMP or GIF image."),
        (b"", "is empty."),
    ],
    ids=["bomb", "over-pixel-cap", "not-an-image", "empty"],
)
def test_a_hostile_image_answers_400_naming_the_image(server, data, message):
    url, app = server
    before = app.state.batcher.calls
    error = refusal(post(url, {"model": MODEL_ID, "messages": [user(data_uri(data))]}))
    assert error["message"].startswith("the image at messages.0.content.0 ") and message in error["message"]
    assert error["param"] == "messages.0.content.0.image_url.url"
    assert app.state.batcher.calls == before  # nothing reached the model


def test_local_files_are_read_only_under_the_image_root(served, server, tmp_path):
    url, _ = server
    inside, outside = tmp_path / "images", tmp_path / "private"
    inside.mkdir(), outside.mkdir()
    (inside / "shape.png").write_bytes(png(image_with(2)))
    (outside / "secret.png").write_bytes(png(image_with(3)))
    (inside / "link.png").symlink_to(outside / "secret.png")
    # without --image-root: no local file at all
    error = refusal(post(url, {"model": MODEL_ID, "messages": [user(str(inside / "shape.png"))]}))
    assert "started without --image-root" in error["message"]
    app = make_app(served, tmp_root=inside)
    with running(app) as rooted:
        expected = caption(served, image_with(2), num_beams=5, max_length=30)
        for name in ("shape.png", f"file://{inside / 'shape.png'}", str(inside / "shape.png")):
            assert ask(rooted, [user(name)]).choices[0].message.content == expected
        for name in ("../private/secret.png", str(outside / "secret.png"), f"file://{outside}/secret.png", "link.png"):
            error = refusal(post(rooted, {"model": MODEL_ID, "messages": [user(name)]}))
            assert "is outside the image root" in error["message"], name
        assert "no such file" in refusal(post(rooted, {"model": MODEL_ID, "messages": [user("nope.png")]}))["message"]
        remote = refusal(post(rooted, {"model": MODEL_ID, "messages": [user("https://example.com/x.png")]}))
        assert "only data: URIs and local files" in remote["message"]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "Field required"),
        ({"model": MODEL_ID, "messages": []}, "messages", "at least 1 item"),
        ({"model": MODEL_ID, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "Input should be"),
        (
            {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
            "messages.0.content.0",
            "'video'",
        ),
        (
            {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0.image_url.url",
            "Field required",
        ),
        ({"model": MODEL_ID, "messages": [user("data:,x")], "max_tokens": 0}, "max_tokens", "greater than or equal"),
        ({"model": MODEL_ID, "messages": [user("data:,x")], "max_tokens": 10_000}, "max_tokens", "--max-new-tokens"),
        ({"model": MODEL_ID, "messages": [user("data:,x")], "n": 2}, "n", "not supported"),
        ({"model": MODEL_ID, "messages": [user("data:,x")], "stop": ["."]}, "stop", "not supported"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "no image"}]}, None, "this one has no image"),
        ({"model": MODEL_ID, "messages": [user("data:,x"), user("data:,y")]}, None, "this one has 2 images"),
        ({"model": MODEL_ID, "messages": [user("data:,x", "q")], "temperature": 1}, "temperature", "beam search"),
        ({"model": MODEL_ID, "messages": [user("data:,x", "hi")], "mode": "caption"}, "mode", "reads no text"),
        ({"model": MODEL_ID, "messages": [user("data:,x")], "mode": "chat"}, "mode", "instruction model"),
        ({"model": MODEL_ID, "messages": [user("data:,x")], "mode": "draw"}, "mode", "Input should be"),
        ({"model": MODEL_ID, "messages": [user("data:,x", "q" * 501)]}, "messages", "the limit is 500"),
        ({"model": MODEL_ID, "messages": [user("data:image/png,x")]}, "messages.0.content.0.image_url.url", "base64"),
        (
            {"model": MODEL_ID, "messages": [user("data:x"), {"role": "assistant", "content": "a"}, user("data:y")]},
            None,
            "2 images",
        ),
        (
            {
                "model": MODEL_ID,
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    user("data:image/png;base64,AAAA", "c"),
                ],
            },
            "messages",
            "first user message",
        ),
    ],
)
def test_a_malformed_request_answers_400_naming_the_field(server, body, param, message):
    url, _ = server
    error = refusal(post(url, body))
    assert message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_a_request_for_another_model_answers_404(server):
    url, _ = server
    response = post(url, {"model": "gpt-4o", "messages": [user(data_uri(png(image_with(1))))]})
    error = refusal(response, 404)
    assert error["code"] == "model_not_found" and MODEL_ID in error["message"]


def test_a_body_over_the_limit_answers_413_before_it_is_parsed(served):
    from blip2_internlm.tools.app import PageLimits

    app = make_app(served, limits=PageLimits(max_upload_mb=1))
    with running(app) as url:
        big = data_uri(b"\0" * (6 * 1024 * 1024))  # 8 MB as base64
        error = refusal(post(url, {"model": MODEL_ID, "messages": [user(big)]}), 413)
    assert "the limit is" in error["message"]


def test_a_failing_model_answers_500_with_its_error_and_the_server_goes_on(served, server, monkeypatch):
    from blip2_internlm.serve import server as server_module

    url, app = server
    batcher = app.state.batcher
    model_call = batcher.run_batch

    def broken(key, items):
        raise RuntimeError("out of memory in a layer")

    monkeypatch.setattr(batcher, "run_batch", broken)
    error = refusal(post(url, {"model": MODEL_ID, "messages": [user(data_uri(png(image_with(1))))]}), 500)
    assert error["message"] == "the model failed: RuntimeError: out of memory in a layer"
    assert error["type"] == "server_error"
    monkeypatch.setattr(batcher, "run_batch", model_call)
    monkeypatch.setattr(server_module, "prepared_work", lambda *args: {}["a bug"])
    error = refusal(post(url, {"model": MODEL_ID, "messages": [user(data_uri(png(image_with(1))))]}), 500)
    assert error == {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    monkeypatch.undo()
    assert ask(url, [user(data_uri(png(image_with(1))))]).choices[0].message.content


# --- the command line -----------------------------------------------------------------------------


def test_the_flags_reach_the_server_settings(tiny_trained_checkpoint, tmp_path):
    from blip2_internlm.serve.cli import resolve_args, serve_settings

    _, path, _ = tiny_trained_checkpoint
    flags = ["--model-type", "tiny", "--checkpoint", str(path), "--max-batch", "8", "--batch-wait-ms", "25"]
    flags += ["--max-queue", "5", "--request-timeout", "7.5", "--image-root", str(tmp_path), "--max-upload-mb", "3"]
    settings = serve_settings(resolve_args([*flags, "--max-new-tokens", "64", "--device", "cpu"]))
    assert settings.model_id == MODEL_ID
    assert settings.batch == BatchLimits(max_batch=8, window_seconds=0.025, max_queue=5)
    assert (settings.request_timeout, settings.max_new_tokens, settings.limits.max_upload_mb) == (7.5, 64, 3)
    assert settings.image_root == tmp_path.resolve()
    defaults = serve_settings(resolve_args(["--model-type", "tiny", "--checkpoint", str(path), "--device", "cpu"]))
    assert defaults.batch == BatchLimits() and defaults.image_root is None
    assert (defaults.batch.max_batch, defaults.batch.window_seconds, defaults.batch.max_queue) == (16, 0.010, 64)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch", "0"], "--max-batch"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--image-root", "/no/such/dir"], "--image-root /no/such/dir: not a directory"),
        (["--checkpoint", "/no/such.pth"], "--checkpoint /no/such.pth: no such file"),
    ],
)
def test_a_bad_flag_stops_the_command_naming_it(tiny_trained_checkpoint, flags, message, capsys):
    from blip2_internlm.serve.cli import resolve_args

    _, path, _ = tiny_trained_checkpoint
    argv = ["--model-type", "tiny", "--checkpoint", str(path), *flags]
    with pytest.raises(SystemExit):
        resolve_args(argv)
    assert message in capsys.readouterr().err


def test_make_serve_without_a_demo_run_says_to_run_make_demo(lavis_ready, tmp_path):
    from blip2_internlm.serve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--from-demo", str(tmp_path / "demo")])  # what `make serve` runs, before any model is built
    assert "run `make demo` first" in str(exit_.value)
