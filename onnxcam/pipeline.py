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
import io
import json
import os
import queue
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .core import overlay, preprocess
from .core.images import annotate
from .core.scores import probabilities
from .errors import ExplainError, ImageError
from .explainer import Explainer, Explanation
from .files import PNG_FAST, atomic_path, decode_image, encode_image, read_image, write_atomic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
RECORD = "record.jsonl"
ROW_GROUP = 256  # rows of a Parquet row group: what is left to write when the job ends is at most this
SETTINGS = "job.json"  # what the job writes, for --resume to check
TABLE = "table"
STAGING = ".staging"
SAVE_CHOICES = ("overlays", "heatmaps", "table")


@dataclass(frozen=True)
class Source:
    """An image to explain: `path` as given (a file path or a URI), `name` its output name without suffix."""

    path: str
    name: str


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    """Images in `folder` in sorted order, subfolders after the files when `recursive`."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    for entry in entries:
        if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            yield Path(entry.path)
    if recursive:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                yield from _walk(Path(entry.path), recursive)


def iter_sources(items: Iterable[str | os.PathLike], recursive: bool = False) -> Iterator[Source]:
    """Files as given, images inside given folders (nested ones too when `recursive`), URIs as given.

    A folder's images are named by their path inside it, so that same-named files of two subfolders
    do not overwrite each other's outputs.
    """
    for item in items:
        text = os.fspath(item)
        if "://" in text and not text.startswith("file://"):
            yield Source(text, Path(text.rstrip("/").rsplit("/", 1)[-1]).stem or "image")
            continue
        path = Path(text.removeprefix("file://"))
        if path.is_dir():
            for found in _walk(path, recursive):
                yield Source(str(found), str(found.relative_to(path).with_suffix("")))
        else:
            yield Source(text, path.stem)


def read_list(path: str | os.PathLike) -> Iterator[str]:
    """The paths or URIs of a list file, one per line; blank lines and lines starting with # are skipped."""
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if line.strip() and not line.lstrip().startswith("#"):
                    yield line.strip()
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror})") from None


class Listing:
    """The sources of a job, listed afresh at each pass (folders walked again, the list file read again):
    a job counts them first, for its progress, without holding them in memory."""

    def __init__(self, items: Iterable[str | os.PathLike] = (), recursive: bool = False,
                 list_file: str | os.PathLike | None = None):
        self.items, self.recursive, self.list_file = list(items), recursive, list_file

    def __iter__(self) -> Iterator[Source]:
        yield from iter_sources(self.items, self.recursive)
        if self.list_file is not None:
            yield from iter_sources(read_list(self.list_file), self.recursive)


def collect_images(paths) -> list[Path]:
    """Files as given, and the images inside given folders (sorted)."""
    return [Path(source.path) for source in iter_sources(paths)]


def load_image(source: str) -> np.ndarray:
    """uint8 RGB from a file path, a file:// URI or, through fsspec, any URI it opens (s3://, gs://, http://)."""
    if "://" not in source or source.startswith("file://"):
        return read_image(source.removeprefix("file://"))
    try:
        import fsspec
    except ImportError:
        raise ImageError(f"{source}: reading URIs needs fsspec (pip install fsspec)") from None
    try:
        with fsspec.open(source, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError, ImportError) as error:
        raise ImageError(f"{source}: cannot be read ({error})") from None
    return decode_image(data, source)


@dataclass
class FileBatch:
    """One session run over files: the explanation of those that decoded, and the errors of those that did not."""

    paths: list[str]  # the files explained, in the order of the explanation's images
    explanation: Explanation | None  # None when no file of the batch could be decoded
    images: list[np.ndarray] | None  # the decoded uint8 RGB images, when kept
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line message)
    sizes: list[tuple[int, int]] | None = None  # (height, width) of each decoded image, in the order of `paths`


def maps_per_image(explanation: Explanation) -> list[list[int]]:
    """For each image of the batch, the indices of its heatmaps: by `image_index` where the explanation
    has one (several targets per image), else one map per image."""
    count = explanation.logits.shape[0]
    index = getattr(explanation, "image_index", None)
    if index is None:
        return [[i] for i in range(count)]
    grouped: list[list[int]] = [[] for _ in range(count)]
    for position, image in enumerate(np.asarray(index).tolist()):
        grouped[image].append(position)
    return grouped


