"""Fuzzing the image reader: mutated and truncated PNG, JPEG, BMP, WebP, GIF and TIFF files end in a decoded
image no larger than the header said (and under the pixel limit) or a clean ImageError; never another
exception, a crash or a hang. The example count is bounded so that CI spends seconds here;
ONNXCAM_FUZZ_EXAMPLES raises it for a longer campaign."""

from __future__ import annotations

import contextlib
import os

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcam.core.errors import ImageError
from onnxcam.core.files import decode_image, probe

FORMATS = (".png", ".jpg", ".bmp", ".webp", ".gif", ".tiff")
MAX_PIXELS = 64 * 64  # the seeds are 24 x 20: a mutated header claiming more is refused before decoding
EXAMPLES = int(os.environ.get("ONNXCAM_FUZZ_EXAMPLES", "150"))
DEADLINE_MS = 5000  # a hang, not a slow machine: decoding these files takes milliseconds


def _seed(extension: str) -> bytes:
    rng = np.random.default_rng(len(extension))
    image = cv2.GaussianBlur(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), (5, 5), 0)
    ok, encoded = cv2.imencode(extension, image)
    assert ok, extension
    return encoded.tobytes()


SEEDS = {extension: _seed(extension) for extension in FORMATS}


@st.composite
def mutated(draw, extension: str) -> bytes:
    """The seed file with a few of: bytes flipped (often in the header), a slice dropped or repeated,
    random bytes inserted, the tail cut off."""
    data = bytearray(SEEDS[extension])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "header", "drop", "repeat", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "header" and data:
            at = draw(st.integers(0, min(len(data), 64) - 1))
            data[at:at + 4] = draw(st.binary(min_size=4, max_size=4))
        elif kind == "drop":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at:]
    return bytes(data)


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(field)))


@contextlib.contextmanager
def _peak_memory_under(limit_mib: int):
    """Fails when the block's peak resident memory rises `limit_mib` above where it started (Linux: the
    peak is reset through /proc/self/clear_refs; elsewhere nothing is checked)."""
    if not os.path.exists("/proc/self/clear_refs"):
        yield
        return
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    start = _resident_kib("VmRSS:")
    try:
        yield
    finally:  # a decoder that allocates and then fails counts too
        grown = (_resident_kib("VmHWM:") - start) / 1024
        assert grown < limit_mib, f"decoding took {grown:.0f} MiB"


def _decode_or_refuse(data: bytes) -> None:
    try:
        with _peak_memory_under(64):
            image = decode_image(data, "fuzzed", MAX_PIXELS)
    except ImageError:
        return
    header = probe(data)
    assert header is not None
    _, width, height = header
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= min(width * height, MAX_PIXELS), (image.shape, header)


@pytest.mark.parametrize("extension", FORMATS)
def test_seed_files_decode(extension):
    image = decode_image(SEEDS[extension], "seed", MAX_PIXELS)
    assert image.shape == (20, 24, 3) and probe(SEEDS[extension])[1:] == (24, 20)


@pytest.mark.parametrize("extension", FORMATS)
def test_mutated_files_decode_or_fail_cleanly(extension):
    @settings(max_examples=EXAMPLES, deadline=DEADLINE_MS, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutated(extension))
    def check(data):
        _decode_or_refuse(data)

    check()


@settings(max_examples=EXAMPLES, deadline=DEADLINE_MS, derandomize=True, database=None)
@given(st.sampled_from(FORMATS), st.integers(0, 4096))
def test_every_truncation_decodes_or_fails_cleanly(extension, length):
    _decode_or_refuse(SEEDS[extension][:length])


@settings(max_examples=EXAMPLES, deadline=DEADLINE_MS, derandomize=True, database=None)
@given(st.binary(max_size=256))
def test_random_bytes_fail_cleanly(data):
    _decode_or_refuse(data)


def test_a_png_chunk_claiming_more_than_the_file_is_refused_unread():
    """Found by this fuzzer: a 1.6 KB PNG whose IDAT claims 436 MB made OpenCV allocate 416 MiB before failing."""
    seed = SEEDS[".png"]
    at = seed.index(b"IDAT") - 4
    claimed = seed[:at] + (436_208_767).to_bytes(4, "big") + seed[at + 4:]
    with _peak_memory_under(64), pytest.raises(ImageError, match="truncated PNG"):
        decode_image(claimed, "claimed", MAX_PIXELS)
