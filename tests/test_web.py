"""The static site of `export --web` (exporters.site, issue 20) in Debian's Chromium: onnxruntime-web explains a
photo on the page, served on loopback; its heatmap equals Python's, on the pretrained EfficientNet-Lite0 and a ViT.
onnxruntime-web comes from npm (tests/node, `npm ci --ignore-scripts`; .ci/run installs it)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import run_cli
from test_page import browser  # noqa: F401 (the fixture: Debian's Chromium through playwright)

import onnxcam
from onnxcam.core.contract import HEATMAPS_OUTPUT
from onnxcam.core.errors import ExportError
from onnxcam.core.files import read_image, write_png
from onnxcam.exporters import export_onnx
from onnxcam.exporters.site import ORT_WEB_CDN, ORT_WEB_INTEGRITY, ORT_WEB_MODULE, sri, write_site

ROOT = Path(__file__).parent
ORT_WEB = ROOT / "node" / "node_modules" / "onnxruntime-web" / "dist"
VIT = ROOT / "fixtures" / "foreign" / "hf_vit_dynamo.onnx"
HEATMAP_TOLERANCE = 1e-3


@contextlib.contextmanager
def served(folder: Path):
    """A static HTTP server of `folder` on 127.0.0.1 (no COOP/COEP headers: onnxruntime-web runs one thread)."""
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm"}

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """scikit-image's cat, 300 x 451: the page shrinks it (OpenCV's area resize, as Python's preprocessing)."""
    import skimage.data

    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    write_png(path, skimage.data.chelsea())
    return path


def _lite0_site(folder: Path) -> Path:
    from onnxcam.demo import IMAGENET_MEAN, IMAGENET_STD, imagenet_labels
    from onnxcam.demo.efficientnet_lite import efficientnet_lite0_pretrained
    from onnxcam.exporters import export_torch

    export_torch(efficientnet_lite0_pretrained(), folder / "lite0.onnx", input_shape=(3, 224, 224),
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=imagenet_labels(), heatmaps="gradcam",
                 web=folder / "site", ort_web=ORT_WEB)
    return folder / "site"


def _vit_site(folder: Path) -> Path:
    done = run_cli("export", VIT, "-o", folder / "vit.onnx", "--heatmaps", "layercam", "--web", folder / "site",
                   "--ort-web", ORT_WEB)
    assert done.returncode == 0, done.stderr
    return folder / "site"


@pytest.mark.parametrize("make_site", [_lite0_site, _vit_site], ids=["efficientnet-lite0", "vit"])
def test_the_page_explains_in_the_browser_as_python_does(browser, photo, make_site, tmp_path):  # noqa: F811
    if not ORT_WEB.is_dir():
        pytest.skip("onnxruntime-web is not installed: npm ci --ignore-scripts in tests/node")
    site = make_site(tmp_path)
    page = browser.new_page()
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    with served(site) as url:
        page.goto(url)
        page.wait_for_selector("body[data-ready]", timeout=60_000)
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#overlay[data-drawn]", timeout=60_000)
        result = page.evaluate("""() => { const r = window.onnxcam.result;
            return {input: Array.from(r.input), heatmap: Array.from(r.heatmap), selected: r.selected,
                    top: r.top, provider: r.provider}; }""")
        page.locator("#opacity").fill("0")
        plain = page.locator("#overlay").screenshot()
        page.locator("#opacity").fill("100")
        assert page.locator("#overlay").screenshot() != plain  # the slider blends the heatmap in
        page.locator("#classes li").nth(1).click()  # another class of the top five, explained in turn
        page.wait_for_function(f"window.onnxcam.result.selected === {result['top'][1][0]}", timeout=30_000)
    page.close()
    assert {urlparse(address).hostname for address in requested} == {"127.0.0.1"}  # the image stays here

    explainer = onnxcam.Explainer(site / "model.onnx", provider="cpu")
    spec = explainer.spec
    python_input = explainer.prepare(read_image(photo))
    page_input = np.asarray(result["input"], np.float32).reshape(python_input.shape)
    # the page resizes in float and rounds to 8 bits, OpenCV in fixed point: within one level of 255
    level = 1 / 255 / min(spec.std or [1.0])
    assert np.abs(page_input - python_input).max() <= level + 1e-6

    def run(batch):
        return explainer.model.runner.run([HEATMAPS_OUTPUT, spec.selected],
                                          {spec.input: batch, spec.class_input: np.full(1, -1, np.int64)})

    heatmaps, selected = run(page_input)
    page_heatmap = np.asarray(result["heatmap"], np.float32).reshape(heatmaps.shape)
    assert np.abs(page_heatmap - heatmaps).max() <= HEATMAP_TOLERANCE
    assert result["selected"] == int(selected[0]) == int(run(python_input)[1][0]) == result["top"][0][0]
    assert result["provider"] == "wasm"  # no WebGPU in headless Chromium without a GPU


