"""The streaming job behind `onnxcam explain`: results against Explainer.explain on the same images, the table
against the record, multi-target maps, and resuming after kill -9 with every image explained exactly once."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import random_images

from onnxcam import Explainer
from onnxcam.core.errors import ExplainError
from onnxcam.core.files import read_image
from onnxcam.jobs import RECORD, Listing, Outputs, Record, explain_files, iter_sources
from onnxcam.jobs.outputs import uint8_map

pq = pytest.importorskip("pyarrow.parquet")


def _write_images(folder: Path, count: int, seed: int = 0, nested: bool = False) -> list[Path]:
    """PNG and JPEG files of mixed sizes; with `nested`, every other one in a subfolder under the same name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(random_images(count, seed=seed, size=(37, 45))):
        image = cv2.resize(image, (30 + 7 * (i % 5), 28 + 5 * (i % 3)))
        sub = folder / "nested" if nested and i % 2 else folder
        sub.mkdir(exist_ok=True)
        path = sub / f"image{i // 2 if nested else i:04d}{'.jpg' if i % 3 == 0 else '.png'}"
        cv2.imwrite(str(path), image[..., ::-1])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def explainer(small_onnx):
    return Explainer(small_onnx, provider="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    _write_images(root, 11, nested=True)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def test_streamed_batches_equal_explain_on_the_decoded_images(explainer, folder):
    paths = [source.path for source in iter_sources([folder], recursive=True)]
    assert len(paths) == 12 and any("nested" in p for p in paths)
    seen, failed = [], []
    for batch in explainer.explain_files(iter(paths), method="gradcam++", batch_size=4, workers=3, keep_images=True):
        assert len(batch.paths) + len(batch.errors) <= 4
        failed += [path for path, _ in batch.errors]
        if batch.explanation is None:
            continue
        reference = explainer.explain([read_image(p) for p in batch.paths], method="gradcam++")
        np.testing.assert_allclose(batch.explanation.heatmaps, reference.heatmaps, atol=1e-5)
        np.testing.assert_array_equal(batch.explanation.classes, reference.classes)
        for path, image in zip(batch.paths, batch.images, strict=True):
            np.testing.assert_array_equal(image, read_image(path))
        seen += batch.paths
    assert failed == [str(folder / "broken.png")]
    assert seen == [p for p in paths if not p.endswith("broken.png")]


def _table(outdir: Path):
    return pq.read_table(outdir / "table").to_pylist()


def _record(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / RECORD).read_text().splitlines()]


