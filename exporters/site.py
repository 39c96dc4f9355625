"""A static site that explains in the browser (`export --web DIR`): index.html, onnxcam.js, the in-graph heatmaps
file and onnxcam.json (what the page needs to preprocess and read the outputs), run by onnxruntime-web on the
user's machine; the image never leaves it. onnxruntime-web is pinned: the page imports it from a copy of its files
(`ort_web`, checked against the pinned hashes) or from the CDN, with subresource integrity either way."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from ..core.contract import HEATMAPS_OUTPUT, ExplainSpec
from ..core.errors import ExportError

ORT_WEB_VERSION = "1.31.1"
ORT_WEB_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
ORT_WEB_MODULE = "ort.webgpu.bundle.min.mjs"  # WebGPU and WebAssembly, both on the wasm file below
ORT_WEB_WASM = "ort-wasm-simd-threaded.asyncify.wasm"
# sha384 of the npm package's files, which the CDN serves verbatim
ORT_WEB_INTEGRITY = {
    ORT_WEB_MODULE: "sha384-q9NLauAnXAH0rCG36G91GOHyeg64iusoNtb5eQCPYv2Ccza05oyW78oGQDNwyfVU",
    ORT_WEB_WASM: "sha384-Da9/alSN2rEHI5XIgPPOp70/HfJ82/URSSpUwy1h4UmGMPkJtb6PoMwvcBHy5h8P",
}
MODEL_FILE = "model.onnx"
CONFIG_FILE = "onnxcam.json"
PAGE_FILES = ("index.html", "onnxcam.js")
INPUT_TYPES = ("float32", "float64", "uint8")


def sri(path: Path) -> str:
    """The subresource-integrity value of a file: sha384, base64."""
    return "sha384-" + base64.b64encode(hashlib.sha384(path.read_bytes()).digest()).decode()


def check_destination(folder, ort_web=None) -> Path | None:
    """Refuse, before any work, a site folder holding other files, a bad onnxruntime-web folder (else returned), or
    one given with no site to copy it into."""
    if folder is None:
        raise ExportError("onnxruntime-web's folder is copied into a site, and no site is written", option="web")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / CONFIG_FILE).is_file():
        raise ExportError(f"{folder} is a folder with other files in it: give a new or empty one", option="web")
    return check_ort_web(ort_web) if ort_web is not None else None


def check_ort_web(folder) -> Path:
    """The onnxruntime-web folder given (its dist), holding the pinned version's files; else one line."""
    folder = Path(folder)
    for name, integrity in ORT_WEB_INTEGRITY.items():
        if not (folder / name).is_file():
            raise ExportError(f"{folder}: no {name} inside; give onnxruntime-web's dist folder "
                              f"(npm install onnxruntime-web@{ORT_WEB_VERSION})", option="ort_web")
        if sri(folder / name) != integrity:
            raise ExportError(f"{folder}/{name} is not onnxruntime-web {ORT_WEB_VERSION}'s (pinned): "
                              f"npm install onnxruntime-web@{ORT_WEB_VERSION}", option="ort_web")
    return folder


def check_web(spec: ExplainSpec) -> None:
    """Refuse, in one line, a file the page cannot run: it needs the in-graph heatmaps of a classifier."""
    problem = ("it takes encoded bytes (--bundle)" if spec.bundled else
               "it computes no heatmaps in the graph" if not spec.heatmaps else
               "its scores are not one row of class scores" if len(spec.score_shape or [0, 0]) != 1 else
               f"its input is {spec.input_type} (the page builds {', '.join(INPUT_TYPES)})"
               if spec.input_type not in INPUT_TYPES else None)
    if problem:
        raise ExportError(f"cannot write a web page for this file: {problem}", option="web")


def site_config(spec: ExplainSpec) -> dict:
    """onnxcam.json: the names and preprocessing the page uses, as Python's explainer does."""
    return {"model": MODEL_FILE, "input": spec.input, "class_input": spec.class_input, "scores": spec.scores,
            "selected": spec.selected, "heatmaps": HEATMAPS_OUTPUT, "method": spec.heatmaps,
            "size": list(spec.input_size), "layout": spec.input_layout, "type": spec.input_type, "mean": spec.mean,
            "std": spec.std, "labels": spec.labels, "squashing": spec.squashing,
            "wasm": ORT_WEB_WASM, "wasm_integrity": ORT_WEB_INTEGRITY[ORT_WEB_WASM]}


def _ort_tags(base: str) -> str:
    """The import map naming onnxruntime-web and its integrity, and a preload with the same check."""
    url = base + ORT_WEB_MODULE
    integrity = ORT_WEB_INTEGRITY[ORT_WEB_MODULE]
    imports = json.dumps({"imports": {"onnxruntime-web": url}, "integrity": {url: integrity}})
    return (f'<script type="importmap">{imports}</script>\n'
            f'<link rel="modulepreload" href="{url}" integrity="{integrity}" crossorigin="anonymous">')


def write_site(model_path, folder, ort_web=None) -> Path:
    """Write the site for the explainable file at `model_path` into `folder`, whole or not at all (built beside
    it, then renamed; a site written before is replaced, any other non-empty folder refused)."""
    folder = Path(folder)
    ort = check_destination(folder, ort_web)
    spec = _spec(model_path)
    check_web(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        assets = resources.files(__package__).joinpath("web")
        page = assets.joinpath("index.html").read_text().replace("<!-- onnxruntime-web -->",
                                                                 _ort_tags("./ort/" if ort else ORT_WEB_CDN))
        (build / "index.html").write_text(page)
        (build / "onnxcam.js").write_text(assets.joinpath("onnxcam.js").read_text())
        (build / CONFIG_FILE).write_text(json.dumps(site_config(spec)))
        shutil.copyfile(model_path, build / MODEL_FILE)
        if ort:
            (build / "ort").mkdir()
            for name in ORT_WEB_INTEGRITY:
                shutil.copyfile(ort / name, build / "ort" / name)
        build.chmod(0o755)
        old = folder.with_name(f".{folder.name}.old") if folder.exists() else None
        if old:
            folder.rename(old)
        build.rename(folder)
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return folder


def _spec(model_path) -> ExplainSpec:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    spec = ExplainSpec.from_metadata({p.key: p.value for p in model.metadata_props})
    if spec is None:
        raise ExportError(f"{model_path} is not an explainable file", option="web")
    return spec
