"""Prefetching reader and background writer: order, bounded depth, errors re-raised on the caller."""
from __future__ import annotations

import threading
import time

import pytest

from bbf_rt.runtime.stream import BackgroundWriter, prefetch


def test_prefetch_keeps_order_and_stays_bounded():
    produced = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    seen = []
    for x in prefetch(items(), depth=4):
        time.sleep(0.001)
        assert len(produced) - len(seen) <= 4 + 2  # queue depth + one in hand on each side
        seen.append(x)
    assert seen == list(range(50))


def test_prefetch_reraises_the_producer_error_in_place():
    def items():
        yield 1
        yield 2
        raise ValueError("corrupt packet")

    got = []
    with pytest.raises(ValueError, match="corrupt packet"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_stops_the_producer_on_early_exit():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    for x in prefetch(items(), depth=2):
        if x == 3:
            break
    n = len(produced)
    time.sleep(0.05)
    assert len(produced) == n < 20  # the producer thread has stopped
    assert not [t for t in threading.enumerate() if t.name == "bbf-rt-decode"]


def test_background_writer_writes_in_order_and_reraises():
    out = []
    w = BackgroundWriter(out.append, depth=3)
    for i in range(20):
        w.submit(i)
    w.finish()
    assert out == list(range(20))

    def fail(x):
        if x == 2:
            raise OSError("disk full")
        out.append(x)

    out.clear()
    w = BackgroundWriter(fail, depth=2)
    with pytest.raises(OSError, match="disk full"):
        for i in range(100):
            w.submit(i)
            time.sleep(0.002)
        w.finish()
    w.cancel()
    assert out == [0, 1]


def test_background_writer_cancel_drops_queued_items():
    out = []
    gate = threading.Event()

    def slow(x):
        gate.wait()
        out.append(x)

    w = BackgroundWriter(slow, depth=10)
    for i in range(5):
        w.submit(i)
    threading.Timer(0.05, gate.set).start()
    w.cancel()
    assert len(out) <= 1  # at most the item already being written
