"""The distribution installs everything under `onnxcam`: nothing called `core` lands in site-packages, and the
tests' model builders (tests/support) stay out of it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_onnxcam_namespace(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("onnxcam-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"onnxcam", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ["onnxcam/core/methods.py", "onnxcam/exporters/autodiff/rules.py", "onnxcam/runtimes/session.py",
                   "onnxcam/serving/page.html", "onnxcam/exporters/web/index.html", "onnxcam/exporters/web/onnxcam.js",
                   "onnxcam/demo/efficientnet_lite.py", "onnxcam/methods/registry.py", "onnxcam/jobs/job.py",
                   "onnxcam/core/contract.py", "onnxcam/cli.py"]:
        assert module in names
    assert not [name for name in names if "testing" in name or "support" in name], "test builders left in the wheel"
    sources = {str(p.relative_to(ROOT)) for folder in ("core", "exporters", "runtimes", "onnxcam")
               for p in (ROOT / folder).rglob("*.py")}
    installed = {name.removeprefix("onnxcam/") for name in names if name.endswith(".py")}
    missing = {s for s in sources if s.removeprefix("onnxcam/") not in installed}
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {sorted(missing)}"
