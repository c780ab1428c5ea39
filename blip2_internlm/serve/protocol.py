"""The OpenAI chat-completions wire format: the request as parsed, the responses and errors as sent.

Only what this server reads is modelled; other OpenAI fields are accepted and ignored, except those whose
silent omission would change the answer (:data:`UNSUPPORTED`), which are refused naming the field.
Two fields extend the format (the openai client's ``extra_body``): ``mode`` and ``num_beams``
(docs/serve.md, "Requests").
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MODES = ("caption", "answer", "prompt", "chat")


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- the request ------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    # extensions (extra_body)
    mode: Literal["caption", "answer", "prompt", "chat"] | None = None
    num_beams: int | None = Field(default=None, ge=1, le=10)

    @property
    def include_usage(self) -> bool:
        """A streamed response ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)


#: OpenAI fields whose value this server cannot honour, with the value that means "not used".
UNSUPPORTED = {
    "n": (None, 1),
    "stop": (None, [], ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
}


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request in ``body``, or a 400 :class:`ApiError` naming the first bad field (``param``, e.g.
    ``messages.0.content.1.image_url.url``)."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors()
        if errors[0]["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {errors[0]['msg']}") from None
        # of a union's failed members, the one that got furthest says what is wrong (a bad part of a list of
        # parts, not "content: Input should be a valid string")
        paths = [field_path(error["loc"]) for error in errors]
        deepest = max(range(len(errors)), key=lambda i: len(paths[i]))
        where = ".".join(map(str, paths[deepest]))
        message = f"{where or 'the request'}: {errors[deepest]['msg']}"
        raise ApiError(400, message, param=where or None) from None
    for name, unused in UNSUPPORTED.items():
        value = (request.model_extra or {}).get(name)
        if value not in unused:
            raise ApiError(400, f"{name}={value!r:.80} is not supported by this server", param=name)
    return request


def field_path(location) -> list:
    """A pydantic error location without its names of union members (``str``, ``list[...]``, and the part
    type after a part's index): the fields and indices of the request, ``messages.0.content.1.image_url.url``."""
    path, previous = [], None
    for part in location:
        tag = part in ("text", "image_url") and isinstance(previous, int) and path[-2:-1] == ["content"]
        previous = part
        if part == "str" or (isinstance(part, str) and "[" in part) or tag:
            continue  # a union member's name, or the discriminator's tag before the part's own fields
        path.append(part)
    return path


# --- the responses ----------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(model: str, text: str, finish_reason: str, token_usage: dict) -> dict:
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": token_usage,
    }


def pieces(text: str) -> list[str]:
    """``text`` cut after each word with the spaces before it, for streaming: the pieces join to ``text``."""
    return re.findall(r"\s*\S+|\s+", text)


class Chunks:
    """The server-sent events of one streamed completion (``chat.completion.chunk``), in the order sent: the
    role, pieces of text, the finish reason, the usage (when asked for), ``[DONE]``; or an error event."""

    def __init__(self, model: str):
        created = int(time.time())
        self.head = {"id": completion_id(), "object": "chat.completion.chunk", "created": created, "model": model}

    def event(self, choices, **extra) -> str:
        return f"data: {json.dumps({**self.head, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    def role(self) -> str:
        return self.event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def text(self, piece: str) -> str:
        return self.event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])

    def finish(self, finish_reason: str) -> str:
        return self.event([{"index": 0, "delta": {}, "finish_reason": finish_reason}])

    def usage(self, token_usage: dict) -> str:
        return self.event([], usage=token_usage)

    @staticmethod
    def error(error: ApiError) -> str:
        """An error after the response began (its status is sent already): OpenAI's clients raise it."""
        return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"


def chunk_events(model: str, text: str, finish_reason: str, token_usage: dict | None):
    """The events of a completion whose ``text`` is known whole (beam search): the role, the text piece by
    piece, the finish reason, the usage (when asked for, ``stream_options.include_usage``), then ``[DONE]``."""
    chunks = Chunks(model)
    yield chunks.role()
    for piece in pieces(text):
        yield chunks.text(piece)
    yield chunks.finish(finish_reason)
    if token_usage is not None:
        yield chunks.usage(token_usage)
    yield chunks.done()
