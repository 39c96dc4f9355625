"""Explaining image files into a folder, streamed: the job behind `onnxcam explain` and `onnxcam demo`.

Three stages joined by bounded queues, so that memory stays flat whatever the number of files:
a pool of threads reads, decodes and preprocesses; the caller's thread runs the session batch after
batch; a pool of threads draws, encodes and writes, and one committer thread appends each finished batch
to the record (JSON Lines, fsynced) in order. OpenCV and ONNX Runtime release the GIL, so threads suffice.

Resuming after a crash (even `kill -9`): an image is done when its record line is; files are written whole
(write, then rename) before their lines; the table's rows of a batch are staged in a file of their own before
the batch's lines, and staged files are merged into Parquet parts named by the batches they hold. On resume,
leftovers of an interrupted write are deleted, staged rows without record lines are dropped, staged rows
already in a part are dropped, and only the images without a line are explained again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..batches import FileBatch, explain_batches
from ..core.errors import ExplainError
from ..core.files import write_atomic
from ..explainer import Explainer
from .entries import describe, has_regions, map_entries, map_names, regions
from .outputs import Outputs, finish_image
from .record import RECORD, Record, write_predictions
from .sources import Source
from .table import TABLE, Table

SETTINGS = "job.json"  # what the job writes, for --resume to check

DEFAULT_OUTPUTS = Outputs()  # overlays only


@dataclass
class Summary:
    """How a job went: images explained and failed in this run, images skipped as already done."""

    explained: int = 0
    failed: int = 0
    skipped: int = 0
    outdir: Path = Path(".")
    table: Path | None = None
    record: Path | None = None


class _Committer(threading.Thread):
    """Commits finished batches in order: waits for their writes, stages their table rows, appends their
    record lines, then tells the callbacks. A bounded queue holds the batches in between."""

    def __init__(self, job: Job, depth: int = 2):
        super().__init__(name="onnxcam-commit", daemon=True)
        self.job, self.queue, self.error = job, queue.Queue(depth), None

    def put(self, pending) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(pending, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Commit what is queued, stop, and raise the error a commit met, if one did."""
        while self.is_alive():
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.join()
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        while (pending := self.queue.get()) is not None:
            try:
                self.job.commit(*pending)
            except Exception as error:  # noqa: BLE001 - handed to the caller's thread, which raises it
                self.error = error
                return


def remove_leftovers(outdir: Path) -> None:
    """Delete the temporary files of writes cut short (by a crash) anywhere under `outdir`."""
    for folder, _, names in os.walk(outdir):
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(folder, name))


def _check_settings(path: Path, settings: dict, resume: bool) -> None:
    """Keep what a job writes in `path`; a resumed job must write the same, or the images done before would
    lack what it adds (a table resumed from an overlays-only run would hold the new images alone)."""
    settings = json.loads(json.dumps({key: value for key, value in settings.items() if key != "rows_per_part"},
                                     default=repr))  # a target object (a Detection) by its repr
    if resume and path.exists():
        before = json.loads(path.read_text())
        changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in settings.items()
                   if before.get(key) != value]
        if changed:
            raise ExplainError(f"{path.parent} holds a job started with other settings ({'; '.join(changed)}): "
                               f"resume it with the same ones, or write to another folder")
        return
    if resume and (path.parent / RECORD).exists():  # images done, settings unknown: what they got cannot be told
        raise ExplainError(f"{path.parent} holds a job whose settings were not kept (written by an older onnxcam, "
                           f"or {SETTINGS} removed): write to another folder")
    write_atomic(path, json.dumps(settings).encode())


