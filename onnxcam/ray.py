"""The `explain` job on a Ray cluster, for datasets one machine cannot get through.

The driver holds the local job (onnxcam.jobs): its settings, its record of finished images, its table, its output
names, so that `--resume` and every file are the local job's. A pool of actors (spread over the nodes, each
reserving its share of the cores: one per node is a local job per node) runs the local job's pipeline on chunks
of the files: threads read (local paths every node mounts, or fsspec URIs: s3://, gs://) and decode ahead of the
session, threads write the overlays and heatmaps whole (write, then rename) into the output folder every node
mounts, behind it. Back to the driver come each image's record line and, for the table, its 8-bit heatmaps; the
driver commits them a batch at a time, as the local job's committer does. The chunk of an actor that dies, or
whose node is lost, is given to another actor, and a new one is started in its place: each image is committed
once.

    import onnxcam.ray
    onnxcam.ray.explain_on_ray("model.onnx", ["s3://bucket/images/a.jpg", ...], "/shared/out", actors=4)
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from .batches import explain_batches
from .core.errors import ExplainError
from .core.files import is_remote
from .explainer import Explainer
from .jobs import Outputs, Source, Summary
from .jobs.job import DEFAULT_OUTPUTS, Job, finish_batch, remove_leftovers

CHUNK = 16  # batches per actor call: an actor's pipeline fills and drains once per call
IN_FLIGHT = 2  # calls given to an actor at once: the next waits behind the one running, so the actor never idles
TRIES = 3  # times a chunk is given to an actor before the job fails (an image that kills its actor each time)


class ExplainActor:
    """Holds one session and runs the local job's pipeline on chunks of files: decoding ahead, writing behind."""

    def __init__(self, model: bytes, outdir: str, outputs: Outputs, method: str, target, batch_size: int,
                 provider: str, threads: int):
        with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as handle:
            handle.write(model)
        try:
            self.explainer = Explainer(handle.name, provider=provider, threads=threads)
        finally:
            os.unlink(handle.name)
        self.outdir, self.outputs, self.method, self.target = Path(outdir), outputs, method, target
        self.batch_size, self.threads = batch_size, threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="onnxcam-write")

    def ready(self) -> bool:
        return True

    def explain(self, chunk: list[tuple[str, str, str]]) -> list[list[tuple]]:
        """(URI, path as given, output name) per file -> per batch, finish_batch's entries, their files written."""
        given = {uri: (path, name) for uri, path, name in chunk}
        batches = [finish_batch(batch, self.outdir, self.outputs, self.method, self.explainer.labels,
                                lambda uri: given[uri][1], self.pool.submit)
                   for batch in explain_batches(self.explainer, list(given), method=self.method, targets=self.target,
                                                batch_size=self.batch_size, workers=self.threads,
                                                keep_images=self.outputs.overlays)]
        return [[(dict(line, path=given[line["path"]][0]), maps, written and written.result())
                 for line, maps, written in entries] for entries in batches]


class _Pool:
    """Actors fed chunks of files, IN_FLIGHT calls each. The chunk of an actor that dies (or whose node is lost) is
    given to another, and a new actor is started in its place, used once Ray has placed it."""

    def __init__(self, start: Callable[[], object], size: int):
        self.start = start
        self.starting = {}  # the ref of its ready() -> actor
        self.live = {}  # actor -> calls in flight
        self.calls = {}  # ref -> (actor, chunk, tries)
        self.lost = 0
        for _ in range(size):
            self._start()

    def _start(self) -> None:
        actor = self.start()
        self.starting[actor.ready.remote()] = actor

    def _lose(self, actor) -> None:
        if self.live.pop(actor, None) is not None:
            self.lost += 1
            ray.kill(actor)
            self._start()

    def run(self, chunks: Iterator[list]) -> Iterator[list[tuple]]:
        """Each batch's entries, as its chunk comes back."""
        again: deque[tuple[list, int]] = deque()  # chunks to give once more, with their tries so far
        for ref in self._given(chunks, again):
            if ref in self.starting:
                actor = self.starting.pop(ref)
                try:
                    ray.get(ref)
                    self.live[actor] = 0
                except ray.exceptions.RayActorError:
                    self.lost += 1
                continue
            actor, chunk, tries = self.calls.pop(ref)
            try:
                batches = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):  # its node lost, result and all
                self._lose(actor)
                if tries + 1 >= TRIES:
                    raise ExplainError(f"{TRIES} actors died on the chunk of {chunk[0][1]}: see Ray's logs") from None
                again.append((chunk, tries + 1))
                continue
            if actor in self.live:  # not lost meanwhile
                self.live[actor] -= 1
            yield from batches

    def _given(self, chunks: Iterator[list], again: deque) -> Iterator:
        """Give chunks to the actors with room; then the next ref that is ready (a call, or an actor started)."""
        exhausted = False
        while True:
            for actor in [a for a, calls in self.live.items() for _ in range(IN_FLIGHT - calls)]:
                if not again and not exhausted:
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                    else:
                        again.append((chunk, 0))
                if again:
                    chunk, tries = again.popleft()
                    self.calls[actor.explain.remote(chunk)] = (actor, chunk, tries)
                    self.live[actor] += 1
            if not self.calls and exhausted and not again:
                return
            if not self.calls and not self.starting and not self.live:
                raise ExplainError("no actor could be started on the Ray cluster: see Ray's logs")
            ready, _ = ray.wait([*self.calls, *self.starting], num_returns=1)
            yield ready[0]

    def close(self) -> None:
        for actor in [*self.live, *self.starting.values()]:
            ray.kill(actor)


