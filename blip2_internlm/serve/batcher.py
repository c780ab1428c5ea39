"""Dynamic batching: requests that arrive close together and can share a model call are decoded in one.

One worker thread owns the model.  A request is queued with a *key* (what must be equal for two requests
to share a call: the mode and every generation setting); the worker takes the oldest request, waits until
``window_seconds`` after it arrived for more with the same key, and runs up to ``max_batch`` of them in one
call.  Requests with other keys keep their place in line for the next call.  The queue is bounded: past
``max_queue`` waiting requests, :class:`QueueFull` at once (the server's 429).

The batcher is the only lock around the model: nothing else serialises generations.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    """How requests are gathered into model calls; the defaults are the server's flags'."""

    max_batch: int = 16  # requests in one model call
    window_seconds: float = 0.010  # how long the oldest request waits for company
    max_queue: int = 64  # requests waiting for the model (the running call not counted)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or not self.window_seconds >= 0:
            raise ValueError(f"batch limits out of range: {self}")


class QueueFull(RuntimeError):
    """Too many requests are waiting already; the client should retry later."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no more work."""


@dataclass(eq=False)
class Pending:
    """One queued request: its key, what the batch function receives, whether it must run alone, its result."""

    key: Hashable
    item: object
    alone: bool = False
    arrived: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


#: ``run_batch(key, items) -> results``, one result per item, in order.
BatchFunction = Callable[[Hashable, Sequence[object]], Sequence[object]]


class Batcher:
    """Runs ``run_batch`` on batches of compatible requests in one worker thread; see the module docstring.

    ``calls``, ``requests`` and ``largest_batch`` count the model calls made and the requests they took;
    ``batch_sizes`` holds the sizes of the last :data:`RECENT_CALLS` calls, in order (the server's
    ``/health`` and the specs read them).  A call that fails with more than one request in it is retried
    one request at a time, so one request that breaks the model fails alone.
    """

    RECENT_CALLS = 1000

    def __init__(self, run_batch: BatchFunction, limits: BatchLimits = BatchLimits()):
        self.run_batch = run_batch
        self.limits = limits
        self.calls = self.requests = self.largest_batch = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=self.RECENT_CALLS)
        self._condition = threading.Condition()
        self._queue: collections.deque[Pending] = collections.deque()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)

    # --- the clients' side --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        with self._condition:
            return len(self._queue)

    def submit(self, key: Hashable, item: object, *, alone: bool = False) -> Pending:
        """Queue ``item``; its result (or exception) arrives in the returned request's ``future``."""
        pending = Pending(key, item, alone)
        with self._condition:
            self.check_room()
            self._queue.append(pending)
            self._condition.notify_all()
        return pending

    def check_room(self) -> None:
        """:class:`ShuttingDown` or :class:`QueueFull` when :meth:`submit` would refuse now (the server asks
        before it decodes a request's image)."""
        with self._condition:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.limits.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self._queue)} requests are already waiting "
                    f"(--max-queue {self.limits.max_queue}); retry in a moment"
                )

    def withdraw(self, pending: Pending) -> bool:
        """Take a request out of the queue if it is still waiting (it then never runs); False when it has
        started or finished."""
        with self._condition:
            try:
                self._queue.remove(pending)
            except ValueError:
                return False
        pending.future.cancel()
        return True

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, let the worker finish what is queued, and stop it; what is left after
        ``timeout`` seconds fails with :class:`ShuttingDown`."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._condition:
            left, self._queue = list(self._queue), collections.deque()
        for pending in left:
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(ShuttingDown("the server shut down before this request ran"))

    # --- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[Pending] | None:
        """The next call's requests, once the oldest one's window has passed or the batch is full; None when
        closing with nothing left.  Requests are marked running here, so a withdrawn one is never taken."""
        limits = self.limits
        with self._condition:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._condition.wait()
                head = self._queue[0]
                company = [] if head.alone else [p for p in self._queue if p.key == head.key and not p.alone]
                left = head.arrived + limits.window_seconds - time.monotonic()
                if head.alone or len(company) >= limits.max_batch or left <= 0 or self._closing:
                    break
                self._condition.wait(left)
            batch = [head] if head.alone else company[: limits.max_batch]
            for pending in batch:
                self._queue.remove(pending)
        return [pending for pending in batch if pending.future.set_running_or_notify_cancel()]

    def _record(self, size: int) -> None:
        self.calls += 1
        self.requests += size
        self.largest_batch = max(self.largest_batch, size)
        self.batch_sizes.append(size)

    def _run(self, batch: list[Pending]) -> None:
        if not batch:
            return
        self._record(len(batch))
        try:
            results = self.run_batch(batch[0].key, [pending.item for pending in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} requests")
        except Exception as err:
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            logger.warning(
                "a batch of %d failed (%s: %s); running its requests one by one", len(batch), type(err).__name__, err
            )
            for pending in batch:
                self._run_alone(pending)
            return
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)

    def _run_alone(self, pending: Pending) -> None:
        self._record(1)
        try:
            (result,) = self.run_batch(pending.key, [pending.item])
        except Exception as err:
            pending.future.set_exception(err)
        else:
            pending.future.set_result(result)
