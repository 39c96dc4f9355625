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

IMAGES = 900  # seconds of work once both actors start (300 left 0.74 s): the kill, 0.3 s in, lands mid-job


def _actor_processes(name: str) -> list[int]:
    """Processes started below this one (the test's Ray cluster) whose title names `name`."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue
    found, stack = [], [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            try:
                if name in Path(f"/proc/{child}/cmdline").read_text():
                    found.append(child)
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    yield
    ray.shutdown()


def test_every_image_comes_back_once_when_an_actor_dies(cluster, small_onnx, tmp_path):
    from onnxcam.ray import explain_on_ray

    paths = _write_images(tmp_path / "images", IMAGES, seed=4)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    outcome, killed = {}, []

    def run():
        outcome["summary"] = explain_on_ray(small_onnx, [*paths, tmp_path / "images" / "broken.jpg"], tmp_path / "out",
                                            actors=2, batch_size=2, method="gradcam")

    job = threading.Thread(target=run)
    job.start()
    deadline = time.monotonic() + 120
    while job.is_alive() and not killed and time.monotonic() < deadline:
        actors = _actor_processes("ExplainActor")
        if len(actors) == 2:
            time.sleep(0.3)  # both actors at work (the job takes seconds: a longer wait may find it done)
            if job.is_alive():
                os.kill(actors[0], signal.SIGKILL)
                killed.append(actors[0])
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed and not job.is_alive(), "no actor was killed while the job ran"
    summary = outcome["summary"]
    assert (summary.explained, summary.failed) == (IMAGES, 1)
    rows = pq.read_table(tmp_path / "out" / "table").to_pylist()
    assert sorted(row["path"] for row in rows) == sorted(str(p.resolve()) for p in [*paths, tmp_path / "images" /
                                                                                   "broken.jpg"])
    explainer = Explainer(small_onnx, provider="cpu")
    for row in rows[::97]:
        if row["error"] is None:
            reference = explainer.explain(read_image(row["path"]))
            levels = np.frombuffer(row["heatmap"], np.uint8).reshape(row["height"], row["width"])
            np.testing.assert_allclose(levels, uint8_map(reference.heatmaps[0]), atol=1)
            assert row["class"] == reference.classes[0]
        else:
            assert row["path"].endswith("broken.jpg") and "JPEG" in row["error"]
