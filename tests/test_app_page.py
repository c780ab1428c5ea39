"""The web demo's page (``blip2_internlm.tools.app.page``) run by Streamlit's ``AppTest`` on a tiny stage-2
checkpoint: hostile uploads and a busy model are messages in the page, never an exception; thin and
tiny images get a caption; over-long text is cut to its limit; a format spec typed as a prompt reaches
the model as text; and the command hands its upload limit to Streamlit.

``AppTest`` sends widget values as a client would, without the browser's own checks (the text
boxes' ``max_chars``, the uploader's size cap), which is what a hostile client does too.
"""

import sys
import threading

import pytest
from PIL import Image
from test_app_inputs import encoded, png_bomb, solid

from blip2_internlm.tools.app import PageLimits, QueueLimits

RUN_TIMEOUT = 300  # seconds; the first run builds the model


@pytest.fixture(scope="module")
def checkpoint(lavis_ready, tmp_path_factory):
    """The ``tiny`` model type's trainable weights in LAVIS's stage-2 layout (no frozen parameters)."""
    from lavis.models import load_model_and_preprocess

    from blip2_internlm.checkpoint import save_checkpoint_file

    model, _, _ = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    state = {key: value for key, value in model.state_dict().items() if key not in frozen}
    return save_checkpoint_file({"model": state, "epoch": 0}, tmp_path_factory.mktemp("app-page") / "checkpoint.pth")


def app_page(argv):
    """The script AppTest runs: the page of the installed module, as ``streamlit run`` would run it."""
    from blip2_internlm.tools.app import page

    page(argv)


def command_line(checkpoint, *flags):
    return ["--model-type", "tiny", "--checkpoint", str(checkpoint), "--device", "cpu", "--lang", "en", *flags]


def app(checkpoint, *flags):
    from streamlit.testing.v1 import AppTest

    return AppTest.from_function(app_page, args=(command_line(checkpoint, *flags),), default_timeout=RUN_TIMEOUT)


def uploaded(checkpoint, name: str, data: bytes, *flags):
    page = app(checkpoint, *flags).run()
    page.file_uploader(key="upload").upload(name, data, "image/png").run()
    return page


def generated_texts(page) -> list[str]:
    """The details lines of the caption and answer shown (each names its latency on the device)."""
    return [caption.value for caption in page.caption if " ms on cpu · " in caption.value]


def messages(elements) -> list[str]:
    return [element.value for element in elements]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "bomb.png",
            png_bomb(20_000, 20_000),
            "bomb.png has more pixels than Pillow will decode; the limit is 25,000,000 pixels (width x height).",
        ),
        ("big.png", png_bomb(6000, 6000), "big.png has 6000 x 6000 pixels; the limit is 25,000,000 pixels"),
        ("notes.png", b"plain text\n" * 10, "notes.png is not a JPEG, PNG, WebP, BMP or GIF image."),
        ("empty.png", b"", "empty.png is empty."),
        ("scan.png", encoded(solid(), "TIFF"), "scan.png is not a JPEG, PNG, WebP, BMP or GIF image."),
    ],
    ids=["bomb", "over-pixel-cap", "text-named-png", "zero-byte", "tiff-named-png"],
)
def test_a_hostile_upload_is_a_message_in_the_page_not_a_traceback(checkpoint, name, data, message):
    page = uploaded(checkpoint, name, data)
    assert not page.exception
    assert len(page.error) == 1 and page.error[0].value.startswith(message)
    assert generated_texts(page) == []  # nothing reached the model