def _decode(source: str, spec, keep_image: bool):
    """(input tensor, image or None, (height, width)) for one file, or the ImageError's message."""
    try:
        image = load_image(source)
    except ImageError as error:
        return str(error)
    tensor = preprocess([image], spec.input_size, spec.mean, spec.std, spec.input_layout, spec.input_type)[0]
    return tensor, image if keep_image else None, image.shape[:2]


def _decoded(paths: Iterable[str], spec, workers: int, ahead: int, keep_images: bool):
    """(path, decoded or message) in order, at most `ahead` files in flight in a pool of `workers` threads."""
    pending: deque[tuple[str, Future]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="onnxcam-decode")
    try:
        for path in paths:
            pending.append((path, pool.submit(_decode, path, spec, keep_images)))
            if len(pending) >= ahead:
                done_path, future = pending.popleft()
                yield done_path, future.result()
        while pending:
            done_path, future = pending.popleft()
            yield done_path, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def explain_batches(explainer: Explainer, paths: Iterable[str], *, method: str = "gradcam", targets=None,
                    batch_size: int = 8, workers: int | None = None, keep_images: bool = False,
                    **options) -> Iterator[FileBatch]:
    """Explain files batch by batch, one session run each, while a pool of threads decodes the next ones.

    A file that cannot be read or decoded is reported in its batch's `errors` and skipped.
    `targets`: None (each image's top-1) or one class for all; `options` go to `Explainer.explain`.
    """
    workers = workers or os.cpu_count() or 1
    batch: list[tuple[str, tuple]] = []
    errors: list[tuple[str, str]] = []
    for path, decoded in _decoded(paths, explainer.spec, workers, batch_size * (workers + 2), keep_images):
        if isinstance(decoded, str):
            errors.append((path, decoded))
        else:
            batch.append((path, decoded))
        if len(batch) + len(errors) == batch_size:
            yield _run(explainer, batch, errors, method, targets, keep_images, options)
            batch, errors = [], []
    if batch or errors:
        yield _run(explainer, batch, errors, method, targets, keep_images, options)


def _run(explainer, batch, errors, method, targets, keep_images, options) -> FileBatch:
    if not batch:
        return FileBatch([], None, None, errors)
    tensors = np.stack([tensor for _, (tensor, _, _) in batch])
    explanation = explainer.explain(tensors, method=method, targets=targets, **options)
    images = [image for _, (_, image, _) in batch] if keep_images else None
    return FileBatch([path for path, _ in batch], explanation, images, errors, [size for _, (_, _, size) in batch])


@dataclass(frozen=True)
class Outputs:
    """What the job writes: overlays (PNG or JPEG), heatmaps (8-bit PNG or float16 .npy), the Parquet table."""

    overlays: bool = True
    heatmaps: bool = False
    table: bool = False
    image_format: str = "png"
    heatmap_format: str = "png"
    alpha: float = 0.4
    colormap: str = "jet"
    rows_per_part: int = 10_000

    @classmethod
    def parse(cls, save: str, **options) -> Outputs:
        """From a comma-separated list of overlays, heatmaps and table."""
        chosen = {word.strip() for word in save.split(",") if word.strip()}
        unknown = chosen - set(SAVE_CHOICES)
        if unknown or not chosen:
            raise ExplainError(f"cannot save '{save}': choose one or more of {', '.join(SAVE_CHOICES)}",
                               option="save")
        return cls(overlays="overlays" in chosen, heatmaps="heatmaps" in chosen, table="table" in chosen, **options)

    @property
    def files(self) -> bool:
        return self.overlays or self.heatmaps


@dataclass
class Summary:
    """How a job went: images explained and failed in this run, images skipped as already done."""

    explained: int = 0
    failed: int = 0
    skipped: int = 0
    outdir: Path = Path(".")
    table: Path | None = None
    record: Path | None = None


def uint8_map(heatmap: np.ndarray) -> np.ndarray:
    """A [0, 1] heatmap as 8-bit levels (0-255, rounded)."""
    return np.uint8(np.clip(heatmap, 0, 1) * 255 + 0.5)


