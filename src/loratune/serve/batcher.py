"""Dynamic batching: rows of concurrent requests, for any adapters, gathered into one forward pass.

Requests arrive on the event loop; their rows wait in one queue. The batcher takes rows, in arrival order,
until it has ``max_batch`` of them or ``max_wait`` has passed since the oldest arrived, and runs the batch on
the one worker thread (torch is not run from two threads at once; loads and unloads run on the same thread,
between batches). While a batch runs, the next one gathers. A request of more than ``max_batch`` texts is
cut into parts of at most ``max_batch`` rows, which may land in different batches.

A batch that raises is run again one request at a time, so a request that fails (whatever the cause) fails
alone and the others in its batch are answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

Row = tuple[str | None, Sequence[int]]
"""One text of a request: (adapter name or None for the base, token ids)."""


class AdapterGone(Exception):
    """The adapter a queued request named was unloaded before its batch ran."""


class ForwardFailed(Exception):
    """The forward pass of a request's rows failed, run alone (a 500 of that request, not a 503 of the server)."""


@dataclass
class _Part:
    rows: list[Row]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Gathers rows into batches and runs ``run(rows) -> [probabilities per row]`` on one worker thread.

    ``alive(name)`` says at batch time whether an adapter is still loaded (an unload may land while its
    requests wait); ``on_batch(rows_by_adapter)`` is told each batch's make-up (for /metrics).
    """

    def __init__(self, run: Callable[[list[Row]], list[np.ndarray]], *, max_batch: int = 32,
                 max_wait_ms: float = 5.0, alive: Callable[[str | None], bool] = lambda name: True,
                 on_batch: Callable[[dict[str | None, int]], None] = lambda counts: None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000.0
        self.alive, self.on_batch = alive, on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratune-worker")
        self._queue: deque[_Part] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="loratune-batcher")

    async def stop(self) -> None:
        """Finish every queued request, then stop the loop and the worker thread."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self.executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread, between batches (loading, unloading an adapter)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # --- requests --------------------------------------------------------------------------------

    async def submit(self, rows: list[Row]) -> list[np.ndarray]:
        """Probabilities of each row, in order, once every part of the request has run."""
        if self._closing or self._wake is None:
            raise RuntimeError("the server is shutting down")
        loop = asyncio.get_running_loop()
        parts = [_Part(rows[i:i + self.max_batch], loop.create_future()) for i in range(0, len(rows), self.max_batch)]
        self._queue.extend(parts)
        self._wake.set()
        out: list[np.ndarray] = []
        for part in parts:
            out.extend(await part.future)
        return out

    def pending_rows(self) -> int:
        return sum(len(p.rows) for p in self._queue)

    # --- the loop --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            # Wait for a full batch, or until the oldest row has waited max_wait.
            while self.pending_rows() < self.max_batch and not self._closing:
                left = self._queue[0].arrived + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch: list[_Part] = []
            n = 0
            while self._queue and n + len(self._queue[0].rows) <= self.max_batch:
                part = self._queue.popleft()
                if self._gone(part):
                    continue
                batch.append(part)
                n += len(part.rows)
            if batch:
                await self._run(batch)

    def _gone(self, part: _Part) -> bool:
        """Whether an adapter ``part`` names was unloaded; if so its request gets AdapterGone (a 404)."""
        gone = next((name for name, _ in part.rows if not self.alive(name)), False)
        if gone is False:
            return False
        if not part.future.done():
            part.future.set_exception(AdapterGone(gone))
        return True

    async def _run(self, batch: list[_Part]) -> None:
        rows = [r for part in batch for r in part.rows]
        counts: dict[str | None, int] = {}
        for name, _ in rows:
            counts[name] = counts.get(name, 0) + 1
        self.on_batch(counts)
        try:
            probs = await self.call(self.run, rows)
        except Exception:  # noqa: BLE001 - run the parts alone: one bad request fails alone
            if len(batch) == 1:
                if self._gone(batch[0]):                # unloaded while it ran: a 404, not a failed forward pass
                    return
                log.exception("a batch of one request failed")
                if not batch[0].future.done():
                    batch[0].future.set_exception(ForwardFailed("the forward pass failed"))
                return
            for part in batch:                         # an unload may land between them (on the worker)
                if not self._gone(part):
                    await self._run([part])
            return
        i = 0
        for part in batch:
            if not part.future.done():                 # a client that went away cancels its future
                part.future.set_result(probs[i:i + len(part.rows)])
            i += len(part.rows)
