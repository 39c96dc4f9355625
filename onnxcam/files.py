"""Reading images safely: the header is checked before any pixel is decoded."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

MAX_PIXELS = 100_000_000  # larger images are refused unread: decoding them would take gigabytes
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageError(ValueError):
    """An input that is not a usable image; the message names the file."""


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


def probe(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read from the header of a PNG, JPEG, BMP or WebP, or None."""
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
    return None


def _complete(kind: str, data: bytes) -> bool:
    if kind == "png":
        return b"IEND" in data[-16:]
    if kind == "jpeg":
        return b"\xff\xd9" in data[-64:]
    return True  # BMP and WebP decoders reject short files themselves


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


def encode_png(image_rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise ImageError("PNG encoding failed")
    return encoded.tobytes()


def write_png(path, image_rgb: np.ndarray) -> None:
    """Write an RGB image as PNG, whole or not at all (encoded in memory, then one write and rename)."""
    write_atomic(path, encode_png(image_rgb))


def write_atomic(path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
