"""Soak test of `onnxcam serve` on loopback: many clients, a fifth of the requests bad, then SIGTERM mid-load.

    python benchmarks/soak.py MODEL.onnx --requests 2000 --clients 16

The good requests are images to POST /explain, Open Inference tensors and KServe V1 instances; the bad ones are
truncated images, 64 MiB bodies sent the way urllib sends them (the whole body before the answer is read),
tensors whose data does not match their shape, and unknown models. It checks: no 5xx; every bad request
answered with its own 4xx; the server's resident memory growing under 10% from the first 200 requests to the
last; and after SIGTERM, every request accepted before it answered (one per client, held in flight by a body
sent in two halves, the second after the signal). Exit status 1 when a check fails; --json
prints the figures as JSON; --record writes them to benchmarks/results/soak.md and soak.json, with the command,
the machine and its load (off by default: tests/test_soak.py runs this script with fewer requests).
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
from provenance import begin, describe, end, write

EXPECTED = {"image": 200, "tensor": 200, "v1": 200, "truncated": 400, "oversized": 413, "wrong tensor": 400,
            "unknown model": 404}
BAD = ("truncated", "oversized", "wrong tensor", "unknown model")
GOOD = ("image", "tensor", "v1")


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("VmRSS:"))) / 1024


class Workload:
    """The request of each kind, built once."""

    def __init__(self, base: str, model: str, size: tuple[int, int], oversized_mib: int):
        rng = np.random.default_rng(0)
        image = cv2.GaussianBlur(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8), (9, 9), 0)
        self.png = cv2.imencode(".png", image)[1].tobytes()
        batch = rng.standard_normal((2, 3, *size)).astype(np.float32)
        self.tensor = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                                   "data": batch.ravel().tolist()}]}
        self.wrong = {"inputs": [{"name": "input", "shape": [2, 3, *size], "datatype": "FP32", "data": [0.0] * 7}]}
        self.v1 = {"instances": [{"b64": base64.b64encode(self.png).decode()}], "parameters": {"method": "layercam"}}
        self.oversized = b"\0" * (oversized_mib * 2 ** 20)
        self.base, self.model = base, model

    def send(self, session: httpx.Client, kind: str) -> int:
        base, model = self.base, self.model
        if kind == "image":
            return session.post(f"{base}/explain", content=self.png, headers={"Accept": "image/png"}).status_code
        if kind == "tensor":
            return session.post(f"{base}/v2/models/{model}/infer", json=self.tensor).status_code
        if kind == "v1":
            return session.post(f"{base}/v1/models/{model}:explain", json=self.v1).status_code
        if kind == "truncated":
            return session.post(f"{base}/explain", content=self.png[: len(self.png) // 2]).status_code
        if kind == "wrong tensor":
            return session.post(f"{base}/v2/models/{model}/explain", json=self.wrong).status_code
        if kind == "unknown model":
            return session.post(f"{base}/v2/models/not-{model}/infer", json=self.tensor).status_code
        return urllib_post(f"{base}/explain", self.oversized)

    def held(self, session: httpx.Client, release: threading.Event) -> int:
        """An image whose second half is sent only once `release` is set: the request is in flight until then."""
        half = len(self.png) // 2

        def body():
            yield self.png[:half]
            release.wait(60)
            yield self.png[half:]

        return session.post(f"{self.base}/explain", content=body(), headers={"Accept": "image/png"}).status_code


def urllib_post(url: str, body: bytes) -> int:
    """Python's urllib writes the whole body before it reads the answer."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return -1  # reset or refused: the failure this soak looks for


def schedule(requests: int, seed: int = 0) -> list[str]:
    """A fifth bad (the four kinds in turn), the rest good, shuffled."""
    kinds = [BAD[i % len(BAD)] if i % 5 == 4 else GOOD[i % len(GOOD)] for i in range(requests)]
    np.random.default_rng(seed).shuffle(kinds)
    return kinds


def start_server(model: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "onnxcam", "serve", str(model), "--port", str(port),
                               "--provider", "cpu", "--queue-size", "256", "--drain-delay", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}")


