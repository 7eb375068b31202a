"""Dynamic batching: concurrent requests share one ONNX Runtime call.

A request announces itself while its image is decoded (``coming``), then puts the preprocessed
image on a bounded queue and awaits a future. A worker task takes the first waiting image,
gathers more until ``max_batch`` or ``max_wait_ms`` after the first, but waits only while other
images are on their way: a lone request runs at once instead of waiting for company that is not
coming. The batch runs in a thread (ONNX Runtime releases the GIL), so the event loop keeps
accepting requests meanwhile. A full queue is refused at once (the caller answers 503).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


@dataclass
class _Item:
    pixels: np.ndarray
    with_features: bool
    future: asyncio.Future


class Answer(NamedTuple):
    probabilities: np.ndarray
    features: np.ndarray | None
    batch_size: int  # images in the ONNX Runtime call this one ran in


RunBatch = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]


class Batcher:
    def __init__(self, run_batch: RunBatch, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None, workers: int = 1) -> None:
        # No workers or empty batches would never answer; asyncio reads a queue size of 0 as unbounded.
        if max_batch < 1 or workers < 1 or max_queue < 1:
            raise ValueError(f"max_batch, workers and max_queue must be at least 1 (got {max_batch}, {workers}, "
                             f"{max_queue})")
        self.run_batch = run_batch
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self.on_batch = on_batch or (lambda size: None)
        self.workers = workers  # batches in flight at once
        self._tasks: list[asyncio.Task] = []
        self._coming = 0  # images being decoded that will be submitted next

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Wrap the decoding of an image that will be submitted: batches wait for it."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work(), name=f"batcher-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        while not self.queue.empty():  # nobody will answer these: fail them rather than hang
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(QueueFull("the service is shutting down"))

    async def submit(self, pixels: np.ndarray, with_features: bool = False) -> Answer:
        """One image's probabilities, features (or None) and the size of the batch it ran in."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Item(pixels, with_features, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.queue.maxsize} images are already waiting") from None
        return await future

    async def _gather(self) -> list[_Item]:
        items = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            try:
                items.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            if not self._coming:  # nobody else is on the way: waiting would only add latency
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _work(self) -> None:
        while True:
            items = [item for item in await self._gather() if not item.future.cancelled()]
            if not items:
                continue
            with_features = any(item.with_features for item in items)
            try:
                probabilities, features = await asyncio.to_thread(
                    self.run_batch, np.stack([item.pixels for item in items]), with_features)
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request, never lost
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.on_batch(len(items))
            for i, item in enumerate(items):
                if not item.future.done():
                    item.future.set_result(Answer(probabilities[i], None if features is None else features[i],
                                                  len(items)))
