"""Overlap of decode, GPU work and encode: a prefetching reader and a background writer.

Decoding (PyAV) and encoding (libx264) release the GIL inside FFmpeg, so one thread each runs beside
the denoising loop. Both queues are bounded, so memory stays at a few frames however long the video,
and an exception on either thread is re-raised on the caller's thread, never swallowed.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Callable

_DONE = object()


def prefetch(items: Iterable[Any], depth: int = 8) -> Iterator[Any]:
    """Iterate `items` on a background thread, at most `depth` items ahead of the consumer.

    An exception raised by the producer is re-raised here, at the point the consumer reaches it.
    Leaving the loop early (break, exception) stops the producer at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _DONE))
        except BaseException as e:  # handed to the consumer, which re-raises it
            put((False, e))

    t = threading.Thread(target=produce, name="bbf-rt-decode", daemon=True)
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        t.join()


class BackgroundWriter:
    """Calls `write(item)` on a background thread, `depth` items deep; `finish()` waits and re-raises.

    `submit` re-raises a failure of an earlier write as soon as it is known, so the caller stops early.
    """

    def __init__(self, write: Callable[[Any], None], depth: int = 16) -> None:
        self._write = write
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="bbf-rt-encode", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if self._error is None and not self._cancelled:
                try:
                    self._write(item)
                except BaseException as e:  # re-raised on the caller's thread
                    self._error = e

    def submit(self, item: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(item)

    def finish(self) -> None:
        """Write everything submitted, stop the thread, re-raise the first write error if any."""
        self._q.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop without writing what is still queued and without raising (the caller is failing)."""
        self._cancelled = True
        self._q.put(_DONE)
        self._thread.join()
