"""Every example in the README runs, in order, in a fresh folder (install and test blocks excepted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SKIPPED = ("pip install", "python -m pytest")


def readme_blocks():
    blocks = re.findall(r"```(bash|python)\n(.*?)```", README.read_text(), flags=re.S)
    return [(kind, code) for kind, code in blocks if not code.strip().startswith(SKIPPED)]


def test_readme_examples_run(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for folder in ("benchmarks", "tests"):  # the examples run from a checkout's root
        (tmp_path / folder).symlink_to(README.parent / folder)
    blocks = readme_blocks()
    assert [kind for kind, _ in blocks] == ["bash", "bash", "python", "python", "python", "bash", "bash", "bash",
                                            "bash", "bash"]
    for kind, code in blocks:
        command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "out" / "cat.png").exists() and (tmp_path / "cat-gradcam.png").exists()
    assert (tmp_path / "from-onnx.onnx").exists() and (tmp_path / "vit-shapes.png").exists()
    assert (tmp_path / "served.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
