"""Images read from an object store: an S3 server on loopback (moto's, started here, bounded by the module) holds the
photos, and a list of s3:// URIs, explained by the command line and on Ray, gives the heatmaps the same files give
from disk; an object that is missing or broken is one line and the rest of the run goes on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
pq = pytest.importorskip("pyarrow.parquet")

from conftest import run_cli  # noqa: E402
from test_pipeline import _write_images  # noqa: E402

from onnxcam import Explainer  # noqa: E402
from onnxcam.jobs import Outputs, explain_files  # noqa: E402

HEATMAPS_AND_TABLE = Outputs.parse("heatmaps,table")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The photos on disk and their s3:// URIs (two more: a broken file and a missing object); the server's address
    and test credentials in the environment, where botocore and every process started from here read them."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environment = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    folder = tmp_path_factory.mktemp("photos")
    paths = _write_images(folder, 9, seed=11)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    client = boto3.client("s3")
    client.create_bucket(Bucket="photos")
    for path in [*paths, folder / "broken.jpg"]:
        client.upload_file(str(path), "photos", f"set/{path.name}")
    uris = [f"s3://photos/set/{path.name}" for path in [*paths, folder / "broken.jpg"]] + ["s3://photos/set/gone.png"]
    yield paths, uris
    server.stop()
    for name, value in saved.items():
        os.environ.pop(name) if value is None else os.environ.update({name: value})


def _heatmaps(outdir) -> dict[str, np.ndarray]:
    """The table's 8-bit heatmaps by file name."""
    rows = pq.read_table(outdir / "table").to_pylist()
    return {row["path"].rsplit("/", 1)[-1]: np.frombuffer(row["heatmap"], np.uint8) for row in rows}


def _assert_same_as_from_disk(small_onnx, paths, outdir, tmp_path):
    on_disk = explain_files(Explainer(small_onnx, provider="cpu"), paths, tmp_path / "disk", batch_size=4,
                            outputs=HEATMAPS_AND_TABLE)
    assert on_disk.explained == len(paths)
    from_store, from_disk = _heatmaps(outdir), _heatmaps(tmp_path / "disk")
    assert from_store.keys() == from_disk.keys() == {path.name for path in paths}
    for name, levels in from_store.items():
        np.testing.assert_array_equal(levels, from_disk[name])
    for name in sorted(p.name for p in (tmp_path / "disk").glob("*.heatmap.png")):  # named as from disk
        assert (outdir / name).read_bytes() == (tmp_path / "disk" / name).read_bytes(), name
    assert len(list(outdir.glob("*.heatmap.png"))) == len(paths)


def test_a_list_of_s3_uris_explains_as_the_files_do(small_onnx, photos, tmp_path):
    paths, uris = photos
    (tmp_path / "uris.txt").write_text("\n".join(uris) + "\n")
    done = run_cli("explain", str(small_onnx), "--from-list", str(tmp_path / "uris.txt"), "-o", str(tmp_path / "out"),
                   "--save", "heatmaps,table", "--batch-size", "4")
    assert done.returncode == 1, done.stderr  # two images failed; the others were explained
    complaints = [line for line in done.stderr.splitlines() if "s3://photos/set/" in line]
    assert len(complaints) == 2 and all("Traceback" not in line for line in done.stderr.splitlines())
    assert any("broken.jpg" in line for line in complaints) and any("gone.png" in line for line in complaints)
    record = [json.loads(line) for line in (tmp_path / "out" / "record.jsonl").read_text().splitlines()]
    assert sorted(line["path"] for line in record) == sorted(uris)
    _assert_same_as_from_disk(small_onnx, paths, tmp_path / "out", tmp_path)


def test_a_list_of_s3_uris_explains_on_ray_as_the_files_do(small_onnx, photos, tmp_path):
    ray = pytest.importorskip("ray")
    from onnxcam.ray import explain_on_ray

    paths, uris = photos
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")  # after the fixture: its workers inherit the server's address
    try:
        complaints = []
        summary = explain_on_ray(small_onnx, uris, tmp_path / "out", actors=1, batch_size=4,
                                 outputs=HEATMAPS_AND_TABLE, complain=complaints.append)
    finally:
        ray.shutdown()
    assert (summary.explained, summary.failed) == (len(paths), 2) and len(complaints) == 2
    _assert_same_as_from_disk(small_onnx, paths, tmp_path / "out", tmp_path)


def test_an_object_store_uri_as_the_output_folder_is_refused_in_one_line(small_onnx, photos, tmp_path):
    paths, _ = photos
    done = run_cli("explain", str(small_onnx), str(paths[0]), "-o", "s3://photos/out", cwd=tmp_path)
    assert done.returncode != 0 and "object-store URI" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir()), "a folder named s3: was made"
