"""Streaming (``stream=True``) sends text as the model decodes it, not after: a greedy or sampled request's
first piece reaches the client while its model call is still running, batched requests stream each their
own text, and the pieces join to the text a plain request gets.  The pieces are settled text only (what no
later token can change), a batch retried request by request sends nothing twice, and a model that fails
mid-answer ends the stream with an error the client raises."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from test_serve import TIMEOUT, ask, data_uri, image_with, make_app, pixels, png, running, user

from blip2_internlm.serve.streaming import SettledText, TokenTap

PROMPTS = ["图中", "图中的形状", "这是", "图片描述："]


@pytest.fixture(scope="module")
def served(tiny_trained_checkpoint):
    from blip2_internlm.tools.app import ModelSource, load_served_model

    _, path, _ = tiny_trained_checkpoint
    return load_served_model(ModelSource(checkpoint=str(path), model_type="tiny"))


@torch.inference_mode()
def greedy(served, image, prompt: str, max_length: int = 16) -> str:
    (text,) = served.model.generate({"image": pixels(served, image)}, prompt=prompt, num_beams=1, max_length=max_length)
    return text


def streamed(url: str, image, prompt: str, max_length: int = 16) -> list[str]:
    """The content pieces of a streamed greedy ``prompt`` request, in order."""
    chunks = ask(
        url, [user(data_uri(png(image)), prompt)], mode="prompt", num_beams=1, max_tokens=max_length, stream=True
    )
    return [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]


# --- settled text ---------------------------------------------------------------------------------


def test_only_text_no_later_token_can_change_is_reported(served):
    """Fed token by token, every report is the beginning of the finished text; an end that a later token
    may still cut (punctuation that ``predict_answers`` strips, a space) waits until text follows it."""
    from blip2_internlm.models.blip2_internlm import _TRAILING_PUNCT

    model = served.model
    tokenizer = model.llm_tokenizer

    def finished(text: str) -> str:  # predict_answers' answer: the first line, its trailing punctuation cut
        return _TRAILING_PUNCT.sub("", model.finished_text(text))

    for text in ["红色的圆形。", "a red circle, on the left. yes", "蓝色，左边。\n下一行", "it is red ."]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reports: list[str] = []
        row = SettledText(tokenizer, model.stop_token_ids, model.finished_text, reports.append)
        for token in ids:
            row.add(token)
        final = finished(tokenizer.decode(ids, skip_special_tokens=True))
        assert reports, text
        assert all(final.startswith(report) for report in reports), (text, reports, final)
        assert all(len(a) < len(b) for a, b in zip(reports, reports[1:], strict=False))  # each report adds text
        assert not any(report[-1] in "。，,. " for report in reports)  # an unsettled end is held back
    # the stop token ends the row: later tokens (padding in a batch) add nothing
    reports = []
    row = SettledText(tokenizer, model.stop_token_ids, model.finished_text, reports.append)
    for token in tokenizer("红色 圆形", add_special_tokens=False)["input_ids"] + [model.stop_token_ids[0]]:
        row.add(token)
    settled = list(reports)
    for token in tokenizer(" 蓝色", add_special_tokens=False)["input_ids"]:
        row.add(token)
    assert reports == settled and reports[-1] == "红色 圆形"


def test_the_tap_follows_every_row_and_stops_nothing(served):
    model = served.model
    rows = [SettledText(model.llm_tokenizer, model.stop_token_ids, model.finished_text, lambda text: None), None]
    tap = TokenTap(rows)
    ids = model.llm_tokenizer(["红色", "蓝色"], add_special_tokens=False)["input_ids"]
    done = tap(torch.tensor([[ids[0][0]], [ids[1][0]]]), None)
    assert done.tolist() == [False, False] and rows[0].ids == [ids[0][0]]
    with pytest.raises(RuntimeError, match="follows 2 rows; the decoding loop has 3"):
        tap(torch.zeros(3, 1, dtype=torch.long), None)


# --- on the server --------------------------------------------------------------------------------


@pytest.mark.kernel_sensitive  # the text it streams is what the tiny model, pretrained on this CPU, writes
def test_the_first_piece_reaches_the_client_while_the_model_still_decodes(served):
    """The model's thread waits, after the first text it reports, until the client holds a piece: a server
    that sent text only after decoding would never let it go on (the wait would time out)."""
    app = make_app(served)
    runner = app.state.runner
    client_has_text, model_waited = threading.Event(), []
    run = runner.run

    def run_held_after_first_text(settings, batch):
        for work in batch:
            listener = work.listener

            def held(text, listener=listener):
                listener(text)
                if not model_waited:
                    model_waited.append(client_has_text.wait(TIMEOUT))

            work.listener = held if listener is not None else None
        return run(settings, batch)

    runner.run = run_held_after_first_text
    # the longest of a few greedy texts (what the tiny model writes depends on the CPU that trained it)
    image, prompt, expected = max(
        ((image_with(i), prompt, greedy(served, image_with(i), prompt)) for i in (6, 7) for prompt in PROMPTS),
        key=lambda case: len(case[2]),
    )
    assert expected  # some text: the model thread reports it while it decodes
    with running(app) as url:
        chunks = ask(url, [user(data_uri(png(image)), prompt)], mode="prompt", num_beams=1, max_tokens=16, stream=True)
        pieces = []
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                client_has_text.set()
    assert model_waited == [True]  # the model went on because the client had its first piece
    assert "".join(pieces) == expected


def test_batched_streams_each_get_their_own_text_and_plain_requests_beside_them_theirs(served):
    images = [image_with(i) for i in range(4)]
    expected = [greedy(served, image, prompt) for image, prompt in zip(images, PROMPTS, strict=True)]
    assert len(set(expected)) > 1  # a mix-up between rows would show
    app = make_app(served, batch={"max_batch": 8, "window_seconds": 0.5})
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        sizes_before = len(app.state.batcher.batch_sizes)

        def plain(url, image, prompt):
            response = ask(url, [user(data_uri(png(image)), prompt)], mode="prompt", num_beams=1, max_tokens=16)
            return response.choices[0].message.content

        futures = [
            pool.submit(streamed if i % 2 == 0 else plain, url, image, prompt)
            for i, (image, prompt) in enumerate(zip(images, PROMPTS, strict=True))
        ]
        got = [future.result() for future in futures]
        assert list(app.state.batcher.batch_sizes)[sizes_before:] == [4]  # one model call for all four
    assert ["".join(got[0]), got[1], "".join(got[2]), got[3]] == expected


def test_a_batch_retried_request_by_request_sends_no_text_twice(served):
    """A batch that fails after streaming its text is run again request by request (the batcher's retry):
    each stream still holds its text once."""
    images = [image_with(7), image_with(8)]
    expected = [greedy(served, image, prompt) for image, prompt in zip(images, PROMPTS, strict=False)]
    app = make_app(served, batch={"max_batch": 8, "window_seconds": 0.5})
    runner = app.state.runner
    run = runner.run

    def failing_once_batched(settings, batch):
        results = run(settings, batch)  # the text was streamed
        if len(batch) > 1:
            raise RuntimeError("lost the batch after decoding it")
        return results

    runner.run = failing_once_batched
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(streamed, url, image, prompt) for image, prompt in zip(images, PROMPTS, strict=False)]
        got = ["".join(future.result()) for future in futures]
        assert list(app.state.batcher.batch_sizes)[-3:] == [2, 1, 1]
    assert got == expected


def test_a_model_failing_mid_answer_ends_the_stream_with_an_error_the_client_raises(served):
    app = make_app(served)
    runner = app.state.runner

    def failing_after_some_text(settings, batch):
        batch[0].listener("红色")
        raise RuntimeError("out of memory in the middle")

    runner.run = failing_after_some_text
    with running(app) as url:
        chunks = ask(url, [user(data_uri(png(image_with(1))), "图中")], mode="prompt", num_beams=1, stream=True)
        pieces = []
        with pytest.raises(openai.APIError, match="the model failed: RuntimeError: out of memory in the middle"):
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["红色"]


def test_a_model_failing_before_any_text_still_gets_its_status(served):
    app = make_app(served)

    def failing(settings, batch):
        raise RuntimeError("broken before a token")

    app.state.runner.run = failing
    with running(app) as url, pytest.raises(openai.InternalServerError, match="broken before a token"):
        list(ask(url, [user(data_uri(png(image_with(1))), "图中")], mode="prompt", num_beams=1, stream=True))