def _write_maps(outdir: Path, outputs: Outputs, names: list[str], image, heatmaps: np.ndarray, levels: list,
                regions: list[dict]) -> list[dict]:
    """Write one image's overlays (with each map's box and label, or mask outline, from `regions`: keyword
    arguments of core.images.annotate) and heatmaps, whole files; per map, the files written. `levels`: the
    heatmaps as 8-bit levels (uint8_map), drawn and written as they are."""
    written = []
    for name, heatmap, level, region in zip(names, heatmaps, levels, regions, strict=True):
        files = {}
        if outputs.overlays:
            suffix = ".jpg" if outputs.image_format == "jpeg" else ".png"
            picture = overlay(image, level, alpha=outputs.alpha, colormap=outputs.colormap)
            if region:
                picture = annotate(picture, **region)
            write_atomic(outdir / f"{name}{suffix}", encode_image(picture, outputs.image_format))
            files["overlay"] = f"{name}{suffix}"
        if outputs.heatmaps and outputs.heatmap_format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, heatmap.astype(np.float16))
            write_atomic(outdir / f"{name}.heatmap.npy", buffer.getvalue())
            files["heatmap"] = f"{name}.heatmap.npy"
        elif outputs.heatmaps:
            grey = cv2.imencode(".png", level, PNG_FAST)[1]  # one channel, 8 bits
            write_atomic(outdir / f"{name}.heatmap.png", grey.tobytes())
            files["heatmap"] = f"{name}.heatmap.png"
        written.append(files)
    return written


class Record:
    """The JSON Lines record of finished images: one line per image, appended a batch at a time and fsynced.

    Each line names its batch; the last line of a batch says so (`batch_end`). On resume, lines after the
    last complete batch (a write cut short) are cut off, so a batch is recorded whole or not at all.
    """

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.done: set[str] = set()
        self.names: set[str] = set()
        self.batches: set[int] = set()
        if resume and path.exists():
            self._load()
        else:
            path.write_bytes(b"")

    def _load(self) -> None:
        """Remember the lines of complete batches; cut off the rest."""
        complete, offset, pending = 0, 0, []
        with open(self.path, "rb") as lines:
            for line in lines:
                offset += len(line)
                try:
                    entry = json.loads(line)
                except ValueError:
                    break
                if not line.endswith(b"\n"):
                    break
                pending.append(entry)
                if entry.get("batch_end"):
                    for finished in pending:
                        self.done.add(finished["path"])
                        self.batches.add(finished["batch"])
                        if finished.get("name"):
                            self.names.add(finished["name"])
                    pending, complete = [], offset
        if complete < self.path.stat().st_size:
            os.truncate(self.path, complete)

    def append(self, entries: list[dict]) -> None:
        """Write the lines of one batch, then flush them to the disk."""
        entries[-1]["batch_end"] = True
        with open(self.path, "ab") as handle:
            handle.write(b"".join(json.dumps(entry).encode() + b"\n" for entry in entries))
            handle.flush()
            os.fsync(handle.fileno())

    def entries(self) -> Iterator[dict]:
        with open(self.path, "rb") as lines:
            for line in lines:
                yield json.loads(line)


def _table_schema(pa, size: tuple[int, int]):
    top = pa.struct([("class", pa.int64()), ("label", pa.string()), ("score", pa.float32())])
    # the heatmap's 8-bit levels as bytes, row-major: Parquet writes them 5x faster than a list of uint8 (one
    # repetition level per value), files as small; np.frombuffer(row.heatmap, np.uint8).reshape(height, width)
    levels = pa.binary(size[0] * size[1])
    return pa.schema([("path", pa.string()), ("method", pa.string()), ("class", pa.int64()), ("label", pa.string()),
                      ("score", pa.float32()), ("top5", pa.list_(top)), ("heatmap", levels),
                      ("height", pa.int32()), ("width", pa.int32())])