def explain_on_ray(model: str | os.PathLike, sources: Iterable[Source | str | os.PathLike], outdir, *,
                   address: str | None = None, actors: int = 1, cpus: int | None = None, method: str = "gradcam",
                   target: int | None = None, batch_size: int = 8, outputs: Outputs = DEFAULT_OUTPUTS,
                   resume: bool = False, provider: str = "auto", report: Callable[[str], None] | None = None,
                   complain: Callable[[str], None] = lambda line: None,
                   progress: Callable[[int, int | None], None] | None = None) -> Summary:
    """Explain `sources` on the Ray cluster at `address` (None: RAY_ADDRESS's, or a new local one; a cluster
    already joined by this process is used as it is) into `outdir`, a folder every node mounts: what
    `explain_files` writes there (`outputs`, the record, predictions.json), and with `resume` only the images its
    record lacks.

    `actors` sessions run at once, spread over the nodes, each reserving `cpus` cores (default: the cluster's cores
    shared out, at most a node's) for its ONNX Runtime threads, decoding and writing; and one GPU each, with the
    CUDA provider, where the cluster has GPUs. `report`, `complain`, `progress` as `explain_files`'s.
    """
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    if provider == "auto":
        provider = "cuda" if gpus else "cpu"
    cpus = cpus or _share(actors)
    explainer = Explainer(model, provider="cpu", threads=1)  # a wrong file or class fails here, in one line
    if isinstance(target, int):
        explainer.class_indices(target, 1)
    batch_size = explainer.fixed_batch or batch_size
    outdir = Path(outdir)
    job = Job(explainer, outdir, outputs, method, target, resume, (report, complain, progress))
    remote = ray.remote(ExplainActor).options(num_cpus=cpus, num_gpus=1 if gpus else 0, max_restarts=0,
                                              max_task_retries=0, scheduling_strategy="SPREAD")
    arguments = (ray.put(Path(model).read_bytes()), str(outdir.resolve()), outputs, method, target, batch_size,
                 provider, cpus)
    pool = _Pool(lambda: remote.remote(*arguments), actors)
    try:
        for entries in pool.run(_chunks(job, job.pending(sources), batch_size * CHUNK)):
            job.commit(job.take_number(), entries)
    finally:
        pool.close()
    summary = job.finish()
    if pool.lost:  # the temporary files of writes a lost actor cut short
        remove_leftovers(outdir)
    return summary


def _share(actors: int) -> int:
    """Cores per actor: the cluster's shared out among `actors`, at most the largest node's."""
    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    return max(1, min(int(sum(nodes)) // actors, int(max(nodes, default=1))))


def _chunks(job: Job, sources: Iterator[Source], size: int) -> Iterator[list[tuple[str, str, str]]]:
    """(URI, path as given, output name) per file, `size` at a time; output names taken here, in the order of the
    sources, so that a chunk given again writes the same files."""
    chunk: list[tuple[str, str, str]] = []
    uris: set[str] = set()
    for source in sources:
        uri = _as_uri(source.path)
        if len(chunk) == size or uri in uris:  # a file listed twice under two paths: in two chunks, as two images
            yield chunk
            chunk, uris = [], set()
        chunk.append((uri, source.path, job.output_name(source.name)))
        uris.add(uri)
    if chunk:
        yield chunk


def _as_uri(path: str) -> str:
    """An absolute local path (what every node of a cluster with a shared filesystem sees; made without a look at
    the filesystem, on the driver's one thread), or the URI."""
    return path if is_remote(path) else os.path.abspath(path.removeprefix("file://"))
