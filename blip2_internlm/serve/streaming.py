"""Text as it is decoded: each row of a batched greedy or sampled generation, streamed to its request.

A :class:`TokenTap` is a transformers stopping criterion that never stops anything: the decoding loop
calls it after every step with every row's tokens so far, and it hands each row's newest token to that
row's :class:`SettledText`.  So a batch of requests decodes in one model call and every streaming request
still gets its text token by token, through the models' one ``generate`` path (no second decoding loop).

Beam search is not streamed this way: its rows are candidates that may still be replaced, so a text is
known only when the search ends (the server then sends it whole).

:class:`SettledText` reports only text that cannot change: what the model's own ``finish``
(``finished_text``, and ``predict_answers``' trailing-punctuation cut) makes of the tokens so far, without
its trailing whitespace, punctuation or half-decoded character, which a later token may still remove or
complete.  That is always the beginning of the finished text; the server sends the new part of each
report, and the rest of the finished text at the end, so a streamed answer concatenates to the text a
plain request gets.  Reports are whole texts, not pieces, so a batch that failed and runs again request
by request (the batcher's retry) repeats what was reported without repeating what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import unicodedata
from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria

from blip2_internlm.serve import protocol

logger = logging.getLogger("blip2_internlm.serve")


def _settled(text: str) -> str:
    """``text`` without the end a later token could still change (whitespace, punctuation, U+FFFD)."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] == "\ufffd" or _punctuation(text[end - 1])):
        end -= 1
    return text[:end]


def _punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


class SettledText:
    """One row's text as it settles: :meth:`add` a token; ``send`` gets the settled text whenever it grows."""

    def __init__(
        self,
        tokenizer,
        stop_token_ids: Sequence[int],
        finish: Callable[[str], str],
        send: Callable[[str], None],
    ):
        self.tokenizer, self.stops, self.finish, self.send = tokenizer, set(stop_token_ids), finish, send
        self.ids: list[int] = []
        self.settled = ""
        self.stopped = False

    def add(self, token: int) -> None:
        """The row's next token; nothing counts after a stop token (the row's later tokens are padding)."""
        if self.stopped:
            return
        if token in self.stops:
            self.stopped = True
            return
        self.ids.append(token)
        text = _settled(self.finish(self.tokenizer.decode(self.ids, skip_special_tokens=True)))
        if len(text) > len(self.settled):
            self.settled = text
            self.send(text)


class TokenTap(StoppingCriteria):
    """A stopping criterion that stops nothing and gives each row's newest token to its :class:`SettledText`
    (``None`` for a row nobody streams).  For greedy and sampled decoding only: one row per request."""

    def __init__(self, rows: Sequence[SettledText | None]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[0] != len(self.rows):
            raise RuntimeError(f"TokenTap follows {len(self.rows)} rows; the decoding loop has {input_ids.shape[0]}")
        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest, strict=True):
            if row is not None:
                row.add(token)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


_END = object()


class TextStream:
    """A streaming request's text on its way from the model's thread to its response.

    The model's thread :meth:`offer` s settled texts; the request's future :meth:`close` s the stream when it
    is done (after every offer: both go through the event loop's queue in order).  The response sends the
    new part of each text, then what the finished text holds beyond it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sent = ""  # what the response has sent (or is about to send) of the text
        self.first = ""

    def offer(self, settled: str) -> None:
        """A settled text (the model's thread)."""
        self._put(settled)

    def close(self, _future=None) -> None:
        """The request is done (a future's done-callback, from any thread)."""
        self._put(_END)

    def _put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def next_piece(self, deadline: float) -> str | None:
        """The next new text, None once the request is done; TimeoutError past ``deadline`` (monotonic)."""
        while True:
            left = max(deadline - time.monotonic(), 0.001)
            item = await asyncio.wait_for(self.queue.get(), left)
            if item is _END:
                return None
            if len(item) > len(self.sent) and item.startswith(self.sent):  # else a retry repeating the start
                piece, self.sent = item[len(self.sent) :], item
                return piece

    async def started(self, deadline: float) -> bool:
        """Wait for the first text: True when text came before the end (the response then streams), False when
        the request ended first (its result, or its error with the status it deserves, is taken whole)."""
        piece = await self.next_piece(deadline)
        if piece is None:
            return False
        self.first = piece
        return True

    async def events(self, model: str, pending, deadline: float, include_usage: bool, error_for):
        """The response's server-sent events from the first text on.  Once the response has begun, a request
        that times out or fails ends it with an error event: ``error_for("timeout")`` or
        ``error_for(exception)`` makes the :class:`~blip2_internlm.serve.protocol.ApiError`."""
        chunks = protocol.Chunks(model)
        yield chunks.role()
        yield chunks.text(self.first)
        try:
            while (piece := await self.next_piece(deadline)) is not None:
                yield chunks.text(piece)
        except TimeoutError:
            yield chunks.error(error_for("timeout"))
            yield chunks.done()
            return
        failure = pending.future.exception()
        if failure is not None:
            yield chunks.error(error_for(failure))
            yield chunks.done()
            return
        result = pending.future.result()
        if result.text.startswith(self.sent):
            if rest := result.text[len(self.sent) :]:
                yield chunks.text(rest)
        else:  # cannot happen while finished texts only cut their ends; the client has the beginning sent
            logger.error("streamed %r, which does not begin the finished text %r", self.sent, result.text)
        yield chunks.finish(result.finish_reason)
        if include_usage:
            yield chunks.usage(protocol.usage(result.prompt_tokens, result.completion_tokens))
        yield chunks.done()
