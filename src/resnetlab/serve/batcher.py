"""Micro-batching: concurrent requests' images share one forward pass, off the event loop.

Each image is queued with a future. One collector task takes the first waiting image, then keeps
collecting until ``max_batch`` images or ``max_wait_s`` after the first (but does not wait when no
other request is on its way: see :meth:`announce`), stacks them and runs the model in a single
worker thread (so the event loop keeps accepting and decoding while the network
runs, and only one forward pass uses the CPU cores at a time). While a batch runs, new images
queue up, so under load the next batch is full at once and the wait costs nothing.

Each answer carries the size of the forward pass that computed it (so a client can see whether
it was batched), and an optional ``on_batch`` observer is told every batch's size, each image's
queue wait and the forward time (the server's metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor

import torch

# (one image [c, h, w], future of (its row of fn's answer, batch size), monotonic enqueue time)
_Item = tuple[torch.Tensor, "asyncio.Future[tuple[torch.Tensor, int]]", float]
#: ``on_batch(batch size, queue wait of each image in s, forward pass in s)``
BatchObserver = Callable[[int, list[float], float], None]


class MicroBatcher:
    """Collect single images into batches for ``fn(x [n, c, h, w]) -> y [n, ...]``.

    Start with :meth:`start` inside the running loop, submit with :meth:`predict`, stop with
    :meth:`stop` (after the server has drained its requests). ``fn`` runs on ``executor``.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], executor: Executor,
                 max_batch: int = 16, max_wait_s: float = 0.005, on_batch: BatchObserver | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.batches = 0  # forward passes run so far
        self.images = 0  # images answered so far
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._coming = 0  # images announced (being received or decoded) but not yet queued

    def announce(self, n: int) -> None:
        """``n`` images will be submitted soon (a request is decoding them): worth waiting for.

        Each :meth:`predict` call takes one back; call :meth:`withdraw` for images that will
        not come (a refused request). Without announcements the collector never waits for
        company that is not on its way, so a lone client pays no ``max_wait_s``.
        """
        self._coming += n

    def withdraw(self, n: int) -> None:
        """Take back ``n`` announced images that will not be submitted."""
        self._coming = max(0, self._coming - n)

    def start(self) -> None:
        """Begin collecting (call from within the event loop)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop collecting; images still queued get a ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            _, fut, _t = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("server is shutting down"))

    async def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One image ``[c, h, w]`` -> ``(its row of fn's answer, size of the batch it ran in)``."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        fut: asyncio.Future[tuple[torch.Tensor, int]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((x, fut, time.monotonic()))  # unbounded queue: never blocks
        self._coming = max(0, self._coming - 1)
        return await fut

    async def _collect(self) -> list[_Item]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():  # already waiting: take without a timer
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0 or self._coming <= 0:  # time is up, or nobody else is on the way
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [item for item in batch if not item[1].done()]  # a client that left is not computed

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            start = time.monotonic()
            x = torch.stack([p for p, _, _ in batch])  # [n, c, h, w]
            try:
                y = await loop.run_in_executor(self.executor, self.fn, x)
            except Exception as e:  # one bad batch fails its requests, not the server
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            n = len(batch)
            self.batches += 1
            self.images += n
            if self.on_batch is not None:
                self.on_batch(n, [start - t for _, _, t in batch], time.monotonic() - start)
            for i, (_, fut, _) in enumerate(batch):
                if not fut.done():
                    fut.set_result((y[i], n))


__all__ = ["MicroBatcher"]