def run_load(work: Workload, kinds: list[str], clients: int, pid: int) -> dict:
    """Send `kinds` from `clients` threads; the server's memory is read after the first 200 answers and at the end."""
    results: list[tuple[str, int]] = []
    lock, memory = threading.Lock(), {}
    queue = iter(kinds)

    def client(_):
        with httpx.Client(timeout=120) as session:
            while True:
                with lock:
                    kind = next(queue, None)
                if kind is None:
                    return
                status = work.send(session, kind)
                with lock:
                    results.append((kind, status))
                    if len(results) == min(200, len(kinds)):
                        memory["after 200 MiB"] = round(resident_mib(pid), 1)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    memory["at the end MiB"] = round(resident_mib(pid), 1)
    wrong = Counter(f"{kind} -> {status}" for kind, status in results if status != EXPECTED[kind])
    return {"requests": len(results), "seconds": round(time.perf_counter() - start, 1),
            "bad requests": sum(kind in BAD for kind, _ in results),
            "5xx": sum(status >= 500 for _, status in results), "unexpected": dict(wrong), **memory,
            "memory growth %": round(100 * (memory["at the end MiB"] / memory["after 200 MiB"] - 1), 1)}


def sigterm_under_load(work: Workload, server: subprocess.Popen, accepted: int) -> dict:
    """`accepted` requests in flight (their bodies half sent, so that a fast model cannot answer them first), then
    SIGTERM: readiness must turn false, and once the bodies are finished every one must be answered."""
    def in_flight() -> float:
        text = httpx.get(f"{work.base}/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("onnxcam_requests_in_flight")))

    release = threading.Event()
    with ThreadPoolExecutor(accepted) as pool, httpx.Client(timeout=120) as session:
        calls = [pool.submit(work.held, session, release) for _ in range(accepted)]
        deadline = time.monotonic() + 30
        while (measured := in_flight()) < accepted and time.monotonic() < deadline:
            time.sleep(0.005)
        server.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{work.base}/v2/health/ready").status_code
        release.set()
        statuses = [call.result() for call in calls]
    code = server.wait(60)
    return {"in flight at SIGTERM": int(measured), "readiness after SIGTERM": ready,
            "errors after SIGTERM": sum(status != 200 for status in statuses), "exit": code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--oversized-mib", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="Print the figures as one JSON object.")
    parser.add_argument("--record", action="store_true", help="Write benchmarks/results/soak.md and soak.json.")
    args = parser.parse_args(argv)
    run = begin()
    from onnxcam import Explainer

    spec = Explainer(args.model, provider="cpu").spec
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(args.model, port)
    try:
        work = Workload(f"http://127.0.0.1:{port}", args.model.name.split(".")[0], spec.input_size, args.oversized_mib)
        figures = run_load(work, schedule(args.requests), args.clients, server.pid)
        figures |= sigterm_under_load(work, server, args.clients)
    finally:
        server.kill()
    failures = [name for name, failed in [
        ("5xx answers", figures["5xx"] > 0), ("bad requests without their 4xx", bool(figures["unexpected"])),
        ("memory growth >= 10%", figures["memory growth %"] >= 10),
        ("readiness still true after SIGTERM", figures["readiness after SIGTERM"] != 503),
        ("errors after SIGTERM", figures["errors after SIGTERM"] > 0),
        ("fewer requests in flight at SIGTERM than sent", figures["in flight at SIGTERM"] < args.clients)] if failed]
    figures["failed checks"] = failures
    print(json.dumps(figures) if args.json else "\n".join(f"{k:<32}{v}" for k, v in figures.items()))
    if args.record:
        record(end(run), args, spec, figures)
    return 1 if failures else 0


def record(run: dict, args, spec, figures: dict) -> None:
    model = (f"{args.model.name} ({args.model.stat().st_size / 2**10:.0f} KiB, input {spec.input_size[0]} x "
             f"{spec.input_size[1]}, target {', '.join(spec.layers)})")
    lines = ["# Soak test of `onnxcam serve` (benchmarks/soak.py)", "", *describe(run), "",
             f"{args.requests} requests from {args.clients} clients on loopback (127.0.0.1), a fifth of them bad "
             f"({args.oversized_mib} MiB bodies sent as urllib sends them among them), then SIGTERM with "
             f"{figures['in flight at SIGTERM']} of {args.clients} requests in flight (sent with their bodies half "
             f"sent). Model: {model}.", "",
             "| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value if value not in ({}, []) else 'none'} |" for name, value in figures.items()]
    write("soak", "\n".join(lines), {"run": run, "model": model, "requests": args.requests,
                                     "clients": args.clients, "figures": figures})


if __name__ == "__main__":
    sys.exit(main())
