"""The server's batcher without a model: which requests share a call, in what order, what runs alone, what a
failure or a shutdown does to the others.  The batch function records its calls; a held call lets the
specs queue requests deterministically."""

from __future__ import annotations

import threading

import pytest

from blip2_internlm.serve.batcher import Batcher, BatchLimits, QueueFull, ShuttingDown

TIMEOUT = 30


class Model:
    """A batch function: each item's result is ``(key, item)``; an item "bad" breaks any call it is in; the
    first call waits for :meth:`release` when ``held``."""

    def __init__(self, held: bool = False):
        self.calls: list[tuple] = []
        self.entered, self.released = threading.Event(), threading.Event()
        if not held:
            self.released.set()

    def __call__(self, key, items):
        self.calls.append((key, list(items)))
        self.entered.set()
        assert self.released.wait(TIMEOUT)
        if "bad" in items:
            raise ValueError("a bad item")
        return [(key, item) for item in items]

    def release(self):
        self.released.set()


def started(model, **limits) -> Batcher:
    batcher = Batcher(model, BatchLimits(**limits))
    batcher.start()
    return batcher


def results(pendings):
    return [pending.future.result(TIMEOUT) for pending in pendings]


def behind_a_held_call(model, batcher, submissions):
    """Submit ``("plug", 0)``, wait until the model holds it, then queue ``submissions`` ((key, item, alone))."""
    plug = batcher.submit("plug", 0)
    assert model.entered.wait(TIMEOUT)
    queued = [batcher.submit(key, item, alone=alone) for key, item, alone in submissions]
    model.release()
    return plug, queued


def test_queued_requests_with_one_key_share_calls_of_at_most_max_batch():
    model = Model(held=True)
    batcher = started(model, max_batch=2, window_seconds=0)
    _, queued = behind_a_held_call(model, batcher, [("k", i, False) for i in range(5)])
    assert results(queued) == [("k", i) for i in range(5)]
    assert model.calls[1:] == [("k", [0, 1]), ("k", [2, 3]), ("k", [4])]
    assert list(batcher.batch_sizes) == [1, 2, 2, 1]
    assert (batcher.calls, batcher.requests, batcher.largest_batch) == (4, 6, 2)
    batcher.close(TIMEOUT)


def test_requests_with_other_keys_never_share_a_call_and_keep_their_turn():
    model = Model(held=True)
    batcher = started(model, max_batch=8, window_seconds=0)
    submissions = [("a", 1, False), ("b", 2, False), ("a", 3, False), ("b", 4, False), ("c", 5, False)]
    _, queued = behind_a_held_call(model, batcher, submissions)
    assert results(queued) == [(key, item) for key, item, _ in submissions]
    assert model.calls[1:] == [("a", [1, 3]), ("b", [2, 4]), ("c", [5])]
    batcher.close(TIMEOUT)


def test_a_request_that_must_run_alone_does_and_the_others_still_share():
    model = Model(held=True)
    batcher = started(model, max_batch=8, window_seconds=0)
    _, queued = behind_a_held_call(model, batcher, [("k", 1, False), ("k", 2, True), ("k", 3, False)])
    results(queued)
    assert model.calls[1:] == [("k", [1, 3]), ("k", [2])]
    batcher.close(TIMEOUT)


def test_the_window_gathers_requests_that_arrive_after_the_first():
    model = Model()
    batcher = started(model, max_batch=3, window_seconds=30.0)  # it ends when the batch is full
    pendings = [batcher.submit("k", i) for i in range(3)]
    assert results(pendings) == [("k", 0), ("k", 1), ("k", 2)]
    assert model.calls == [("k", [0, 1, 2])]
    batcher.close(TIMEOUT)


def test_a_failing_call_is_retried_one_by_one_so_only_the_bad_request_fails():
    model = Model(held=True)
    batcher = started(model, max_batch=8, window_seconds=0)
    _, queued = behind_a_held_call(model, batcher, [("k", 1, False), ("k", "bad", False), ("k", 3, False)])
    assert queued[0].future.result(TIMEOUT) == ("k", 1) and queued[2].future.result(TIMEOUT) == ("k", 3)
    with pytest.raises(ValueError, match="a bad item"):
        queued[1].future.result(TIMEOUT)
    assert list(batcher.batch_sizes) == [1, 3, 1, 1, 1]
    batcher.close(TIMEOUT)


def test_beyond_max_queue_a_request_is_refused_at_once_and_a_withdrawn_one_never_runs():
    model = Model(held=True)
    batcher = started(model, max_batch=8, window_seconds=0, max_queue=2)
    batcher.submit("plug", 0)
    assert model.entered.wait(TIMEOUT)
    kept, withdrawn = batcher.submit("k", 1), batcher.submit("k", 2)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        batcher.submit("k", 3)
    assert batcher.withdraw(withdrawn) and batcher.queued == 1
    model.release()
    assert kept.future.result(TIMEOUT) == ("k", 1) and withdrawn.future.cancelled()
    assert model.calls[1:] == [("k", [1])]
    assert not batcher.withdraw(kept)  # finished: nothing to withdraw
    batcher.close(TIMEOUT)


def test_closing_finishes_what_is_queued_and_refuses_what_comes_after():
    model = Model(held=True)
    batcher = started(model, max_batch=8, window_seconds=0)
    plug = batcher.submit("plug", 0)
    assert model.entered.wait(TIMEOUT)
    queued = batcher.submit("k", 1)
    closing = threading.Thread(target=batcher.close, args=(TIMEOUT,))
    closing.start()
    model.release()
    closing.join(TIMEOUT)
    assert plug.future.result(TIMEOUT) == ("plug", 0) and queued.future.result(TIMEOUT) == ("k", 1)
    with pytest.raises(ShuttingDown):
        batcher.submit("k", 2)


def test_limits_out_of_range_are_refused():
    with pytest.raises(ValueError, match="batch limits out of range"):
        BatchLimits(max_batch=0)