def test_a_truncated_jpeg_upload_is_a_message_in_the_page(checkpoint):
    jpeg = encoded(Image.effect_noise((128, 128), 64).convert("RGB"), "JPEG", quality=95)
    page = uploaded(checkpoint, "cut.jpg", jpeg[: len(jpeg) // 2])
    assert not page.exception
    assert messages(page.error)[0].startswith("cut.jpg could not be decoded as an image (OSError: ")


def test_an_upload_over_the_size_flag_is_refused_by_the_page_itself(checkpoint):
    data = encoded(solid(), "PNG").ljust(1024 * 1024 + 1, b"\0")
    page = uploaded(checkpoint, "padded.png", data, "--max-upload-mb", "1")
    assert not page.exception
    assert messages(page.error) == ["padded.png is 1.0 MB; the limit is 1 MB."]


@pytest.mark.parametrize("size", [(1, 1), (16_000, 16)], ids=["1x1", "16000x16"])
def test_tiny_and_thin_images_get_a_caption(checkpoint, size):
    page = uploaded(checkpoint, "thin.png", encoded(solid(size), "PNG"))
    assert not page.exception and not page.error
    assert len(generated_texts(page)) == 1  # the caption


def test_the_page_states_its_limits(checkpoint):
    page = app(checkpoint, "--max-upload-mb", "7", "--max-question-chars", "120", "--max-prompt-chars", "90").run()
    assert not page.exception
    assert "at most 7 MB and 25,000,000 pixels" in " ".join(caption.value for caption in page.caption)
    assert page.text_input(key="question").max_chars == 120
    assert page.text_input(key="vqa_prompt_en").max_chars == 90
    assert page.text_input(key="caption_prompt_en").max_chars == 90


def ask(page, question: str):
    page.text_input(key="question").set_value(question)
    page.button[0].click()  # the form's "Ask"
    return page.run()


def test_a_format_spec_as_the_question_prompt_reaches_the_model_as_text(checkpoint, monkeypatch):
    """``{:>1000000000}`` through ``str.format`` would be a gigabyte of spaces; the model gets 15 characters."""
    from blip2_internlm.models.blip2_internlm import Blip2InternLM

    prompts = []
    generate = Blip2InternLM.generate

    def recording_generate(self, samples, *args, **kwargs):
        prompts.extend(samples.get("prompt") or [])
        return generate(self, samples, *args, **kwargs)

    monkeypatch.setattr(Blip2InternLM, "generate", recording_generate)
    page = app(checkpoint).run()
    page.text_input(key="vqa_prompt_en").set_value("{:>1000000000} {}")
    page = ask(page.run(), "what color")
    assert not page.exception and not page.error
    assert "{:>1000000000} what color" in prompts
    assert len(generated_texts(page)) == 2  # caption and answer


def test_over_long_text_from_a_client_is_cut_to_the_limit_before_the_page_uses_it(checkpoint):
    """A browser stops typing at ``max_chars``; a client that sends more has it cut by Streamlit's widget
    deserializer, so the model never sees more than the limit (the page's own check is a backstop)."""
    page = app(checkpoint, "--max-question-chars", "20", "--max-prompt-chars", "30").run()
    page.text_input(key="vqa_prompt_en").set_value("p" * 31 + " {}")
    page = ask(page.run(), "x" * 21)
    assert not page.exception and not page.error
    (caption, answer) = generated_texts(page)
    assert " · " + "x" * 20 + " · " in answer
    assert page.text_input(key="vqa_prompt_en").value == "p" * 30


def test_a_busy_model_is_a_message_and_the_next_request_is_served(checkpoint):
    from blip2_internlm.tools.app import _cached_resources, model_source, queue_limits, resolve_args

    flags = ("--max-waiting", "0", "--wait-timeout", "1")
    page = app(checkpoint, *flags).run()  # builds (or reuses) the model with these queue limits
    args = resolve_args(command_line(checkpoint, *flags))
    served = _cached_resources()[0](model_source(args), queue_limits(args))  # the page's cached model
    assert served.queue.limits == QueueLimits(max_waiting=0, wait_seconds=1)

    holding, release = threading.Event(), threading.Event()

    def hold():
        with served.queue.turn():
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        page.file_uploader(key="upload").upload("new.png", encoded(solid(color=(9, 9, 9)), "PNG"), "image/png")
        page.run()
        assert not page.exception
        assert messages(page.warning) == ["The model is busy (0 requests are already waiting); try again in a moment."]
        assert generated_texts(page) == []
    finally:
        release.set()
        holder.join(10)
    page.run()  # the same settings again: this time the model is free
    assert not page.warning and len(generated_texts(page)) == 1


def test_the_command_gives_streamlit_the_upload_limit_and_hides_tracebacks(checkpoint, monkeypatch):
    from streamlit.web import cli

    from blip2_internlm.tools.app import main

    started = {}

    def streamlit_main():
        started["argv"] = list(sys.argv)
        return 0

    monkeypatch.setattr(cli, "main", streamlit_main)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit):
        main(command_line(checkpoint, "--max-upload-mb", "3", "--max-waiting", "2", "--wait-timeout", "7.5"))
    argv = started["argv"]
    option = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--server.")}
    assert option["--server.maxUploadSize"] == "3"
    assert argv[argv.index("--client.showErrorDetails") + 1] == "none"
    page_argv = argv[argv.index("--") + 1 :]
    assert page_argv[page_argv.index("--max-upload-mb") + 1] == "3"
    assert page_argv[page_argv.index("--max-waiting") + 1] == "2"
    assert page_argv[page_argv.index("--wait-timeout") + 1] == "7.5"
    assert PageLimits().max_upload_mb == 20  # the default, when no flag is given


@pytest.fixture(scope="module")
def instruct_checkpoint(lavis_ready, tmp_path_factory):
    """The tiny instruction model's trainable weights, as instruction tuning saves them."""
    import torch

    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.factory import build_model

    torch.manual_seed(0)
    model = build_model("blip2_internlm_instruct", "tiny")
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    state = {key: value for key, value in model.state_dict().items() if key in trainable}
    return save_checkpoint_file({"model": state}, tmp_path_factory.mktemp("app-chat") / "checkpoint.pth")


def test_an_instruction_model_chats_about_the_image_turn_after_turn_and_clears(instruct_checkpoint):
    from streamlit.testing.v1 import AppTest

    argv = ["--arch", "blip2_internlm_instruct", *command_line(instruct_checkpoint)]
    argv[argv.index("--lang") + 1] = "zh"
    page = AppTest.from_function(app_page, args=(argv,), default_timeout=RUN_TIMEOUT).run()
    page.file_uploader(key="upload").upload("shape.png", encoded(solid(), "PNG"), "image/png").run()
    assert not page.exception and "对话" in messages(page.subheader)
    page.chat_input(key="chat_input").set_value("图里有圆形吗？").run()
    page.chat_input(key="chat_input").set_value("它是什么颜色？").run()
    assert not page.exception and not page.error
    assert [message.name for message in page.chat_message] == ["user", "assistant", "user", "assistant"]
    assert page.session_state.chat[2] == {"role": "user", "content": "它是什么颜色？"}
    # the reply shown is the model's answer to that history, as chat() gives it
    assert page.session_state.chat[3]["content"] == page.chat_message[3].text[0].value
    page.chat_input(key="chat_input").set_value("x" * 10_000).run()  # a client past the box's own cap
    assert len(page.session_state.chat) == 6 and len(page.session_state.chat[4]["content"]) <= 500
    page.button(key="chat_clear").click().run()
    assert not page.chat_message and page.session_state.chat == []
