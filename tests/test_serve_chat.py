"""The server on an instruction model (``blip2_internlm_instruct``, its tiny model type): a multi-turn
conversation gets the reply ``model.chat`` gives for it, concurrent conversations share one model call and
get the replies they get alone, and what a chat cannot be is a 400 naming it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_serve import (
    TIMEOUT,
    HeldModel,
    data_uri,
    image_with,
    png,
    post,
    refusal,
    running,
    user,
    wait_until,
)

from blip2_internlm.serve.server import ServeSettings

MODEL_ID = "blip2_internlm_instruct/tiny"


@pytest.fixture(scope="module")
def served(lavis_ready, tmp_path_factory):
    """The tiny instruction model (seeded, untrained: deterministic) saved as instruction tuning saves it and
    loaded as the server loads it."""
    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.factory import build_model
    from blip2_internlm.tools.app import ModelSource, load_served_model

    torch.manual_seed(0)
    model = build_model("blip2_internlm_instruct", "tiny")
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    state = {key: value for key, value in model.state_dict().items() if key in trainable}
    path = save_checkpoint_file({"model": state}, tmp_path_factory.mktemp("serve-chat") / "checkpoint.pth")
    return load_served_model(ModelSource(checkpoint=str(path), model_type="tiny", arch="blip2_internlm_instruct"))


@pytest.fixture
def app(served):
    from blip2_internlm.serve.batcher import BatchLimits
    from blip2_internlm.serve.engine import ModelRunner
    from blip2_internlm.serve.server import create_app

    runner = ModelRunner(served, "", "{}")
    return create_app(runner, ServeSettings(MODEL_ID, batch=BatchLimits(max_batch=8, window_seconds=0.05)))


def conversation(image, *turns: str) -> list[dict]:
    """OpenAI messages: the image with the first user turn, then assistant and user turns alternating."""
    messages = [user(data_uri(png(image)), turns[0])]
    for i, text in enumerate(turns[1:]):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return messages


def as_model_reads(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


@torch.inference_mode()
def chat(served, image, *turns: str, **generation) -> str:
    return served.model.chat(served.vis_processor(image), as_model_reads(*turns), **generation)


TURNS = [
    ("what shape is it?", "a circle", "what color is it?"),
    ("图里有圆形吗？", "有", "它是什么颜色？"),
    ("describe the image",),
    ("is it big?", "no", "where is it?"),
]


def test_a_two_turn_conversation_gets_the_reply_model_chat_gives(served, app):
    import openai

    turns = TURNS[0]
    expected = chat(served, image_with(1), *turns, max_length=16)
    assert expected  # an empty reply would prove nothing
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        response = client.chat.completions.create(
            model=MODEL_ID, messages=conversation(image_with(1), *turns), max_tokens=16
        )
        streamed = client.chat.completions.create(
            model=MODEL_ID, messages=conversation(image_with(1), *turns), max_tokens=16, stream=True
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == expected
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens > served.model.query_tokens.shape[1] + 10  # the rendered conversation


def test_concurrent_conversations_share_one_model_call_and_get_their_own_replies(served, app):
    import openai

    images = [image_with(i) for i in range(len(TURNS))]
    alone = [chat(served, image, *turns, max_length=16) for image, turns in zip(images, TURNS, strict=True)]
    assert len(set(alone)) > 1
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        batcher = app.state.batcher
        held = HeldModel(batcher)

        def ask(image, turns, max_tokens=16):
            response = client.chat.completions.create(
                model=MODEL_ID, messages=conversation(image, *turns), max_tokens=max_tokens
            )
            return response.choices[0].message.content

        with ThreadPoolExecutor(len(TURNS) + 1) as pool:
            plug = pool.submit(ask, images[0], TURNS[0], 4)  # another max_tokens: another batch
            assert held.entered.wait(TIMEOUT)
            futures = [pool.submit(ask, image, turns) for image, turns in zip(images, TURNS, strict=True)]
            wait_until(lambda: batcher.queued == len(TURNS))
            held.release()
            got = [future.result() for future in futures]
            plug.result()
    assert got == alone
    assert list(batcher.batch_sizes) == [1, len(TURNS)]


@pytest.mark.parametrize(
    ("messages", "extra", "message"),
    [
        ([user("IMAGE")], {}, "message 0 (user): content must be a non-empty string"),
        ([user("IMAGE", "hi"), {"role": "assistant", "content": "hello"}], {}, "must end with a user message"),
        ([user("IMAGE", "hi"), {"role": "user", "content": "again"}], {}, "a user message where a assistant"),
        ([user("IMAGE", "hi")], {"mode": "caption"}, "this model chats"),
        ([user("IMAGE", "x" * 501)], {}, "the limit is 500"),
    ],
)
def test_what_a_chat_cannot_be_answers_400(app, messages, extra, message):
    for m in messages:
        if isinstance(m["content"], list):
            m["content"][0]["image_url"]["url"] = data_uri(png(image_with(0)))
    with running(app) as url:
        error = refusal(post(url, {"model": MODEL_ID, "messages": messages, **extra}))
    assert message in error["message"]
