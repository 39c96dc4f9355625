"""A bounded soak (benchmarks/soak.py with fewer requests): `onnxcam serve` on loopback under 16 clients, a fifth
of the requests bad (64 MiB bodies sent as urllib sends them among them), then SIGTERM with requests in flight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def test_soak_bounded(small_onnx):
    result = subprocess.run([sys.executable, str(SOAK), str(small_onnx), "--requests", "240", "--clients", "16",
                             "--json"], capture_output=True, text=True, timeout=300)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["requests"] == 240 and figures["bad requests"] == 48
    assert figures["5xx"] == 0 and figures["unexpected"] == {}, figures
    assert figures["readiness after SIGTERM"] == 503 and figures["errors after SIGTERM"] == 0, figures
    assert result.returncode == 0, figures["failed checks"]
