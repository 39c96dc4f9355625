"""Image files in and out: reading safely (the header is checked before any pixel is decoded) and writing
whole or not at all."""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError

try:
    import fpng
except ImportError:  # an optional speed-up (the dataset extra); OpenCV writes PNGs without it
    fpng = None

MAX_PIXELS = 100_000_000  # larger images are refused unread: decoding them would take gigabytes
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes):
    offset = 2
    while offset + 9 < len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:
            offset += 1
            continue
        length = struct.unpack(">H", data[offset + 2:offset + 4])[0]
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[offset + 5:offset + 9])
            return width, height
        offset += 2 + length
    return None


def _tiff_size(data: bytes):
    """(width, height) from the first image directory of a classic TIFF, or None."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8:
        return None
    magic, offset = struct.unpack(order + "HI", data[2:8])
    if magic != 42 or offset + 2 > len(data):
        return None
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    sizes = {}
    for entry in range(offset + 2, offset + 2 + 12 * count, 12):
        if entry + 12 > len(data):
            return None
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257) and kind in (3, 4):  # ImageWidth, ImageLength as SHORT or LONG
            value_format, end = ("H", entry + 10) if kind == 3 else ("I", entry + 12)
            sizes[tag] = struct.unpack(order + value_format, data[entry + 8:end])[0]
    return (sizes[256], sizes[257]) if len(sizes) == 2 else None


def probe(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read from the header of a PNG, JPEG, BMP, WebP, GIF or TIFF, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return ("png", *struct.unpack(">II", data[16:24]))
    if data[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(data)
        return ("jpeg", *size) if size else None
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return "bmp", abs(width), abs(height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return "webp", 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", data[26:30])
            return "webp", width & 0x3FFF, height & 0x3FFF
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return ("gif", *struct.unpack("<HH", data[6:10]))
    size = _tiff_size(data)
    return ("tiff", *size) if size else None


def _png_chunks_fit(data: bytes) -> bool:
    """Every chunk up to IEND lies inside the file. A chunk claiming more than the file holds is refused here:
    OpenCV's reader would allocate the claimed length first (a 2 KB file asking for 2 GB)."""
    offset = 8
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        offset += 12 + length
        if offset > len(data):
            return False
        if kind == b"IEND":
            return True
    return False


def _complete(kind: str, data: bytes) -> bool:
    if kind == "png":
        return _png_chunks_fit(data)
    if kind == "jpeg":
        return b"\xff\xd9" in data[-64:]
    return True  # the other decoders reject short files themselves


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> H x W x 3 uint8 RGB, or ImageError naming `name`."""
    if not data:
        raise ImageError(f"{name}: empty file")
    header = probe(data)
    if header is None:
        raise ImageError(f"{name}: not a PNG, JPEG, BMP or WebP image")
    kind, width, height = header
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise ImageError(f"{name}: refusing a {width} x {height} image (limit {max_pixels:,} pixels)")
    if not _complete(kind, data):
        raise ImageError(f"{name}: truncated {kind.upper()} file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"{name}: corrupt {kind.upper()} data")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror})") from None
    return decode_image(data, str(path), max_pixels)


# OpenCV's PNGs as small as with its default (zlib's RLE strategy, adaptive filters), 1.2x faster to make
PNG_FAST = [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
            cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def is_remote(source: str) -> bool:
    """Whether `source` is a URI that fsspec opens (s3://, gs://, http://), not a local path or a file:// URI."""
    return "://" in source and not source.startswith("file://")


def load_image(source: str) -> np.ndarray:
    """uint8 RGB from a file path, a file:// URI or, through fsspec, any URI it opens (s3://, gs://, http://)."""
    if not is_remote(source):
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


def encode_image(image_rgb: np.ndarray, image_format: str = "png") -> bytes:
    """An RGB uint8 image as PNG or JPEG bytes. PNGs of colour images are written by fpng (Geldreich's encoder;
    the `dataset` extra) where it is installed: 5.8x faster than OpenCV's fastest libpng settings, files 15% smaller
    (measured on overlays of 60 of benchmarks/dataset.py's photos, 0.74 MP on average); else by OpenCV."""
    if image_format == "png" and fpng is not None and image_rgb.dtype == np.uint8 and image_rgb.ndim == 3 \
            and image_rgb.shape[2] == 3:
        return fpng.from_ndarray(np.ascontiguousarray(image_rgb))
    extension, parameters = (".jpg", []) if image_format == "jpeg" else (".png", PNG_FAST)
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), parameters)
    if not ok:
        raise ImageError(f"{image_format.upper()} encoding failed")
    return encoded.tobytes()


def encode_png(image_rgb: np.ndarray) -> bytes:
    return encode_image(image_rgb, "png")


def write_png(path, image_rgb: np.ndarray) -> None:
    """Write an RGB image as PNG, whole or not at all (encoded in memory, then one write and rename)."""
    write_atomic(path, encode_png(image_rgb))


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path in the target's folder to write to; renamed onto `path` when the block ends
    without an error, removed otherwise. Readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
