"""Every example in the README and in the pages of docs/ runs: each page's bash, python and javascript blocks, in
order, in a fresh folder (install and test blocks excepted); javascript runs on Node.js as a module, with the npm
packages of tests/node (onnxruntime-node). Output shown for reading is fenced as text, which is not run. The
docs pages include the README's own examples (pymdownx.snippets) instead of copying them, so each runs once; a
docs page starts where the README's tour ends, with its lite0.onnx and cat.png."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
RUN = ("bash", "python", "javascript")
NOT_RUN = ("text", "console", "yaml")  # output, or a manifest for another tool
SKIPPED = ("pip install", "python -m pytest")
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", flags=re.S | re.M)
STARTING_FILES = ("lite0.onnx", "cat.png")  # what a docs page's folder holds before its first block
PRODUCES = {"exporting.md": ("lite0-two.onnx", "from-onnx.onnx", "lite0-bundle.onnx"),
            "transformers.md": ("vit-shapes.png",),
            "coming-from-pytorch-grad-cam.md": ("cat-cam.jpg", "lite0-compat.onnx")}


def fenced_blocks(page: Path) -> list[tuple[str, str]]:
    return FENCE.findall(page.read_text())


def runnable_blocks(page: Path) -> list[tuple[str, str]]:
    return [(kind, code) for kind, code in fenced_blocks(page)
            if kind in RUN and not code.strip().startswith(SKIPPED)]


def run_blocks(page: Path, folder: Path, env: dict) -> None:
    for name in ("benchmarks", "tests"):  # the examples run from a checkout's root
        (folder / name).symlink_to(ROOT / name)
    (folder / "node_modules").symlink_to(ROOT / "tests" / "node" / "node_modules")  # as after `npm install`
    for kind, code in runnable_blocks(page):
        command = {"bash": ["bash", "-euo", "pipefail", "-c", code], "python": [sys.executable, "-c", code],
                   "javascript": ["node", "--input-type=module", "-e", code]}[kind]
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{page.name}:\n{code}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def example_env(tmp_path_factory):
    """A cache of its own (the demo's export is made once for the module), the interpreter's scripts first on the
    PATH, and this checkout's package first on the import path (not another checkout installed in editable mode)."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "PYTHONPATH": python_path,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory, example_env):
    folder = tmp_path_factory.mktemp("readme")
    run_blocks(README, folder, example_env)
    return folder


def test_every_block_is_run_or_fenced_as_output():
    """A block fenced with another language (```sh, or none) would silently not run."""
    for page in [README, *PAGES]:
        kinds = [kind for kind, _ in fenced_blocks(page)]
        assert set(kinds) <= {*RUN, *NOT_RUN}, f"{page.name}: {kinds}"


def test_readme_examples_run(readme_folder):
    assert [kind for kind, _ in runnable_blocks(README)] == ["bash", "bash", "python", "bash", "javascript", "bash"]
    assert (readme_folder / "out" / "cat.png").exists() and (readme_folder / "cat-gradcam.png").exists()
    assert list((readme_folder / "audit" / "table").glob("*.parquet"))
    assert (readme_folder / "served.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("page", [page for page in PAGES if runnable_blocks(page)], ids=lambda page: page.name)
def test_docs_examples_run(page, readme_folder, example_env, tmp_path):
    for name in STARTING_FILES:
        shutil.copy(readme_folder / name, tmp_path / name)
    run_blocks(page, tmp_path, example_env)
    for name in PRODUCES.get(page.name, ()):
        assert (tmp_path / name).exists(), f"{page.name} did not write {name}"
