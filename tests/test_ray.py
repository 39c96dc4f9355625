"""The job on Ray (a local cluster started here: two CPUs, loopback): every output named and written as the local
job's; every image exactly once when an actor dies after a count of batches, and when a driver killed with
SIGKILL is run again with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from test_pipeline import _write_images  # noqa: E402

from onnxcam import Explainer  # noqa: E402
from onnxcam.jobs import Listing, Outputs, explain_files  # noqa: E402

EVERYTHING = Outputs.parse("overlays,heatmaps,table")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    _write_images(root, 14, nested=True, seed=3)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return root


def _lines(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "record.jsonl").read_text().splitlines()]


def _rows(outdir: Path) -> dict[tuple[str, int], np.ndarray]:
    rows = pq.read_table(outdir / "table").to_pylist()
    assert len({(row["path"], row["class"]) for row in rows}) == len(rows), "a row written twice"
    return {(row["path"], row["class"]): np.frombuffer(row["heatmap"], np.uint8) for row in rows}


def _files(outdir: Path) -> set[str]:
    """What a job wrote besides its record, settings, predictions and table."""
    return {str(path.relative_to(outdir)) for path in outdir.rglob("*") if path.is_file()} - {
        "record.jsonl", "job.json", "predictions.json"} - {str(p.relative_to(outdir)) for p in
                                                           (outdir / "table").glob("*")}


def _assert_once(outdir: Path, paths: list[str]) -> None:
    lines = _lines(outdir)
    assert sorted(line["path"] for line in lines) == sorted(paths)
    assert sorted(path for path, _ in _rows(outdir)) == sorted(p for p in paths if not p.endswith("broken.jpg"))
    assert not [name for name in _files(outdir) if name.endswith(".tmp")], "a write cut short was left"


def test_every_output_is_named_and_written_as_the_local_jobs(cluster, small_onnx, folder, tmp_path):
    from onnxcam.ray import explain_on_ray

    twin = tmp_path / "other" / "image0001.png"  # the same name as one in the folder: numbered by both alike
    twin.parent.mkdir()
    twin.write_bytes((folder / "image0001.png").read_bytes())
    sources = Listing([folder, twin], recursive=True)
    local = explain_files(Explainer(small_onnx, provider="cpu"), sources, tmp_path / "local", batch_size=3,
                          outputs=EVERYTHING)
    complaints = []
    summary = explain_on_ray(small_onnx, sources, tmp_path / "ray", actors=2, batch_size=3, outputs=EVERYTHING,
                             complain=complaints.append)
    assert (summary.explained, summary.failed) == (local.explained, local.failed) == (15, 1)
    assert len(complaints) == 1 and "broken.jpg" in complaints[0]
    assert "image0001_2.png" in _files(tmp_path / "ray")
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    names = [{line["path"]: line.get("name") for line in _lines(tmp_path / out)} for out in ("local", "ray")]
    assert names[0] == names[1]
    _assert_once(tmp_path / "ray", [source.path for source in sources])
    local_rows, ray_rows = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert local_rows.keys() == ray_rows.keys()
    for key, levels in ray_rows.items():
        np.testing.assert_allclose(levels, local_rows[key], atol=1)
    for name in _files(tmp_path / "ray"):
        pictures = [cv2.imread(str(tmp_path / out / name), cv2.IMREAD_UNCHANGED) for out in ("local", "ray")]
        np.testing.assert_allclose(pictures[1], pictures[0], atol=2)


def _dying_actor(signals: Path, after: int) -> type:
    """ExplainActor, but the first actor to have explained `after` batches writes their files, then kills itself
    before handing them back: its chunk is given again and its files written once more. Made here, so that Ray
    ships the class by value to workers that cannot import tests."""
    from onnxcam.ray import ExplainActor

    class DyingExplainActor(ExplainActor):
        batches = 0

        def explain(self, chunk):
            done = super().explain(chunk)
            self.batches += len(done)
            if self.batches >= after:
                try:
                    os.close(os.open(signals / "died", os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return done
                os.kill(os.getpid(), signal.SIGKILL)
            return done

    return DyingExplainActor


def test_an_actor_dead_after_two_batches_loses_no_image(cluster, small_onnx, folder, tmp_path, monkeypatch):
    import onnxcam.ray
    from onnxcam.ray import explain_on_ray

    monkeypatch.setattr(onnxcam.ray, "ExplainActor", _dying_actor(tmp_path, after=2))
    monkeypatch.setattr(onnxcam.ray, "CHUNK", 1)  # a call per batch: 8 calls, the actor dies at its second
    sources = Listing([folder], recursive=True)
    summary = explain_on_ray(small_onnx, sources, tmp_path / "out", actors=2, batch_size=2,
                             outputs=Outputs.parse("heatmaps,table"))
    assert (tmp_path / "died").exists()
    assert (summary.explained, summary.failed) == (14, 1)
    _assert_once(tmp_path / "out", [source.path for source in sources])
    assert len(_files(tmp_path / "out")) == 14


def test_a_driver_killed_mid_job_then_resumed_has_every_image_once(cluster, small_onnx, tmp_path):
    from onnxcam.ray import explain_on_ray

    folder = tmp_path / "images"
    paths = [str(p) for p in _write_images(folder, 320, seed=5)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "onnxcam", "explain", str(small_onnx), str(folder), "-o", str(out), "--save",
               "heatmaps,table", "--batch-size", "1", f"--ray={cluster}"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = out / "record.jsonl"
    deadline = time.monotonic() + 120
    while driver.poll() is None and time.monotonic() < deadline:  # killed once the first chunk is recorded
        if record.exists() and record.stat().st_size > 0:
            driver.kill()
            break
        time.sleep(0.01)
    driver.wait(timeout=60)
    done = len(_lines(out))
    assert driver.returncode == -signal.SIGKILL and 0 < done < len(paths), (driver.returncode, done)
    summary = explain_on_ray(small_onnx, Listing([folder]), out, batch_size=1, outputs=Outputs.parse("heatmaps,table"),
                             resume=True)
    assert summary.skipped == done and summary.explained == len(paths) - done
    _assert_once(out, paths)
    assert len(_files(out)) == len(paths)


def test_a_class_the_file_lacks_is_refused_before_any_actor(cluster, small_onnx, folder, tmp_path):
    from onnxcam.core.errors import OnnxcamError
    from onnxcam.ray import explain_on_ray

    with pytest.raises(OnnxcamError, match="class") as refused:
        explain_on_ray(small_onnx, Listing([folder]), tmp_path / "out", target=99, outputs=Outputs.parse("table"))
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()
