"""The record of finished images: JSON Lines, a batch at a time, fsynced; what --resume continues from."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..core.files import atomic_path

RECORD = "record.jsonl"


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


def write_predictions(record: Record, path: Path) -> None:
    """predictions.json, path -> record line, streamed from the record (whole or not at all)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("{")
        for n, line in enumerate(record.entries()):
            entry = {key: value for key, value in line.items() if key not in ("path", "batch", "batch_end")}
            out.write(f"{',' if n else ''}\n  {json.dumps(line['path'])}: {json.dumps(entry)}")
        out.write("\n}\n")

