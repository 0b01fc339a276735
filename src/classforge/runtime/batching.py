"""Micro-batching: requests that arrive together share one forward pass.

Request threads decode and preprocess in parallel (that part is per file); the tensors then go to a few worker
threads (one per core with a single-threaded model, else one) that wait at most `max_wait_ms` for company, run
the model on up to `max_batch` rows and hand every caller its own rows. A fixed set of forward threads also keeps
8 concurrent requests from starting 8 x intra-op thread pools on a 2-core machine.

A lone request should not pay the waiting window: callers announce themselves with `expect()` while they are
still decoding, and the worker only waits for company that has been announced. Nor the hand-over to a worker and
back: a request with nothing else queued, announced or computing runs `forward_alone` in its own thread."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import torch


class BatcherClosed(RuntimeError):
    pass


class MicroBatcher:
    """submit(x: (B, ...) tensor) -> (B, C) logits, computed by `forward` together with whatever other
    submissions arrived within `max_wait_ms` of the first one (at most `max_batch` rows per call).

    `workers` threads take batches from one queue: with a single-threaded `forward`, one worker per core keeps
    every core on its own forward pass (no intra-op barriers between cores) while requests keep coming. A
    submission that is alone (nothing else queued, announced or computing) goes to `forward_alone` when given: a
    pass that uses every core answers a lone request sooner. It runs in the submitting thread, so it must not
    depend on that thread's torch settings (an ONNX Runtime session has its own threads)."""

    def __init__(self, forward: Callable[[torch.Tensor], np.ndarray], max_batch: int = 16, max_wait_ms: float = 5.0,
                 workers: int = 1, forward_alone: Callable[[torch.Tensor], np.ndarray] | None = None):
        self.forward, self.max_batch, self.max_wait = forward, max(1, int(max_batch)), max(0.0, max_wait_ms) / 1000
        self.forward_alone = forward_alone
        self._q: queue.Queue = queue.Queue()
        self._local = threading.local()
        self._closed = False
        self._coming = 0  # announced by expect(), not yet submitted
        self._in_flight = 0  # submitted, not yet answered: queued, waiting in a batch or computing
        self._no_lone_pass = threading.Event()  # clear while a lone request's pass holds every core
        self._no_lone_pass.set()
        self._count_lock = threading.Lock()
        self.stats = {"calls": 0, "rows": 0, "max_rows": 0, "workers": max(1, int(workers)), "alone": 0}
        self._threads = [threading.Thread(target=self._loop, name=f"classforge-batcher-{i}", daemon=True)
                         for i in range(self.stats["workers"])]
        for t in self._threads:
            t.start()

    @contextlib.contextmanager
    def expect(self) -> Iterator[None]:
        """Around decode + submit: tells the worker that a submission is on its way."""
        with self._count_lock:
            self._coming += 1
        done = [False]
        self._local.announced = done
        try:
            yield
        finally:
            if not done[0]:  # left without submitting (a bad file): no longer coming
                with self._count_lock:
                    self._coming -= 1
            self._local.announced = None

    def submit(self, x: torch.Tensor, timeout: float | None = 120.0) -> np.ndarray:
        if self._closed:
            raise BatcherClosed("the model worker has stopped")
        fut: Future = Future()
        announced = getattr(self._local, "announced", None)
        with self._count_lock:
            if announced is not None and not announced[0]:
                announced[0] = True
                self._coming -= 1
            alone = self.forward_alone is not None and self._in_flight == 0 and self._coming <= 0
            self._in_flight += 1
            if alone:
                self._no_lone_pass.clear()
            else:
                self._q.put((x, fut))
        if alone:
            return self._run_alone(x)
        return fut.result(timeout=timeout)

    def _run_alone(self, x: torch.Tensor) -> np.ndarray:
        try:
            out = self.forward_alone(x)
        finally:
            with self._count_lock:
                self._in_flight -= 1
                self._no_lone_pass.set()
        self._count(len(x), alone=True)
        return out

    def _count(self, rows: int, alone: bool = False) -> None:
        with self._count_lock:
            self.stats["calls"] += 1
            self.stats["rows"] += rows
            self.stats["max_rows"] = max(self.stats["max_rows"], rows)
            self.stats["alone"] += int(alone)

    def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=5)
        while not self._q.empty():  # fail anything that slipped in after close()
            item = self._q.get_nowait()
            if item is not None:
                item[1].set_exception(BatcherClosed("the model worker has stopped"))

    def _collect(self) -> list[tuple[torch.Tensor, Future]] | None:
        first = self._q.get()
        if first is None:
            return None
        items, rows = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch:
            with self._count_lock:
                if self._coming <= 0 and self._q.empty():
                    break  # nobody else is on the way: do not wait
            left = deadline - time.monotonic()
            try:
                nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._q.put(None)  # let the loop see the stop signal after this batch
                break
            items.append(nxt)
            rows += len(nxt[0])
        return items

    def _is_alone(self, items: list) -> bool:
        """Nothing but this one submission queued, announced or computing: it may use every core."""
        with self._count_lock:
            return (self.forward_alone is not None and len(items) == 1 and self._coming <= 0
                    and self._in_flight == 1)

    def _loop(self) -> None:
        while True:
            items = self._collect()
            if items is None:
                break
            self._no_lone_pass.wait()  # passes never outnumber the workers: the lone one has every core
            alone = self._is_alone(items)
            try:
                x = torch.cat([t for t, _ in items])  # (sum B_i, ...)
                logits = (self.forward_alone if alone else self.forward)(x)
            except BaseException as e:  # noqa: BLE001 - every caller gets the error, the worker lives on
                for _, f in items:
                    f.set_exception(e)
                continue
            finally:
                with self._count_lock:
                    self._in_flight -= len(items)
            self._count(len(x), alone)
            i = 0
            for t, f in items:
                f.set_result(logits[i:i + len(t)])
                i += len(t)
