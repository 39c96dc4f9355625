"""Load on the explanation server over loopback: throughput and p50/p99 latency of POST /explain
with micro-batching and without it (--max-batch 1), same model, same clients, one run.

    python benchmarks/serve_load.py MODEL.onnx IMAGE --clients 16 --requests 20
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from onnxcam.serving import create_app, serving


def load(url: str, body: bytes, clients: int, requests: int) -> dict:
    def client(_):
        latencies = []
        with httpx.Client(timeout=120) as session:
            for _ in range(requests):
                start = time.perf_counter()
                response = session.post(f"{url}/explain", content=body, headers={"Accept": "application/json"})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.concatenate(list(pool.map(client, range(clients)))) * 1000
    elapsed = time.perf_counter() - start
    return {"requests/s": len(latencies) / elapsed, "p50 ms": np.percentile(latencies, 50),
            "p99 ms": np.percentile(latencies, 99)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="Per client.")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    body = args.image.read_bytes()
    print(f"{args.clients} clients x {args.requests} requests, POST /explain, {args.model.name}")
    print(f"{'configuration':<32}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for label, max_batch in [(f"micro-batching (max {args.max_batch})", args.max_batch), ("no batching (max 1)", 1)]:
        app = create_app(args.model, provider="cpu", max_batch=max_batch, max_wait_ms=args.max_wait_ms,
                         queue_size=4 * args.clients)
        with serving(app) as url:
            load(url, body, args.clients, 2)  # warm-up
            result = load(url, body, args.clients, args.requests)
        print(f"{label:<32}{result['requests/s']:>12.1f}{result['p50 ms']:>10.1f}{result['p99 ms']:>10.1f}")


if __name__ == "__main__":
    main()