class Table:
    """The results table, Parquet parts under OUT/table: a row per heatmap with the path, method, class
    explained, its label and score, the top-5 classes, and the heatmap's 8-bit levels (height x width bytes).

    A batch's rows are first staged in a file of their own (OUT/.staging, uncompressed: a quick write), written
    before the batch's record lines. Once its lines are recorded, the batch's rows go on into the part being
    written (a hidden temporary file, row groups of about ROW_GROUP rows); a full part is closed, renamed to the
    first and last batch it holds, and only then are its staged files deleted. On resume a staged file is
    dropped if a part holds its batch or if the record lacks its batch, and kept for the next part otherwise.
    """

    def __init__(self, outdir: Path, size: tuple[int, int], recorded: set[int], resume: bool, rows_per_part: int):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
            from pyarrow import feather
        except ImportError:
            raise ExplainError("writing the table needs pyarrow: pip install 'onnxcam[dataset]'") from None
        self.pa, self.pq, self.feather, self.rows_per_part = pa, pq, feather, rows_per_part
        self.schema = _table_schema(pa, size)
        self.folder, self.staging = outdir / TABLE, outdir / STAGING
        self.folder.mkdir(parents=True, exist_ok=True)
        merged = []
        for part in self.folder.glob("part-*.parquet"):
            if resume:
                merged.append(tuple(int(n) for n in part.stem.split("-")[1:]))
            else:
                part.unlink()
        self.staged: dict[int, object] = {}  # batch -> its rows, staged and not yet in the part being written
        self.part: list[int] = []  # the batches written into the open part
        self.writer, self.tmp, self.group, self.rows = None, None, [], 0
        for staged in sorted(self.staging.glob("batch-*.arrow")):  # none where the folder is not there
            batch = int(staged.stem.split("-")[1])
            if not resume or batch not in recorded or any(first <= batch <= last for first, last in merged):
                staged.unlink()
            else:
                self.staged[batch] = self.feather.read_table(staged)
        self.last_batch = max([last for _, last in merged] + list(self.staged), default=-1)

    def _staged_path(self, batch: int) -> Path:
        return self.staging / f"batch-{batch:09d}.arrow"

    def stage(self, batch: int, columns: dict) -> None:
        """Write a batch's rows to their staging file (Arrow's IPC format, uncompressed: 8x quicker to write than
        Parquet), whole or not at all."""
        table = self.pa.Table.from_pydict(columns, schema=self.schema)
        self.staging.mkdir(exist_ok=True)
        with atomic_path(self._staged_path(batch)) as tmp:
            self.feather.write_feather(table, tmp, compression="uncompressed")
        self.staged[batch] = table

    def add_recorded(self) -> None:
        """Move the staged batches into the open part, closing it once full. Called only after the record holds
        their batches: a part must never hold a batch the record lacks, or a resumed run would redo its images."""
        for batch, table in sorted(self.staged.items()):
            if self.writer is None:
                fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".part-", suffix=".tmp")
                os.close(fd)
                # zstd level 1: 1.7x quicker than its default level 3, parts 1.5x larger (32 against 21 KB a map)
                self.tmp = Path(tmp)
                self.writer = self.pq.ParquetWriter(tmp, self.schema, compression="zstd", compression_level=1)
            self.part.append(batch)
            self.group.append(table)
            self.rows += table.num_rows
            if sum(t.num_rows for t in self.group) >= ROW_GROUP:
                self._write_group()
            if self.rows >= self.rows_per_part:
                self._close_part()
        self.staged.clear()

    def merge(self) -> None:
        """At the end of a job: the staged batches into the last part, closed; the staging folder removed once
        empty (also when a resumed run had nothing left to stage)."""
        self.add_recorded()
        if self.writer is not None:
            self._close_part()
        if self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()

    def _write_group(self) -> None:
        self.writer.write_table(self.pa.concat_tables(self.group))
        self.group = []

    def _close_part(self) -> None:
        if self.group:
            self._write_group()
        self.writer.close()
        os.replace(self.tmp, self.folder / f"part-{self.part[0]:09d}-{self.part[-1]:09d}.parquet")
        for batch in self.part:
            self._staged_path(batch).unlink()
        self.writer, self.tmp, self.part, self.rows = None, None, [], 0


def _finish_image(outdir: Path, outputs: Outputs, names, image, heatmaps: np.ndarray, regions: list[dict]):
    """In the writing pool: one image's files, and its maps as 8-bit levels for the table."""
    levels = [uint8_map(heatmap) for heatmap in heatmaps]  # once, for the overlay, the PNG and the table alike
    files = _write_maps(outdir, outputs, names, image, heatmaps, levels, regions) if outputs.files \
        else [{} for _ in heatmaps]
    return files, levels if outputs.table else None


class _Committer(threading.Thread):
    """Commits finished batches in order: waits for their writes, stages their table rows, appends their
    record lines, then tells the callbacks. A bounded queue holds the batches in between."""

    def __init__(self, job: _Job, depth: int = 2):
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


