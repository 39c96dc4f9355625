"""The sources of a job: files as given, the images inside folders (walked in sorted order), list files, URIs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ImageError
from ..core.files import is_remote

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


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
        if is_remote(text):
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