class Job:
    """The state of one `explain_files` run: the record, the table, output names taken, counts."""

    def __init__(self, explainer: Explainer, outdir: Path, outputs: Outputs, method: str, target: int | None,
                 resume: bool, callbacks):
        if re.match(r"[A-Za-z][\w+.-]+:/", str(outdir)):  # s3://bucket/out, which Path made s3:/bucket/out
            raise ExplainError("the output folder must be a local path (on Ray, one every node mounts): writing to "
                               "an object-store URI such as s3:// is not supported")
        outdir.mkdir(parents=True, exist_ok=True)
        if resume:
            remove_leftovers(outdir)
        self.explainer, self.outdir, self.outputs, self.method = explainer, outdir, outputs, method
        self.report, self.complain, self.progress = callbacks
        _check_settings(outdir / SETTINGS, {"method": method, "target": target, **dataclasses.asdict(outputs)}, resume)
        self.record = Record(outdir / RECORD, resume)
        self.table = Table(outdir, explainer.spec.input_size, self.record.batches, resume,
                           outputs.rows_per_part) if outputs.table else None
        last = max(self.record.batches | {self.table.last_batch if self.table else -1}, default=-1)
        self.next_batch = last + 1
        self.taken = set(self.record.names)
        self.summary = Summary(outdir=outdir, table=outdir / TABLE if outputs.table else None,
                               record=outdir / RECORD)
        self.total: int | None = None

    def pending(self, sources) -> Iterator[Source]:
        """The sources the record lacks, each once; counted first when they can be listed again."""
        self.summary.skipped = len(self.record.done)
        if iter(sources) is not sources:  # listed again rather than held in memory
            self.total = sum(1 for source in pending_sources(sources, set(self.record.done)))
        return pending_sources(sources, set(self.record.done))

    def unique_name(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self.taken:
            n += 1
            candidate = f"{name}_{n}"
        self.taken.add(candidate)
        return candidate

    def prepare(self, batch: FileBatch, names: dict[str, str], pool: ThreadPoolExecutor) -> tuple:
        """Record lines for a batch, the writes of its explained images submitted to `pool`."""
        number = self.take_number()
        entries = finish_batch(batch, self.outdir, self.outputs, self.method, self.explainer.labels,
                               lambda path: self.output_name(names.pop(path)), pool.submit)
        return number, entries

    def take_number(self) -> int:
        number, self.next_batch = self.next_batch, self.next_batch + 1
        return number

    def output_name(self, name: str) -> str:
        """The name an image's files get: `name`, numbered when taken (no files: as it is)."""
        return self.unique_name(name) if self.outputs.files else name

    def commit(self, number: int, entries: list) -> None:
        """In the committer thread: wait for a batch's writes, stage its rows, append its lines, tell.
        `entries` as finish_batch's, each image's writes done or a future of them."""
        columns = {name: [] for name in ("path", "method", "class", "label", "score", "top5", "heatmap",
                                         "height", "width")}
        lines = []
        for line, maps, written in entries:
            line["batch"] = number
            if written is not None:
                files, levels = written.result() if isinstance(written, Future) else written
                for entry, wrote in zip(maps, files, strict=True):
                    entry.update(wrote)
                if levels is not None:
                    self._add_rows(columns, line, maps, levels)
                if len(maps) == 1:
                    line.update(maps[0])
                else:
                    line["maps"] = maps
            lines.append(line)
        if self.table is not None and columns["path"]:
            self.table.stage(number, columns)
        self.record.append(lines)
        if self.table is not None:
            self.table.add_recorded()
        self._tell(lines)

    def finish(self) -> Summary:
        """After the last commit: the table's staged rows merged into its parts, predictions.json written."""
        if self.table is not None:
            self.table.merge()
        write_predictions(self.record, self.outdir / "predictions.json")
        return self.summary

    def _add_rows(self, columns: dict, line: dict, maps: list[dict], levels: list[np.ndarray]) -> None:
        for entry, level in zip(maps, levels, strict=True):
            for key, value in (("path", line["path"]), ("method", line["method"]), ("class", entry["target"]),
                               ("label", entry["label"]), ("score", entry["score"]), ("top5", line["top5"]),
                               ("heatmap", level.tobytes()), ("height", level.shape[0]), ("width", level.shape[1])):
                columns[key].append(value)

    def _tell(self, lines: list[dict]) -> None:
        for line in lines:
            if "error" in line:
                self.summary.failed += 1
                self.complain(line["error"])
                continue
            self.summary.explained += 1
            if self.report is not None:
                self.report(describe(line, self.outdir))
        if self.progress is not None:
            self.progress(self.summary.explained + self.summary.failed, self.total)


def finish_batch(batch: FileBatch, outdir: Path, outputs: Outputs, method: str, labels,
                 name_of: Callable[[str], str], submit: Callable) -> list[tuple]:
    """Per image of a batch: its record line (its batch number set at commit), its maps' entries, and the writes
    of its files (finish_image) handed to `submit` (a pool's); a file that failed, its line alone. `name_of`:
    the output name of a path."""
    entries = [({"path": path, "batch": None, "error": message}, None, None) for path, message in batch.errors]
    explanation = batch.explanation
    if explanation is None:
        return entries
    tops = [[] for _ in batch.paths] if has_regions(explanation) else explanation.top_k(5, labels)
    for i, (path, indices) in enumerate(zip(batch.paths, explanation.maps_per_image(), strict=True)):
        maps = map_entries(explanation, i, indices, labels)
        line = {"path": path, "batch": None, "method": method, "top5": tops[i]}
        name, files = name_of(path), None
        if outputs.files:
            line["name"] = name
            files = map_names(name, [int(explanation.classes[m]) for m in indices])
        image = batch.images[i] if batch.images is not None else None
        entries.append((line, maps, submit(finish_image, outdir, outputs, files, image, explanation.heatmaps[indices],
                                           regions(explanation, indices, maps))))
    return entries


def explain_files(explainer: Explainer, sources: Iterable[Source | str | os.PathLike], outdir: Path, *,
                  method: str = "gradcam", target: int | None = None, batch_size: int = 8,
                  outputs: Outputs = DEFAULT_OUTPUTS, resume: bool = False, workers: int | None = None,
                  report: Callable[[str], None] | None = None, complain: Callable[[str], None] = lambda line: None,
                  progress: Callable[[int, int | None], None] | None = None, **options) -> Summary:
    """Explain image files into `outdir`, streamed: overlays and heatmaps per image and/or the Parquet table
    (`outputs`), the record `record.jsonl`, and at the end `predictions.json` (path -> record line).

    Each explained image is told to `report` in one line, each bad one to `complain` (and skipped; the
    others are still written), `progress(done, total)` after each batch (`total` is None when `sources` can
    be iterated only once). With `resume`, images the record holds are skipped. A source listed twice is
    explained once. Returns the counts.
    """
    job = Job(explainer, outdir, outputs, method, target, resume, (report, complain, progress))
    names: dict[str, str] = {}

    def paths() -> Iterator[str]:
        for source in job.pending(sources):
            names[source.path] = source.name
            yield source.path

    workers = workers or os.cpu_count() or 1
    committer = _Committer(job)
    committer.start()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="onnxcam-write") as pool:
            for batch in explain_batches(explainer, paths(), method=method, targets=target, batch_size=batch_size,
                                         workers=workers, keep_images=outputs.overlays, **options):
                committer.put(job.prepare(batch, names, pool))
    finally:
        committer.close()
    return job.finish()


def pending_sources(sources, done: set[str]) -> Iterator[Source]:
    """The sources not done yet, each path once (later copies are skipped and remembered as done)."""
    for item in sources:
        source = item if isinstance(item, Source) else Source(os.fspath(item), Path(os.fspath(item)).stem)
        if source.path not in done:
            done.add(source.path)
            yield source