def test_every_output_against_explain(explainer, folder, tmp_path):
    out = tmp_path / "out"
    lines = []
    summary = explain_files(explainer, Listing([folder], recursive=True), out, batch_size=3, method="layercam",
                            outputs=Outputs.parse("overlays,heatmaps,table", rows_per_part=5),
                            complain=lines.append, progress=lambda done, total: lines.append((done, total)))
    assert (summary.explained, summary.failed) == (11, 1)
    assert lines[-1] == (12, 12) and sum(isinstance(line, str) and "broken.png" in line for line in lines) == 1
    rows = {row["path"]: row for row in _table(out)}
    record = {line["path"]: line for line in _record(out)}
    assert len(rows) == 11 and len(record) == 12 and "error" in record[str(folder / "broken.png")]
    names = set()
    for path, row in rows.items():
        image = read_image(path)
        reference = explainer.explain(image, method="layercam")
        levels = np.frombuffer(row["heatmap"], np.uint8).reshape(row["height"], row["width"])
        np.testing.assert_allclose(levels, uint8_map(reference.heatmaps[0]), atol=1)
        assert row["class"] == reference.classes[0] == record[path]["target"]
        expected = reference.top_k(5, explainer.labels)[0]
        assert row["top5"] == [{**p, "score": pytest.approx(p["score"], rel=1e-5)} for p in expected]
        assert row["label"] == f"class {row['class']}" and row["score"] == pytest.approx(row["top5"][0]["score"])
        overlay = cv2.imread(str(out / record[path]["overlay"]))
        assert overlay.shape == image.shape
        grey = cv2.imread(str(out / record[path]["heatmap"]), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(grey, levels)
        names.add(record[path]["overlay"])
    assert len(names) == 11 and "nested/image0000.png" in names and "image0000.png" in names
    assert len(list((out / "table").iterdir())) == 2  # batches of 3 files (one broken): parts of 6 and 5 rows
    assert not (out / ".staging").exists() and not list(out.rglob("*.tmp"))
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions.keys() == record.keys()


def test_table_only_run_writes_a_handful_of_files(explainer, tmp_path):
    _write_images(tmp_path / "many", 60, seed=1)
    out = tmp_path / "out"
    summary = explain_files(explainer, Listing([tmp_path / "many"]), out, batch_size=7,
                            outputs=Outputs.parse("heatmaps,table", heatmap_format="npy", rows_per_part=10_000))
    assert summary.explained == 60
    heatmaps = sorted(out.glob("*.heatmap.npy"))
    assert len(heatmaps) == 60 and np.load(heatmaps[0]).dtype == np.float16
    for path in heatmaps:
        path.unlink()
    assert sorted(p.name for p in out.rglob("*")) == ["job.json", "part-000000000-000000008.parquet",
                                                      "predictions.json", RECORD, "table"]
    assert len(_table(out)) == 60


def test_resuming_with_other_outputs_is_refused(explainer, tmp_path):
    """A table resumed from an overlays-only run would hold the new images alone: refused, nothing touched."""
    paths = _write_images(tmp_path / "images", 6, seed=5)
    out = tmp_path / "out"
    explain_files(explainer, Listing(paths[:3]), out, batch_size=2, outputs=Outputs.parse("overlays"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ExplainError, match=r"started with other settings \(table False -> True\): resume it with"):
        explain_files(explainer, Listing(paths), out, batch_size=2, outputs=Outputs.parse("overlays,table"),
                      resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    summary = explain_files(explainer, Listing(paths), out, batch_size=2, outputs=Outputs.parse("overlays"),
                            resume=True)
    assert (summary.skipped, summary.explained) == (3, 3)
    (out / "job.json").unlink()  # as a job started before the settings were kept left its folder
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ExplainError, match=r"holds a job whose settings were not kept .*: write to another folder"):
        explain_files(explainer, Listing(paths), out, batch_size=2, outputs=Outputs.parse("overlays"), resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


class SeveralTargets:
    """An explainer giving two maps per image, its top class and class 0, in one Explanation with image_index
    (the shape of multi-target explanations)."""

    def __init__(self, explainer):
        self.explainer, self.spec, self.labels = explainer, explainer.spec, explainer.labels

    def explain(self, batch, method, targets, **options):
        top = self.explainer.explain(batch, method=method)
        zero = self.explainer.explain(batch, method=method, targets=0)
        count = len(top.classes)
        result = top.__class__(np.concatenate([top.heatmaps, zero.heatmaps]), top.logits,
                               np.concatenate([top.classes, zero.classes]), method)
        result.image_index = np.concatenate([np.arange(count), np.arange(count)])
        return result


def test_several_maps_per_image_follow_image_index(explainer, tmp_path):
    paths = _write_images(tmp_path / "two", 5, seed=2)
    out = tmp_path / "out"
    explain_files(SeveralTargets(explainer), Listing(paths), out, batch_size=2,
                  outputs=Outputs.parse("overlays,table"))
    rows = _table(out)
    assert len(rows) == 10 and len(_record(out)) == 5
    for path in paths:
        mine = sorted((r for r in rows if r["path"] == str(path)), key=lambda r: r["class"])
        reference = explainer.explain(read_image(path), targets=[mine[1]["class"]])
        assert mine[0]["class"] == 0
        levels = np.frombuffer(mine[1]["heatmap"], np.uint8).reshape(32, 32)
        np.testing.assert_allclose(levels, uint8_map(reference.heatmaps[0]), atol=1)
    line = next(line for line in _record(out) if line["path"] == str(paths[0]))
    assert {m["overlay"] for m in line["maps"]} == {f"{paths[0].stem}.class{m['target']}.png" for m in line["maps"]}


def test_detections_are_drawn_on_the_overlays_and_listed_in_the_record(tmp_path):
    from test_targets import TinyYolo, _explainable

    from onnxcam.targets import Detection

    explainer = _explainable(TinyYolo().eval(), tmp_path, "backbone.3")
    paths = _write_images(tmp_path / "images", 3, seed=5)
    for path in paths:  # larger than the model's 32 x 32, and not square, so that boxes are scaled
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (150, 120)))
    out, reports, target = tmp_path / "out", [], Detection(0.5, 0.3, max_detections=3)
    explain_files(explainer, Listing(paths), out, batch_size=2, target=target, report=reports.append,
                  outputs=Outputs.parse("overlays,table"))
    record = {line["path"]: line for line in _record(out)}
    found = 0
    for path in map(str, paths):
        reference = explainer.explain([read_image(path)], targets=target)  # boxes in the pixels of the image
        line = record[path]
        maps = line.get("maps", [line] if "target" in line else [])
        assert len(maps) == len(reference.classes) and line["top5"] == []
        report = next(text for text in reports if text.startswith(f"{path}: "))
        for entry, box, score, klass in zip(maps, reference.boxes, reference.scores, reference.classes, strict=True):
            assert entry["target"] == klass and entry["score"] == pytest.approx(score, rel=1e-5)
            np.testing.assert_allclose(entry["box"], box, atol=0.01)
            assert f"{klass} {score:.3f} at {entry['box']}" in report
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            picture = cv2.imread(str(out / entry["overlay"]))
            left = picture[(y1 + y2) // 2:min(y2, picture.shape[0] - 1), x1]  # below the label, which sits on top
            assert left.size and (left == 255).all(), (path, box)  # drawn white along the box's left edge
            if y2 < picture.shape[0]:  # the lower edge, where the box is not clipped at the image's
                assert (picture[y2, x1:x2 + 1] == 255).all(), (path, box)
            assert not (picture[(y1 + y2) // 2 + 1, x1 + 1:x2 - 1] == 255).all(axis=-1).any()  # the map inside
            found += 1
        assert len({entry["overlay"] for entry in maps}) == len(maps)  # one file per detection, even of one class
    assert found >= 2
    rows = sorted((row["path"], row["score"]) for row in _table(out))
    listed = sorted((path, m["score"]) for path, line in record.items()
                    for m in line.get("maps", [line] if "target" in line else []))
    assert [path for path, _ in rows] == [path for path, _ in listed]
    assert [score for _, score in rows] == pytest.approx([score for _, score in listed], rel=1e-6)


def test_segments_are_outlined_on_the_overlays(tmp_path):
    import torch
    from test_targets import TinySegmenter, _explainable

    from onnxcam.core.images import annotate
    from onnxcam.targets import Segmentation

    torch.manual_seed(0)
    explainer = _explainable(TinySegmenter().eval(), tmp_path, "encoder.3")
    path = _write_images(tmp_path / "images", 1, seed=6)[0]
    cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (80, 60)))
    image = read_image(path)
    segment = max(range(4), key=lambda c: explainer.explain([image], targets=Segmentation(c)).masks.sum())
    reference = explainer.explain([image], targets=Segmentation(segment))
    out = tmp_path / "out"
    explain_files(explainer, Listing([path]), out, target=Segmentation(segment), outputs=Outputs.parse("overlays"))
    (line,) = _record(out)
    assert line["target"] == segment and line["score"] == pytest.approx(reference.scores[0], rel=1e-5)
    picture = read_image(out / line["overlay"])
    outline = (annotate(np.zeros_like(image), mask=reference.masks[0]) == 255).all(axis=-1)
    assert outline.any() and (picture[outline] == 255).all() and not (picture[~outline] == 255).all(axis=-1).any()


def test_a_record_cut_short_keeps_whole_batches_only(tmp_path):
    path = tmp_path / RECORD
    whole = [{"path": "a", "batch": 0}, {"path": "b", "batch": 0, "batch_end": True}]
    cut = [{"path": "c", "batch": 1}, {"path": "d", "batch": 1, "batch_end": True}]
    text = "".join(json.dumps(line) + "\n" for line in whole + cut)
    path.write_text(text[:-30])  # the second batch's last line is half written
    record = Record(path, resume=True)
    assert record.done == {"a", "b"} and record.batches == {0}
    assert path.read_text() == "".join(json.dumps(line) + "\n" for line in whole)


class Crash(Exception):
    """Stands for a kill -9: the job stops where it is raised."""


@pytest.mark.parametrize("crash_at", range(4))
def test_a_crash_before_a_batch_is_recorded_leaves_it_out_of_the_table(explainer, tmp_path, monkeypatch, crash_at):
    """A batch whose record lines were not written must not be in a table part either: a resumed run explains
    it again. (A part merged from staged rows before their record lines held a batch twice after resuming.)"""
    paths = _write_images(tmp_path / "images", 8, seed=4)
    out, outputs = tmp_path / "out", Outputs.parse("overlays,table", rows_per_part=4)  # a part per two batches
    append, calls = Record.append, []

    def crashing(record: Record, entries: list[dict]) -> None:
        calls.append(len(entries))
        if len(calls) > crash_at:
            raise Crash
        append(record, entries)

    monkeypatch.setattr(Record, "append", crashing)
    with pytest.raises(Crash):
        explain_files(explainer, Listing(paths), out, batch_size=2, outputs=outputs)
    monkeypatch.setattr(Record, "append", append)
    summary = explain_files(explainer, Listing(paths), out, batch_size=2, outputs=outputs, resume=True)
    assert (summary.skipped, summary.explained) == (2 * crash_at, 8 - 2 * crash_at)
    assert sorted(line["path"] for line in _record(out)) == sorted(map(str, paths))
    assert sorted(row["path"] for row in _table(out)) == sorted(map(str, paths))
    assert not (out / ".staging").exists() and len(list(out.glob("*.png"))) == 8
    recorded = (out / RECORD).read_bytes()
    again = explain_files(explainer, Listing(paths), out, batch_size=2, outputs=outputs, resume=True)
    assert (again.skipped, again.explained) == (8, 0) and (out / RECORD).read_bytes() == recorded
    assert not (out / ".staging").exists() and len(_table(out)) == 8  # nothing left to do leaves nothing behind


def _run_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnxcam", "explain", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_once_told(args, told: int) -> None:
    """Run `onnxcam explain -v ARGS`, read its first `told` lines (a line is told once its image is recorded),
    then kill -9 it. Its stdout is a one-page pipe, read a page at a time and no further: the job cannot record
    more than two pages of lines and a batch past the kill's cue, however fast it runs and however slow this
    process is, so that the kill lands mid-run without a clock (a job that ends or hangs first fails here)."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    process = subprocess.Popen([sys.executable, "-m", "onnxcam", "explain", *map(str, args), "-v"], stdout=write,
                               stderr=subprocess.PIPE, text=True)
    os.close(write)
    watchdog = threading.Timer(120, process.kill)  # a job that hangs ends the reading below
    watchdog.start()
    lines, rest = 0, b""
    try:
        while lines < told and (chunk := os.read(read, 4096)):
            *whole, rest = (rest + chunk).split(b"\n")
            lines += sum(not line.startswith(b"explained ") for line in whole)  # not the summary of a job done
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        watchdog.cancel()
        os.close(read)
    assert lines >= told, f"the job ended after telling {lines} of {told} images: {process.stderr.read()}"
    process.stderr.close()


def test_kill_9_at_any_moment_then_resume_explains_each_image_once(small_onnx, tmp_path):
    count = 480  # four kills, each at most 30 images and the job's lead past its cue (under 80) in: all mid-run
    paths = _write_images(tmp_path / "images", count, seed=3)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in paths[count // 2:]))
    out = tmp_path / "out"
    args = [small_onnx, *paths[:count // 2], "--from-list", listed, "-o", out, "--save",
            "overlays,table", "--rows-per-part", "24", "--batch-size", "4", "--provider", "cpu"]
    rng, progress = random.Random(0), []
    for attempt in range(4):  # killed once a random number of images (1 to 30) is recorded by this run
        _kill_once_told([*args, *(["--resume"] if attempt else [])], rng.randint(1, 30))
        progress.append((out / RECORD).read_bytes().count(b"\n"))
    assert 0 < progress[0] < progress[1] < progress[2] < progress[3] < count, progress  # each run recorded some,
    # none went back, and each was killed mid-run
    finished = _run_cli(*args, "--resume")
    stdout, stderr = finished.communicate(timeout=120)
    assert finished.returncode == 0, stderr
    assert f"explained {count - progress[-1]} image(s), 0 failed ({progress[-1]} done before)" in stdout, progress
    record = _record(out)
    assert sorted(line["path"] for line in record) == sorted(map(str, paths))
    rows = _table(out)
    assert sorted(row["path"] for row in rows) == sorted(map(str, paths))
    assert len(list((out / "table").iterdir())) >= count // 24
    for line in record:
        assert cv2.imread(str(out / line["overlay"])) is not None
    assert not (out / ".staging").exists() and not list(out.rglob("*.tmp"))
    assert len(list(out.glob("*.png"))) == count


def test_cli_progress_summary_and_verbose(small_onnx, folder, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text(f"# two files\n{folder / 'image0001.png'}\n\n{folder / 'nested' / 'image0000.png'}\n")
    quiet = subprocess.run([sys.executable, "-m", "onnxcam", "explain", small_onnx, folder, "--from-list", listed,
                            "-o", tmp_path / "out", "--provider", "cpu", "--save", "table"],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert quiet.returncode == 1
    assert quiet.stdout.strip().splitlines() == [f"explained 7 image(s), 1 failed; results in {tmp_path / 'out'}"]
    assert [line for line in quiet.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {folder / 'broken.png'}: not a PNG, JPEG, BMP or WebP image",
        "error: 1 image(s) could not be explained"]
    loud = subprocess.run([sys.executable, "-m", "onnxcam", "explain", small_onnx, folder / "image0001.png", "-v",
                           "-o", tmp_path / "loud", "--provider", "cpu", "--format", "jpeg"],
                          capture_output=True, text=True)
    assert loud.returncode == 0, loud.stderr
    first, summary = loud.stdout.strip().splitlines()
    assert first.startswith(f"{folder / 'image0001.png'}: class ") and first.endswith("image0001.jpg")
    assert cv2.imread(str(tmp_path / "loud" / "image0001.jpg")).shape == read_image(folder / "image0001.png").shape
