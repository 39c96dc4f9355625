"""Micro-batching: requests that arrive together share one session run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from prometheus_client import Histogram

from ..explainer import Explainer
from .protocol import HTTPError


@dataclass
class Job:
    batch: np.ndarray
    classes: np.ndarray
    method: str
    future: asyncio.Future


class MicroBatcher:
    """Requests that arrive together run as one session: up to `max_batch` images, waiting at most
    `max_wait` seconds after the first. The queue is bounded; a full queue refuses at once (503)."""

    def __init__(self, explainer: Explainer, batch_sizes: Histogram, max_batch: int, max_wait: float,
                 queue_size: int):
        self.explainer, self.batch_sizes = explainer, batch_sizes
        self.max_batch, self.max_wait = max_batch, max_wait
        self.queue: asyncio.Queue[Job] | None = None
        self.queue_size = queue_size
        self.worker: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None and not self.worker.done()

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)
        self.worker = asyncio.create_task(self._work())

    async def stop(self, grace: float = 30.0) -> None:
        """Answer what is queued (for at most `grace` seconds), then stop the worker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.queue is not None and not self.queue.empty() and self.running and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.worker:
            self.worker.cancel()

    async def submit(self, batch: np.ndarray, classes: np.ndarray, method: str):
        """(logits, heatmaps, targets) for the batch, once its session run is done."""
        job = Job(batch, classes, method, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPError(503, "server busy: the request queue is full, try again") from None
        return await job.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while sum(len(j.batch) for j in jobs) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            for method in dict.fromkeys(j.method for j in jobs):
                await self._run(loop, method, [j for j in jobs if j.method == method])

    async def _run(self, loop: asyncio.AbstractEventLoop, method: str, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # a request that timed out or went away
        if not jobs:
            return
        batch = np.concatenate([j.batch for j in jobs])
        classes = np.concatenate([j.classes for j in jobs])
        self.batch_sizes.observe(len(batch))
        try:
            result = await loop.run_in_executor(None, lambda: self.explainer.explain(batch, method, classes))
        except Exception as error:  # noqa: BLE001 (one bad batch must not stop the worker)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        start = 0
        for job in jobs:
            end = start + len(job.batch)
            if not job.future.done():
                job.future.set_result((result.logits[start:end], result.heatmaps[start:end],
                                       result.targets[start:end]))
            start = end
