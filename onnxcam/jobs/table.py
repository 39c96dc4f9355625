"""The results table: Parquet parts under OUT/table, a row per heatmap, staged per batch before the record."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..core.errors import ExplainError
from ..core.files import atomic_path

ROW_GROUP = 256  # rows of a Parquet row group: what is left to write when the job ends is at most this

TABLE = "table"

STAGING = ".staging"


def table_schema(pa, size: tuple[int, int]):
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
        self.schema = table_schema(pa, size)
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

