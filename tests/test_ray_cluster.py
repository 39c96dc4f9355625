"""The job on a cluster of three Ray nodes simulated on this machine (ray.cluster_utils.Cluster: a head without
cores, two workers of one core each): a worker node lost while its actor works, and still every image
exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from test_pipeline import _write_images  # noqa: E402

from onnxcam.jobs import Outputs  # noqa: E402

IMAGES = 96


def _telling_actor(signals: Path) -> type:
    """ExplainActor, but each call first leaves a file named after its node: a node is lost while it works. Made
    here, so that Ray ships the class by value to workers that cannot import tests."""
    from onnxcam.ray import ExplainActor

    class TellingExplainActor(ExplainActor):
        def explain(self, chunk):
            (signals / ray.get_runtime_context().get_node_id()).touch()
            return super().explain(chunk)

    return TellingExplainActor


@pytest.fixture
def cluster(monkeypatch):
    # every node on loopback: Cluster gives worker nodes the machine's own address, which a sandbox may not route
    monkeypatch.setattr(ray._private.services, "get_node_ip_address", lambda *args, **kwargs: "127.0.0.1")
    # a lost node is told dead after 3 missed health checks 0.2 s apart, rather than Ray's 30 s
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1",
        "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 3}})
    workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_a_lost_worker_node_loses_no_image(cluster, small_onnx, tmp_path, monkeypatch):
    import onnxcam.ray
    from onnxcam.ray import explain_on_ray

    cluster, workers = cluster
    monkeypatch.setattr(onnxcam.ray, "ExplainActor", _telling_actor(tmp_path))
    monkeypatch.setattr(onnxcam.ray, "CHUNK", 1)  # a call per batch: 48 calls over the two nodes
    paths = [str(p) for p in _write_images(tmp_path / "images", IMAGES, seed=6)]
    lost = []

    def progress(done: int, total: int | None) -> None:  # a node goes at the first commit, one whose actor works
        working = [node for node in workers if (tmp_path / node.node_id).exists()]
        if not lost and working:
            lost.append(done)
            cluster.remove_node(working[0], allow_graceful=False)

    summary = explain_on_ray(small_onnx, paths, tmp_path / "out", actors=2, batch_size=2,
                             outputs=Outputs.parse("heatmaps,table"), progress=progress)
    assert lost and lost[0] < IMAGES, "no node was lost mid-job"
    assert (summary.explained, summary.failed) == (IMAGES, 0)
    lines = [json.loads(line) for line in (tmp_path / "out" / "record.jsonl").read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(paths)
    assert sorted(pq.read_table(tmp_path / "out" / "table").column("path").to_pylist()) == sorted(paths)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(
        f"image{i:04d}.heatmap.png" for i in range(IMAGES))