def test_without_a_local_copy_the_page_imports_the_pinned_cdn_file_with_its_hash(tmp_path):
    export_onnx(VIT, tmp_path / "vit.onnx", heatmaps="gradcam")
    page = (write_site(tmp_path / "vit.onnx", tmp_path / "site") / "index.html").read_text()
    url = ORT_WEB_CDN + ORT_WEB_MODULE
    assert url.startswith("https://cdn.jsdelivr.net/npm/onnxruntime-web@1.31.1/")
    assert (f'href="{url}" integrity="{ORT_WEB_INTEGRITY[ORT_WEB_MODULE]}" crossorigin="anonymous"' in page
            and f'"integrity": {{"{url}": "{ORT_WEB_INTEGRITY[ORT_WEB_MODULE]}"}}' in page)
    assert not (tmp_path / "site" / "ort").exists()
    if ORT_WEB.is_dir():  # the pinned hashes are the npm package's files'
        assert {name: sri(ORT_WEB / name) for name in ORT_WEB_INTEGRITY} == ORT_WEB_INTEGRITY


def test_the_cdn_page_runs_the_pinned_files_and_refuses_others(browser, tmp_path):  # noqa: F811
    """The CDN's answers are the npm package's files here (playwright routes them, nothing leaves the machine);
    a module that is not the pinned one is refused by its hash."""
    if not ORT_WEB.is_dir():
        pytest.skip("onnxruntime-web is not installed: npm ci --ignore-scripts in tests/node")
    export_onnx(VIT, tmp_path / "vit.onnx", heatmaps="gradcam", web=tmp_path / "site")
    for module, loads in [(ORT_WEB_MODULE, True), ("ort.wasm.bundle.min.mjs", False)]:
        tab = browser.new_page()
        refused = []
        tab.on("console", lambda message, refused=refused: refused.append("integrity" in message.text))
        tab.route(ORT_WEB_CDN + "*", functools.partial(_cdn, module))
        with served(tmp_path / "site") as url:
            tab.goto(url)
            if loads:
                tab.wait_for_selector("body[data-ready]", timeout=60_000)
            else:
                tab.wait_for_timeout(3_000)
                assert any(refused) and tab.locator("body[data-ready]").count() == 0
        tab.close()


def _cdn(module: str, route) -> None:
    """The CDN's answer from the npm package's files, with `module` in place of the pinned module."""
    name = urlparse(route.request.url).path.rsplit("/", 1)[-1]
    route.fulfill(path=ORT_WEB / (module if name == ORT_WEB_MODULE else name),
                  headers={"access-control-allow-origin": "*"})


def test_a_folder_without_onnxruntime_web_or_a_file_without_heatmaps_is_refused_in_one_line(tmp_path):
    with pytest.raises(ExportError, match="no ort.webgpu.bundle.min.mjs inside") as refused:
        export_onnx(VIT, tmp_path / "vit.onnx", web=tmp_path / "site", ort_web=tmp_path)
    assert "\n" not in str(refused.value) and not (tmp_path / "vit.onnx").exists()
    export_onnx(VIT, tmp_path / "plain.onnx")
    with pytest.raises(ExportError, match="computes no heatmaps in the graph"):
        write_site(tmp_path / "plain.onnx", tmp_path / "site")
    assert not (tmp_path / "site").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="a folder with other files in it"):
        export_onnx(VIT, tmp_path / "vit.onnx", web=tmp_path / "mine")
    assert not (tmp_path / "vit.onnx").exists()  # refused before any work
    export_onnx(VIT, tmp_path / "vit.onnx", web=tmp_path / "site")
    export_onnx(VIT, tmp_path / "vit.onnx", heatmaps="layercam", web=tmp_path / "site")  # a site is replaced
    assert json.loads((tmp_path / "site" / "onnxcam.json").read_text())["method"] == "layercam"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no build left behind
    done = run_cli("export", VIT, "-o", tmp_path / "cli.onnx", "--web", tmp_path / "site", "--ort-web", tmp_path)
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "--ort-web" in done.stderr
    done = run_cli("export", VIT, "-o", tmp_path / "alone.onnx", "--ort-web", ORT_WEB)  # a site's, with no site
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "(set --web)" in done.stderr
    assert not (tmp_path / "alone.onnx").exists()
