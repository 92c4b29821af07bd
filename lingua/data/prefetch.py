"""Shuffle buffer over packed windows, and a background thread that produces batches ahead.

Shuffle buffer
    Windows are taken from the packer in blocks of ``block`` windows (``shuffle_buffer``
    batches), and each block is emitted in a seeded random order. The position is the packer's
    position at the start of the current block, the shuffle RNG state before the block's
    permutation, and how many windows of the block were emitted. Restoring refills the block
    from the packer (deterministic), redraws the same permutation and skips the emitted
    windows, so the state stays a few hundred bytes instead of holding the block's tokens.

Prefetch
    :class:`Prefetcher` calls a producer in a daemon thread and hands its results over a
    bounded queue. Every item is a ``(batch, state)`` pair made together in the thread, so the
    consumer always holds the state *after* the batch it received, however far the thread has
    run ahead: saving that state and rebuilding from it yields the next batch the consumer has
    not yet seen.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

import numpy as np

from lingua.data.packing import Packer, Window
from lingua.data.rng import make_rng, rng_from_state, rng_state

T = TypeVar("T")


class WindowShuffler:
    """Emits the packer's windows in seeded random order within blocks of ``block`` windows."""

    def __init__(
        self,
        make_packer: Callable[[dict | None], Packer],
        *,
        block: int,
        shuffle: bool,
        seed_parts: tuple[int, ...],
        state: dict | None = None,
    ) -> None:
        if block < 1:
            raise ValueError(f"shuffle block must be >= 1 window, got {block}")
        self.block = block
        self.shuffle = shuffle
        self._packer = make_packer(state["packer"] if state else None)
        self._rng = rng_from_state(state["rng"]) if state else make_rng(*seed_parts)
        self._resume_pos = int(state["pos"]) if state else 0
        self._windows: list[Window] = []
        self._order = np.zeros(0, np.int64)
        self._pos = 0
        self._block_start: dict = {}
        self._rng_start: dict = {}

    def state(self) -> dict:
        if not self._windows:  # nothing emitted since construction: hand the saved position on
            return {"packer": self._packer.state(), "rng": rng_state(self._rng), "pos": self._resume_pos}
        if self._pos >= self.block:  # block used up: the next block starts where the packer is now
            return {"packer": self._packer.state(), "rng": rng_state(self._rng), "pos": 0}
        return {"packer": self._block_start, "rng": self._rng_start, "pos": self._pos}

    def next_window(self) -> Window:
        if not self._windows or self._pos >= self.block:
            self._fill()
        window = self._windows[int(self._order[self._pos])]
        self._pos += 1
        return window

    def _fill(self) -> None:
        self._block_start = self._packer.state()
        self._rng_start = rng_state(self._rng)
        self._windows = [self._packer.next_window() for _ in range(self.block)]
        self._order = self._rng.permutation(self.block) if self.shuffle else np.arange(self.block)
        self._pos, self._resume_pos = self._resume_pos, 0


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Runs ``produce()`` repeatedly in a daemon thread, at most ``depth`` results ahead.

    An exception in the producer is re-raised by :meth:`get` in the consumer's thread, after
    the results produced before it.
    """

    _POLL_S = 0.1

    def __init__(self, produce: Callable[[], T], depth: int) -> None:
        self._queue: queue.Queue[T | _Failure] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name="data-prefetch", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], T]) -> None:
        while not self._stop.is_set():
            try:
                item: T | _Failure = produce()
            except BaseException as e:  # handed to the consumer, which decides
                item = _Failure(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=self._POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def get(self) -> T:
        if self._failed:
            raise RuntimeError("the data prefetch thread failed earlier")
        while True:
            try:
                item = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data prefetch thread stopped") from None
        if isinstance(item, _Failure):
            self._failed = True
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