def _cleanup(outdir: Path) -> None:
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


class _Job:
    """The state of one `explain_files` run: the record, the table, output names taken, counts."""

    def __init__(self, explainer: Explainer, outdir: Path, outputs: Outputs, method: str, target: int | None,
                 resume: bool, callbacks):
        outdir.mkdir(parents=True, exist_ok=True)
        if resume:
            _cleanup(outdir)
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

    def unique_name(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self.taken:
            n += 1
            candidate = f"{name}_{n}"
        self.taken.add(candidate)
        return candidate

    def prepare(self, batch: FileBatch, names: dict[str, str], pool: ThreadPoolExecutor) -> tuple:
        """Record lines for a batch, the writes of its explained images submitted to `pool`."""
        number, self.next_batch = self.next_batch, self.next_batch + 1
        entries = [({"path": path, "batch": number, "error": message}, None, None) for path, message in batch.errors]
        explanation, labels = batch.explanation, self.explainer.labels
        if explanation is None:
            return number, entries
        input_size = self.explainer.spec.input_size
        tops = [[] for _ in batch.paths] if _has_regions(explanation) else explanation.top_k(5, labels)
        for i, (path, indices) in enumerate(zip(batch.paths, maps_per_image(explanation), strict=True)):
            classes = [int(explanation.targets[m]) for m in indices]
            maps = _map_entries(explanation, i, indices, labels, _box_scale(batch.sizes[i], input_size))
            line = {"path": path, "batch": number, "method": self.method, "top5": tops[i]}
            files = None
            if self.outputs.files:
                line["name"] = self.unique_name(names.pop(path))
                files = _map_names(line["name"], classes)
            else:
                names.pop(path)
            image = batch.images[i] if batch.images is not None else None
            future = pool.submit(_finish_image, self.outdir, self.outputs, files, image, explanation.heatmaps[indices],
                                 _regions(explanation, indices, maps))
            entries.append((line, maps, future))
        return number, entries

    def commit(self, number: int, entries: list) -> None:
        """In the committer thread: wait for a batch's writes, stage its rows, append its lines, tell."""
        columns = {name: [] for name in ("path", "method", "class", "label", "score", "top5", "heatmap",
                                         "height", "width")}
        lines = []
        for line, maps, future in entries:
            if future is not None:
                files, levels = future.result()
                for entry, written in zip(maps, files, strict=True):
                    entry.update(written)
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
                self.report(_describe(line, self.outdir))
        if self.progress is not None:
            self.progress(self.summary.explained + self.summary.failed, self.total)


def _map_names(name: str, classes: list[int]) -> list[str]:
    """The output names of one image's maps: the image's own for a single map, else one per class explained,
    numbered from the second map of a class on (two detections of one class: NAME.class2, NAME.class2_2)."""
    if len(classes) == 1:
        return [name]
    seen: dict[int, int] = {}
    named = []
    for klass in classes:
        seen[klass] = seen.get(klass, 0) + 1
        named.append(f"{name}.class{klass}" + (f"_{seen[klass]}" if seen[klass] > 1 else ""))
    return named


def _has_regions(explanation: Explanation) -> bool:
    """Whether the maps are of detections or segments: their scores are their own, not class probabilities."""
    return getattr(explanation, "boxes", None) is not None or getattr(explanation, "masks", None) is not None


def _box_scale(size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """From the model input's pixels (boxes of a preprocessed batch) to those of an image of `size`."""
    return np.array([size[1] / input_size[1], size[0] / input_size[0]] * 2, dtype=np.float32)


def _map_entries(explanation: Explanation, image: int, indices: list[int], labels,
                 box_scale: np.ndarray | None = None) -> list[dict]:
    """Per map of one image: the class explained (-1 for a target that is not a class), its label and score
    (the class probability; for a detection, a segment or a target that is not a class, the target's own
    score); for a detection its box, x1 y1 x2 y2 in the pixels of the image (times `box_scale`, else in the
    model input's)."""
    own, boxes = getattr(explanation, "scores", None), getattr(explanation, "boxes", None)
    regions = _has_regions(explanation)
    probability = None if regions else probabilities(explanation.logits[image:image + 1])[0]
    entries = []
    for m in indices:
        target = int(explanation.targets[m])
        score = own[m] if regions or target < 0 else probability[target]
        entry = {"target": target, "label": labels[target] if labels and target >= 0 else None,
                 "score": None if score is None else float(score)}
        if boxes is not None and not np.isnan(boxes[m]).any():
            scaled = boxes[m] * (1 if box_scale is None else box_scale)
            entry["box"] = [round(float(v), 2) for v in scaled]
        entries.append(entry)
    return entries


def _regions(explanation: Explanation, indices: list[int], maps: list[dict]) -> list[dict]:
    """Per map, what its overlay shows besides the heatmap (core.images.annotate's keywords): a detection's box
    (in the image's pixels) and label with its score, a segment's mask outline; empty for a plain class map."""
    masks = getattr(explanation, "masks", None)
    regions = []
    for m, entry in zip(indices, maps, strict=True):
        region = {}
        if "box" in entry:
            region = {"box": entry["box"], "label": f"{entry['label'] or entry['target']} {entry['score']:.2f}"}
        if masks is not None and masks[m].any():
            region["mask"] = masks[m]
        regions.append(region)
    return regions


def _describe(line: dict, outdir: Path) -> str:
    """One line for one image: its top classes, or its detections or segments (label, score and box per map)
    when the maps are of those; and the map(s) written."""
    maps = line.get("maps", [line])
    if line["top5"]:
        ranked = ", ".join(f"{p['label'] or p['class']} {p['score']:.3f}" for p in line["top5"])
    else:
        ranked = ", ".join(_found(m) for m in maps) or "nothing found"
    where = "; ".join(f"map of class {m['target']} -> {outdir / m.get('overlay', m.get('heatmap', TABLE))}"
                      for m in maps)
    return f"{line['path']}: {ranked}; {where}"


def _found(entry: dict) -> str:
    """A detection or segment as told: its label (or class), score and box."""
    score = "" if entry["score"] is None else f" {entry['score']:.3f}"
    box = f" at {entry['box']}" if "box" in entry else ""
    return f"{entry['label'] or entry['target']}{score}{box}"


def _write_predictions(record: Record, path: Path) -> None:
    """predictions.json, path -> record line, streamed from the record (whole or not at all)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("{")
        for n, line in enumerate(record.entries()):
            entry = {key: value for key, value in line.items() if key not in ("path", "batch", "batch_end")}
            out.write(f"{',' if n else ''}\n  {json.dumps(line['path'])}: {json.dumps(entry)}")
        out.write("\n}\n")


def explain_files(explainer: Explainer, sources: Iterable[Source | str | os.PathLike], outdir: Path, *,
                  method: str = "gradcam", target: int | None = None, batch_size: int = 8,
                  outputs: Outputs = Outputs(), resume: bool = False, workers: int | None = None,
                  report: Callable[[str], None] | None = None, complain: Callable[[str], None] = lambda line: None,
                  progress: Callable[[int, int | None], None] | None = None, **options) -> Summary:
    """Explain image files into `outdir`, streamed: overlays and heatmaps per image and/or the Parquet table
    (`outputs`), the record `record.jsonl`, and at the end `predictions.json` (path -> record line).

    Each explained image is told to `report` in one line, each bad one to `complain` (and skipped; the
    others are still written), `progress(done, total)` after each batch (`total` is None when `sources` can
    be iterated only once). With `resume`, images the record holds are skipped. A source listed twice is
    explained once. Returns the counts.
    """
    job = _Job(explainer, outdir, outputs, method, target, resume, (report, complain, progress))
    job.summary.skipped = len(job.record.done)
    if iter(sources) is not sources:  # listed again rather than held in memory
        job.total = sum(1 for source in _pending(sources, set(job.record.done)))
    names: dict[str, str] = {}

    def paths() -> Iterator[str]:
        for source in _pending(sources, set(job.record.done)):
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
    if job.table is not None:
        job.table.merge()
    _write_predictions(job.record, outdir / "predictions.json")
    return job.summary


def _pending(sources, done: set[str]) -> Iterator[Source]:
    """The sources not done yet, each path once (later copies are skipped and remembered as done)."""
    for item in sources:
        source = item if isinstance(item, Source) else Source(os.fspath(item), Path(os.fspath(item)).stem)
        if source.path not in done:
            done.add(source.path)
            yield source
