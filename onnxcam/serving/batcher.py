"""Micro-batching: requests that arrive together share one session run; each gets back its images' maps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from prometheus_client import Histogram

from ..core.errors import OnnxcamError
from ..explainer import Explainer
from ..explanation import Explanation
from ..targets import fixed_classes
from .protocol import HTTPError


@dataclass
class Job:
    batch: np.ndarray
    targets: list  # one per image: a class index (-1: the top-1) or an onnxcam.targets object
    method: str
    future: asyncio.Future
    plain: bool  # every target a class known before the run: it can share a run with any other plain job


def job_result(result: Explanation, start: int, end: int) -> Explanation:
    """The maps of images start..end of a shared run, their image_index counted from the job's first image;
    boxes and masks only where its maps have some (a run shared with detections gives NaN boxes to the others)."""
    rows = (result.image_index >= start) & (result.image_index < end)

    def part(array, empty):
        return None if array is None or empty(array[rows]) else array[rows]

    boxes = part(result.boxes, lambda b: np.isnan(b).all())
    masks = part(result.masks, lambda m: not m.any())
    return Explanation(result.heatmaps[rows], result.logits[start:end], result.classes[rows], result.method,
                       result.image_index[rows] - start, part(result.scores, lambda _: False), boxes, masks,
                       None if result.attributions is None else result.attributions[start:end])


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
        self.loop: asyncio.AbstractEventLoop | None = None
        self.flushing: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None and not self.worker.done()

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)
        self.loop, self.flushing = asyncio.get_running_loop(), asyncio.Event()
        self.worker = asyncio.create_task(self._work())

    def flush(self) -> None:
        """From now on, run what is queued at once instead of waiting for a fuller batch (a drain has begun: no
        more requests are worth waiting for). Callable from any thread or a signal handler."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.flushing.set)

    async def stop(self, grace: float = 30.0) -> None:
        """Answer what is queued (for at most `grace` seconds), then stop the worker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.queue is not None and not self.queue.empty() and self.running and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.worker:
            self.worker.cancel()

    async def submit(self, batch: np.ndarray, targets, method: str) -> Explanation:
        """The Explanation of the batch, once its session run is done. `targets`: one per image (class indices,
        -1 for the top-1, or onnxcam.targets objects), or one for all."""
        items = list(targets) if isinstance(targets, (list, tuple, np.ndarray)) else [targets] * len(batch)
        plain = fixed_classes(items, self.explainer.spec.scores) is not None
        job = Job(batch, items, method, asyncio.get_running_loop().create_future(), plain)
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
                job = await self._next(deadline - loop.time())
                if job is None:
                    break
                jobs.append(job)
            for kind in dict.fromkeys((j.method, j.plain) for j in jobs):
                await self._run(loop, kind[0], [j for j in jobs if (j.method, j.plain) == kind])

    async def _next(self, remaining: float) -> Job | None:
        """The next queued job within `remaining` seconds; None when time is up. Flushing, only what is queued
        already joins the batch."""
        if self.flushing.is_set():
            return None if self.queue.empty() else self.queue.get_nowait()
        if remaining <= 0:
            return None
        getter = asyncio.ensure_future(self.queue.get())
        flushed = asyncio.ensure_future(self.flushing.wait())
        await asyncio.wait({getter, flushed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        flushed.cancel()
        getter.cancel()  # a no-op where the job arrived: it is kept below, never lost
        return getter.result() if getter.done() and not getter.cancelled() else None

    async def _run(self, loop: asyncio.AbstractEventLoop, method: str, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # a request that timed out or went away
        if not jobs:
            return
        batch = np.concatenate([j.batch for j in jobs])
        targets = [target for job in jobs for target in job.targets]
        self.batch_sizes.observe(len(batch))
        try:
            result = await loop.run_in_executor(None, lambda: self.explainer.explain(batch, method, targets))
        except OnnxcamError as error:
            if len(jobs) > 1:  # one request's bad target (known only once the outputs are seen) spares the others
                for job in jobs:
                    await self._run(loop, method, [job])
                return
            return self._fail(jobs, error)
        except Exception as error:  # noqa: BLE001 (one bad batch must not stop the worker)
            return self._fail(jobs, error)
        start = 0
        for job in jobs:
            end = start + len(job.batch)
            if not job.future.done():
                job.future.set_result(job_result(result, start, end))
            start = end

    @staticmethod
    def _fail(jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
