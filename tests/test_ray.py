"""The job on Ray Data: a local cluster started here (two CPUs, loopback), every image back exactly once even
when an actor is killed mid-run and Ray retries its batch on a new one; rows equal the local job's."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from test_pipeline import _write_images  # noqa: E402

from onnxcam import Explainer  # noqa: E402
from onnxcam.core.files import read_image  # noqa: E402
from onnxcam.jobs.outputs import uint8_map  # noqa: E402

IMAGES = 120  # each actor holds at its second batch until one is killed: the kill lands mid-job at any size
HOLD = 2


def _held_actor(signals: Path) -> type:
    """ExplainActor, but each actor's HOLD-th batch waits, its process id left in `signals`, until the file
    `signals`/release exists: so that the test kills one while both are at work, a batch in hand, and the job
    cannot be over first. Made here, so that Ray ships the class by value to workers that cannot import tests."""
    from onnxcam.ray import ExplainActor

    class HeldExplainActor(ExplainActor):
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == HOLD and not (signals / "release").exists():
                (signals / f"held-{os.getpid()}").touch()
                deadline = time.monotonic() + 600  # a test that fails first must not leave the job stuck
                while not (signals / "release").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return super().__call__(batch)

    return HeldExplainActor


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    yield
    ray.shutdown()


def test_every_image_comes_back_once_when_an_actor_dies(cluster, small_onnx, tmp_path, monkeypatch):
    import onnxcam.ray
    from onnxcam.ray import explain_on_ray

    signals = tmp_path / "signals"
    signals.mkdir()
    monkeypatch.setattr(onnxcam.ray, "ExplainActor", _held_actor(signals))
    paths = _write_images(tmp_path / "images", IMAGES, seed=4)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    outcome, killed = {}, []

    def run():
        outcome["summary"] = explain_on_ray(small_onnx, [*paths, tmp_path / "images" / "broken.jpg"], tmp_path / "out",
                                            actors=2, batch_size=2, method="gradcam")

    job = threading.Thread(target=run)
    job.start()
    held = []
    try:
        deadline = time.monotonic() + 300  # actors start in ~10 s, ~80 s with both cores busy elsewhere
        while job.is_alive() and len(held := list(signals.glob("held-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(held) == 2 and job.is_alive():  # both actors hold a batch: the job cannot end before the kill
            pid = int(held[0].name.removeprefix("held-"))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    finally:
        (signals / "release").touch()
    job.join(timeout=300)
    assert killed and not job.is_alive(), f"both actors did not hold a batch while the job ran: {held}"
    summary = outcome["summary"]
    assert (summary.explained, summary.failed) == (IMAGES, 1)
    rows = pq.read_table(tmp_path / "out" / "table").to_pylist()
    assert sorted(row["path"] for row in rows) == sorted(str(p.resolve()) for p in [*paths, tmp_path / "images" /
                                                                                   "broken.jpg"])
    explainer = Explainer(small_onnx, provider="cpu")
    for row in rows[::12]:
        if row["error"] is None:
            reference = explainer.explain(read_image(row["path"]))
            levels = np.frombuffer(row["heatmap"], np.uint8).reshape(row["height"], row["width"])
            np.testing.assert_allclose(levels, uint8_map(reference.heatmaps[0]), atol=1)
            assert row["class"] == reference.classes[0]
        else:
            assert row["path"].endswith("broken.jpg") and "JPEG" in row["error"]
