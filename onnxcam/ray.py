"""The `explain` job on a Ray cluster (Ray Data), for datasets one machine cannot get through.

Files are read by `read_binary_files` (local paths on a filesystem every node sees, or object-store URIs:
s3://, gs://, abfs://), explained by `map_batches` on a pool of actors, each holding one ONNX Runtime session
(one GPU per actor with the CUDA provider where the cluster has GPUs), and written with `write_parquet`:
the same table as the local job's, plus an `error` column (null where the image was explained). Ray retries
the batch of an actor that dies, on a new actor; Ray Data writes each output block once.

    import onnxcam.ray
    onnxcam.ray.explain_on_ray("model.onnx", ["s3://bucket/images/a.jpg", ...], "out", actors=4)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import ray

from .core.errors import ImageError
from .core.files import decode_image
from .explainer import Explainer
from .jobs import TABLE, Source, Summary
from .jobs.entries import map_entries
from .jobs.outputs import uint8_map
from .jobs.table import table_schema


class ExplainActor:
    """Holds one session; explains a batch of encoded files (Ray Data's `bytes` and `path` columns)."""

    def __init__(self, model: bytes, provider: str, threads: int | None, method: str, target: int | None):
        import pyarrow as pa

        with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as handle:
            handle.write(model)
        try:
            self.explainer = Explainer(handle.name, provider=provider, threads=threads)
        finally:
            os.unlink(handle.name)
        self.method, self.target, self.pa = method, target, pa
        self.schema = table_schema(pa, self.explainer.spec.input_size).append(pa.field("error", pa.string()))

    def __call__(self, batch: dict[str, np.ndarray]):
        spec, images, failed = self.explainer.spec, [], []
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            try:
                images.append((str(path), decode_image(bytes(data), str(path))))
            except ImageError as error:
                failed.append((str(path), str(error)))
        columns = {field.name: [] for field in self.schema}
        if images:
            explanation = self.explainer.explain([image for _, image in images], method=self.method,
                                                 targets=self.target)
            tops = explanation.top_k(5, self.explainer.labels)
            for i, ((path, _), indices) in enumerate(zip(images, explanation.maps_per_image(), strict=True)):
                for entry, m in zip(map_entries(explanation, i, indices, spec.labels), indices, strict=True):
                    levels = uint8_map(explanation.heatmaps[m])
                    row = {"path": path, "method": self.method, "class": entry["target"], "label": entry["label"],
                           "score": entry["score"], "top5": tops[i], "heatmap": levels.tobytes(),
                           "height": levels.shape[0], "width": levels.shape[1], "error": None}
                    for key, value in row.items():
                        columns[key].append(value)
        for path, message in failed:
            for key, column in columns.items():
                column.append({"path": path, "error": message}.get(key))
        return self.pa.Table.from_pydict(columns, schema=self.schema)


def explain_on_ray(model: str | os.PathLike, sources: Iterable[Source | str | os.PathLike], outdir, *,
                   address: str | None = None, actors: int = 1, method: str = "gradcam", target: int | None = None,
                   batch_size: int = 8, provider: str = "auto",
                   complain: Callable[[str], None] = lambda line: None) -> Summary:
    """Explain `sources` on the Ray cluster at `address` (None: RAY_ADDRESS's, or a new local one; a cluster
    already joined by this process is used as it is) into the Parquet table `outdir`/table.

    `actors` sessions run at once: one GPU each where the cluster has GPUs (provider CUDA), else one CPU
    each, with one ONNX Runtime thread. Each image that could not be read is told to `complain` in one line
    when the run is over.
    """
    paths = [item.path if isinstance(item, Source) else os.fspath(item) for item in sources]
    if not paths:
        raise ImageError("no images to explain")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    if gpus and provider == "auto":
        provider = "cuda"
    _check_model(model)
    model_bytes = Path(model).read_bytes()
    outdir = Path(outdir)
    table = outdir / TABLE
    # reading bytes and writing Parquet wait on I/O: they reserve no core, so that as many actors as cores fit, and
    # run at most `actors` at once (tasks that reserve nothing are otherwise launched without bound, each in a
    # worker process of its own: 68 processes started on two cores, and one actor ran 4.7x slower)
    dataset = ray.data.read_binary_files([_as_uri(p) for p in paths], include_paths=True, num_cpus=0,
                                         concurrency=actors)
    explained = dataset.map_batches(
        ExplainActor, fn_constructor_kwargs={"model": model_bytes, "provider": provider if gpus else "cpu",
                                             "threads": None if gpus else 1, "method": method, "target": target},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    explained.write_parquet(str(table), ray_remote_args={"num_cpus": 0}, concurrency=actors)
    return _summary(table, outdir, complain)


def _as_uri(path: str) -> str:
    """An absolute local path (what every node of a cluster with a shared filesystem sees), or the URI."""
    return path if "://" in path else str(Path(path).resolve())


def _check_model(model) -> None:
    """Load the model here once, so that a wrong file fails in one line before any actor starts."""
    Explainer(model, provider="cpu", threads=1)


def _summary(table: Path, outdir: Path, complain: Callable[[str], None]) -> Summary:
    """Counts from the table written (images with explained rows, images with an error), each error told."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    rows = pds.dataset(table, format="parquet").to_table(columns=["path", "error"])
    failed = rows.filter(pc.is_valid(rows.column("error")))
    for message in failed.column("error").to_pylist():
        complain(message)
    explained = pc.count_distinct(rows.filter(pc.is_null(rows.column("error"))).column("path")).as_py()
    return Summary(explained=explained, failed=failed.num_rows, outdir=outdir, table=table)
