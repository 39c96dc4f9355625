"""The command line, run in subprocesses exactly as a user types it."""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import random_images, run_cli

import onnxcam

MODEL_SOURCE = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()
'''


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming a huge image, with nothing behind it worth decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\0" * 64


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "tiny_models.py").write_text(MODEL_SOURCE)
    (folder / "labels.txt").write_text("ant\nbee\ncat\ndog\n")
    return folder


@pytest.fixture(scope="module")
def exported(workdir):
    result = run_cli("export", "tiny_models:build", "-o", "tiny.onnx", "--input-size", "32", "--layer", "4",
                     "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--labels", "labels.txt", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "input 'input' nchw 32x32 float32, scores 'logits' (4 classes), layers 4" in result.stdout
    return workdir / "tiny.onnx"


@pytest.fixture(scope="module")
def images(workdir):
    folder = workdir / "images"
    folder.mkdir()
    good = random_images(3, size=(48, 64))
    cv2.imwrite(str(folder / "a.png"), good[0][..., ::-1])
    cv2.imwrite(str(folder / "b.jpg"), good[1][..., ::-1])
    cv2.imwrite(str(folder / "c.png"), good[2][..., ::-1])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image at all")
    (folder / "truncated.png").write_bytes((folder / "c.png").read_bytes()[:200])
    (folder / "huge.png").write_bytes(_png_header_only(60000, 60000))
    return folder


def test_inspect_marks_the_default_layer(workdir):
    result = run_cli("inspect", "tiny_models:build", "--input-size", "32", cwd=workdir)
    assert result.returncode == 0, result.stderr
    marked = [line for line in result.stdout.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and marked[0].split()[1] == "4" and "8 x 16 x 16" in marked[0]


def test_inspect_onnx_lists_tensors(exported):
    result = run_cli("inspect", exported)
    assert result.returncode == 0, result.stderr
    assert "explainable: layers 4, 4 classes" in result.stdout


def test_explain_writes_good_images_and_reports_each_bad_one(exported, images, tmp_path):
    out = tmp_path / "out"
    result = run_cli("explain", exported, images, "-o", out, "--batch-size", "2", "--save", "overlays,heatmaps",
                     "--heatmap-format", "npy", "--provider", "cpu")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 5, result.stderr
    for name, reason in [("empty.png", "empty file"), ("notes.jpg", "not a PNG, JPEG"),
                         ("truncated.png", "truncated PNG"), ("huge.png", "refusing a 60000 x 60000 image")]:
        assert any(name in line and reason in line for line in errors), (name, errors)
    assert errors[-1] == "error: 4 image(s) could not be explained"
    for stem, source in [("a", "a.png"), ("b", "b.jpg"), ("c", "c.png")]:
        overlay = cv2.imread(str(out / f"{stem}.png"))
        original = cv2.imread(str(images / source))
        assert overlay.shape == original.shape
        heatmap = np.load(out / f"{stem}.heatmap.npy")
        assert heatmap.shape == (32, 32) and heatmap.dtype == np.float16 and heatmap.max() == pytest.approx(1)
    predictions = json.loads((out / "predictions.json").read_text())
    top = predictions[str(images / "a.png")]["top5"]
    assert len(top) == 4 and top[0]["label"] in {"ant", "bee", "cat", "dog"}
    assert sum(p["score"] for p in top) == pytest.approx(1, abs=1e-5)
    assert "error" in predictions[str(images / "empty.png")]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_explain_with_a_class_and_method(exported, images, tmp_path):
    result = run_cli("explain", exported, images / "a.png", "-o", tmp_path, "--class", "2", "--method", "layercam")
    assert result.returncode == 0, result.stderr
    # provider auto: one informative line, none of ONNX Runtime's CUDA loading errors
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxcam: running on"), lines
    assert json.loads((tmp_path / "predictions.json").read_text())[str(images / "a.png")]["target"] == 2


def test_old_spellings_still_work_with_one_line_naming_the_new(exported, workdir, images, tmp_path):
    """--target (now --class) and --target-layer (now --layer) are still taken, each said once on stderr."""
    result = run_cli("explain", exported, images / "a.png", "-o", tmp_path, "--target", "2", "--provider", "cpu")
    assert result.returncode == 0, result.stderr
    assert "onnxcam: --target is now --class" in result.stderr
    assert json.loads((tmp_path / "predictions.json").read_text())[str(images / "a.png")]["target"] == 2
    result = run_cli("export", "tiny_models:build", "-o", tmp_path / "old.onnx", "--input-size", "32",
                     "--target-layer", "4", cwd=workdir)
    assert result.returncode == 0 and "onnxcam: --target-layer is now --layer" in result.stderr
    assert "layers 4" in result.stdout


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"onnxcam, version {onnxcam.__version__}"


@pytest.mark.parametrize("args, message", [
    (["--class", "7"], "error: class index 7 is out of range: the model has 4 classes"),
    (["--method", "gradcam+++"], "Invalid value for '--method'"),
])
def test_explain_refuses_bad_requests_in_one_line(exported, images, tmp_path, args, message):
    result = run_cli("explain", exported, images / "a.png", "-o", tmp_path, *args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_explain_on_a_plain_onnx_file_suggests_export(workdir, images, tmp_path):
    import torch

    sys.path.insert(0, str(workdir))
    try:
        from tiny_models import build
    finally:
        sys.path.remove(str(workdir))
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(build(), (torch.zeros(2, 3, 32, 32),), plain, dynamo=True)
    result = run_cli("explain", plain, images / "a.png", "-o", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"has no gradient outputs: make it explainable first with "
                                          f"`onnxcam export {plain} -o OUT.onnx`")
    exported = run_cli("export", plain, "-o", tmp_path / "now.onnx")
    assert exported.returncode == 0, exported.stderr


@pytest.mark.parametrize("args, message", [
    (["tiny_models:build", "--layer", "44"], "error: unknown layer '44'; closest: 4"),
    (["tiny_models:nothing"], "error: cannot load tiny_models:nothing"),
    (["missing.onnx"], "error: missing.onnx: no such file"),
    (["tiny_models:build", "--mean", "0.5,0.5"],
     "error: mean needs 3 values, one per input channel; got 2 (set --mean)"),
    (["tiny_models:build", "--weights", "labels.txt"], "error: labels.txt: cannot load as a state dict"),
])
def test_export_refuses_mistakes_in_one_line(workdir, args, message):
    result = run_cli("export", *args, "-o", "never.onnx", cwd=workdir)
    assert result.returncode == 1
    assert result.stderr.strip() == message or result.stderr.startswith(message), result.stderr
    assert not (workdir / "never.onnx").exists()


def test_export_loads_weights(workdir, images, tmp_path):
    import torch

    sys.path.insert(0, str(workdir))
    try:
        from tiny_models import build
    finally:
        sys.path.remove(str(workdir))
    model = build()
    with torch.no_grad():
        model[7].bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))  # class 2 wins everywhere
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "weighted.onnx"
    result = run_cli("export", "tiny_models:build", "-o", out, "--input-size", "32", "--weights",
                     tmp_path / "weights.pt", cwd=workdir)
    assert result.returncode == 0, result.stderr
    explained = run_cli("explain", out, images / "a.png", "-o", tmp_path / "o")
    assert explained.returncode == 0, explained.stderr
    predictions = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert predictions[str(images / "a.png")]["target"] == 2


def test_deploy_path_needs_no_torch(exported, images, tmp_path):
    """Explaining on ONNX Runtime works in a process where importing torch fails."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import onnxcam, numpy as np\n"
        "from onnxcam.cli import main\n"
        f"e = onnxcam.Explainer({str(exported)!r}, provider='cpu')\n"
        "r = e.explain(np.zeros((2, 48, 64, 3), np.uint8)[0], method='gradcam++')\n"
        "assert r.heatmaps.shape == (1, 32, 32), r.heatmaps.shape\n"
        f"sys.argv = ['onnxcam', 'explain', {str(exported)!r}, {str(images / 'a.png')!r}, '-o', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.png").exists()


def test_demo_explains_the_bundled_photos(tmp_path):
    """Pretrained EfficientNet-Lite0 on scikit-image's photos: chelsea is an Egyptian cat, coffee an espresso."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run_cli("demo", "-o", tmp_path / "demo", env=env)
    assert result.returncode == 0, result.stderr
    predictions = json.loads((tmp_path / "demo" / "predictions.json").read_text())
    by_name = {Path(k).stem: v for k, v in predictions.items()}
    assert by_name["chelsea"]["target"] == 285 and by_name["chelsea"]["top5"][0]["label"] == "Egyptian cat"
    assert by_name["coffee"]["target"] == 967 and by_name["coffee"]["top5"][0]["label"] == "espresso"
    assert "Egyptian cat" in result.stdout
    assert len(list((tmp_path / "demo").glob("*.png"))) == 4
    cached = list((tmp_path / "cache" / "onnxcam").glob("*.onnx"))
    assert len(cached) == 1
    again = run_cli("demo", "-o", tmp_path / "again", env=env)  # second run reuses the cached export
    reused = list((tmp_path / "cache" / "onnxcam").glob("*.onnx"))[0]
    assert again.returncode == 0 and cached[0].stat().st_mtime == reused.stat().st_mtime
