"""The HTTP side: a FastAPI app with ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health``.

A request is read (its body capped), parsed, mapped to model work (``mapping``), its image decoded and
processed in a worker thread of the app, then queued in the :class:`~blip2_internlm.serve.batcher.Batcher`;
the handler waits for its result up to ``request_timeout`` seconds.  Every refusal is an OpenAI-style error
body with the status a client expects: 400 (bad request, naming the field), 404 (another model), 413 (body
too large), 429 (queue full), 503 (shutting down), 504 (timed out), 500 (the model failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from blip2_internlm.serve import protocol
from blip2_internlm.serve.batcher import Batcher, BatchLimits, Pending, QueueFull, ShuttingDown
from blip2_internlm.serve.engine import Generated, ModelRunner
from blip2_internlm.serve.images import image_from_url
from blip2_internlm.serve.mapping import Work, plan, read_conversation
from blip2_internlm.serve.protocol import ApiError
from blip2_internlm.serve.streaming import TextStream
from blip2_internlm.tools.app import MEBIBYTE, PageLimits, Refused

logger = logging.getLogger("blip2_internlm.serve")


@dataclass(frozen=True)
class ServeSettings:
    """Everything the app decides besides the model; the defaults are the command's flags'."""

    model_id: str
    limits: PageLimits = PageLimits()
    batch: BatchLimits = BatchLimits()
    request_timeout: float = 60.0  # seconds from arrival to answer
    max_new_tokens: int = 256  # the largest max_tokens a request may ask for
    image_root: Path | None = None  # local image files are read only from under it

    @property
    def max_body_bytes(self) -> int:
        """A request body: one image as base64 (4/3 of its bytes) and the texts, with room to spare."""
        return (self.limits.max_upload_mb * MEBIBYTE * 4) // 3 + 4 * MEBIBYTE


def create_app(runner: ModelRunner, settings: ServeSettings) -> FastAPI:
    """The app serving ``runner``'s model; its batcher starts and stops with the app (``app.state.batcher``)."""
    batcher = Batcher(lambda key, works: runner.run(key, works), settings.batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        # uvicorn has let the open requests finish (or time out) by now: stop the worker after what is queued
        await asyncio.to_thread(batcher.close, settings.request_timeout)
        logger.info("batcher stopped after %d model calls for %d requests", batcher.calls, batcher.requests)

    app = FastAPI(title="blip2_internlm", lifespan=lifespan)
    app.state.batcher, app.state.runner, app.state.settings = batcher, runner, settings
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(error.status_code, str(error.detail), kind=kind).body(), error.status_code)

    @app.exception_handler(Exception)
    async def unforeseen(request, error: Exception):  # Starlette logs its traceback after this answer
        return JSONResponse(ApiError(500, "internal server error", kind="server_error").body(), 500)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": settings.model_id,
            "queued": batcher.queued,
            "batches": batcher.calls,
            "requests_batched": batcher.requests,
            "largest_batch": batcher.largest_batch,
        }

    @app.get("/v1/models")
    async def models():
        entry = {"id": settings.model_id, "object": "model", "created": created, "owned_by": "blip2_internlm"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        body = await read_body(request, settings.max_body_bytes)
        parsed = protocol.parse_request(body)
        if parsed.model != settings.model_id:
            raise ApiError(
                404,
                f"model {parsed.model!r} is not served here; this server serves {settings.model_id!r}",
                kind="not_found_error",
                param="model",
                code="model_not_found",
            )
        with refusals():
            batcher.check_room()  # before the image is decoded: a crowd costs no decoding
        work = await run_in_threadpool(prepared_work, runner, settings, parsed)
        stream = TextStream(asyncio.get_running_loop()) if parsed.stream and runner.streams(work.settings) else None
        if stream is not None:
            work.listener = stream.offer
        with refusals():
            pending = batcher.submit(work.settings, work, alone=work.alone)
        deadline = arrived + settings.request_timeout
        if stream is not None:
            pending.future.add_done_callback(stream.close)
            try:
                begun = await stream.started(deadline)
            except TimeoutError:
                raise failure(batcher, pending, settings.request_timeout, "timeout") from None
            if begun:  # text came before the end: the response streams it as it comes

                def error_for(what):
                    return failure(batcher, pending, settings.request_timeout, what)

                events = stream.events(settings.model_id, pending, deadline, parsed.include_usage, error_for)
                return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await outcome(batcher, pending, deadline, settings.request_timeout)
        usage = protocol.usage(result.prompt_tokens, result.completion_tokens)
        if not parsed.stream:
            return protocol.completion(settings.model_id, result.text, result.finish_reason, usage)
        events = protocol.chunk_events(
            settings.model_id, result.text, result.finish_reason, usage if parsed.include_usage else None
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    return app


SSE_HEADERS = {"Cache-Control": "no-cache"}


async def outcome(batcher: Batcher, pending: Pending, deadline: float, timeout: float) -> Generated:
    """``pending``'s result by ``deadline`` (``time.monotonic``), or the :func:`failure` the client gets."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(pending.future), max(deadline - time.monotonic(), 0.001))
    except TimeoutError:
        raise failure(batcher, pending, timeout, "timeout") from None
    except Exception as err:  # noqa: BLE001  (the model's failure, whatever it is, is this request's)
        raise failure(batcher, pending, timeout, err) from None


def failure(batcher: Batcher, pending: Pending, timeout: float, what) -> ApiError:
    """The error of a request that ran out of time (``what`` ``"timeout"``: 504; one still waiting leaves the
    queue and never runs, a running one's result is dropped) or failed (``what`` its exception: 503 when the
    server stops, else 500, the model's failure)."""
    if what == "timeout":
        batcher.withdraw(pending)
        return ApiError(
            504,
            f"no answer within {timeout:g} s (--request-timeout): the model is busy; retry later",
            kind="timeout_error",
            code="timeout",
        )
    if isinstance(what, ShuttingDown):
        return ApiError(503, str(what), kind="server_error", code="shutting_down")
    logger.error("generation failed", exc_info=what)
    return ApiError(500, f"the model failed: {type(what).__name__}: {what}", kind="server_error")


@contextlib.contextmanager
def refusals():
    """The batcher's refusals as the client sees them: 429 for a full queue, 503 while shutting down."""
    try:
        yield
    except QueueFull as full:
        raise ApiError(429, str(full), kind="rate_limit_error", code="queue_full") from None
    except ShuttingDown as stopping:
        raise ApiError(503, str(stopping), kind="server_error", code="shutting_down") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is longer than ``limit`` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes; the limit is {limit:,}", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit:,} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def prepared_work(runner: ModelRunner, settings: ServeSettings, request: protocol.ChatCompletionRequest) -> Work:
    """The request's work with its image read and processed (in a thread of the app's pool); 400 for a
    refused image or request."""
    conversation = read_conversation(request)
    work = plan(
        request,
        conversation,
        chat_model=runner.chat_model,
        limits=settings.limits,
        max_new_tokens=settings.max_new_tokens,
    )
    image = conversation.image
    try:
        work.image = image_from_url(image.url, image.where, settings.limits, settings.image_root)
    except Refused as refused:
        raise ApiError(400, str(refused), param=image.where.removeprefix("the image at ") + ".image_url.url") from None
    return runner.prepare(work)
