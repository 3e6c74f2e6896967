"""Keeping the devices busy: batches prepared ahead on a thread, and a clock of device idle time.

``Prefetcher(iterator, to_device, depth)`` runs ``next(iterator)`` and ``to_device(host)`` (the global
``jax.Array`` batch, ``device_put`` included) on a background thread, ``depth`` batches ahead. Each item
carries the iterator state taken right after its batch was read, so the training loop checkpoints the
state of the last batch it *consumed*, never one it only prefetched: a resume re-reads the prefetched
batches, exactly (tests/integration/test_train_resume.py). ``depth = 0`` does the same work in the
caller's thread, at the call (the serial loop).

``DeviceClock`` measures how long the devices wait for the host: a watcher thread blocks on each
dispatched step's outputs in order and records when it finished; the device idles before step ``s``
for ``max(0, dispatch(s) - done(s-1))``. ``wait_fraction()`` is that idle time over the wall time from
the first to the last finished step (the first step, with its compile, is excluded).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax


class Item(NamedTuple):
    host: dict  # this process's host batch (bookkeeping keys included)
    batch: Any  # what to_device made of it (global arrays on the devices)
    data_state: Any  # the iterator's state right after this batch was read (None without get_state)


class Prefetcher:
    """``next(prefetcher) -> Item``; ``close()`` stops the thread (call it before closing the iterator)."""

    def __init__(self, iterator: Iterator, to_device: Callable[[dict], Any], depth: int):
        if depth < 0:
            raise ValueError(f"config.train.prefetch must be >= 0, got {depth}")
        self._iterator, self._to_device, self.depth = iterator, to_device, depth
        self._get_state = getattr(iterator, "get_state", None)
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._work, name="sgt-prefetch", daemon=True)
            self._thread.start()

    def _make(self) -> Item:
        host = next(self._iterator)
        state = copy.deepcopy(self._get_state()) if self._get_state else None
        return Item(host, self._to_device(host), state)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._make()
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self):
        return self

    def __next__(self) -> Item:
        if not self.depth:
            return self._make()
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the batch prefetch thread died without a batch or an error") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class DeviceClock:
    """Dispatch times (caller) and completion times (watcher thread) of the train steps."""

    def __init__(self):
        self._dispatched: list[float] = []
        self._done: list[float] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._watch, name="sgt-device-clock", daemon=True)
        self._thread.start()

    def dispatched(self, outputs) -> None:
        """Call right after dispatching a step with (some of) its outputs, e.g. its metrics."""
        self._dispatched.append(time.perf_counter())
        self._queue.put(outputs)

    def _watch(self) -> None:
        while True:
            outputs = self._queue.get()
            if outputs is None:
                return
            try:
                jax.block_until_ready(outputs)
            finally:
                self._done.append(time.perf_counter())

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def wait_fraction(self) -> float | None:
        """Idle share of the wall time over steps 2..n (None before 3 steps finished); call after close()."""
        done, disp = self._done, self._dispatched[:len(self._done)]
        if len(done) < 3:
            return None
        idle = sum(max(0.0, disp[s] - done[s - 1]) for s in range(2, len(done)))
        wall = done[-1] - done[1]
        return idle / wall if wall > 0 else None

    def steps_per_s(self) -> float | None:
        """Finished steps per second over steps 2..n (the first, compiling step excluded)."""
        done = self._done
        return (len(done) - 2) / (done[-1] - done[1]) if len(done) >= 3 and done[-1] > done[1] else None
