"""Load on the explanation server over loopback: throughput and p50/p99 latency of POST /explain
with micro-batching and without it (--max-batch 1), same model, same clients, one run; with --rounds N
the two configurations take turns N times (in reverse order every other round), so that drift of the machine
falls on both alike.

    python benchmarks/serve_load.py MODEL.onnx IMAGE --clients 16 --requests 20 --rounds 3 --record

--record writes benchmarks/results/serve-load.md and serve-load.json (the figures, the command, the machine
and its load).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
from provenance import begin, describe, end, write

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
    return {"requests/s": round(len(latencies) / elapsed, 1), "p50 ms": round(float(np.percentile(latencies, 50)), 1),
            "p99 ms": round(float(np.percentile(latencies, 99)), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="Per client.")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1, help="Times the two configurations take turns.")
    parser.add_argument("--record", action="store_true", help="Write benchmarks/results/serve-load.md and .json.")
    args = parser.parse_args()
    run = begin()
    body = args.image.read_bytes()
    print(f"{args.clients} clients x {args.requests} requests, POST /explain, {args.model.name}")
    print(f"{'round':<7}{'configuration':<32}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    rows = []
    configurations = [(f"micro-batching (max {args.max_batch})", args.max_batch), ("no batching (max 1)", 1)]
    for round_ in range(1, args.rounds + 1):
        for label, max_batch in configurations[:: 1 if round_ % 2 else -1]:  # ABBA: neither always goes first
            app = create_app(args.model, provider="cpu", max_batch=max_batch, max_wait_ms=args.max_wait_ms,
                             queue_size=4 * args.clients)
            with serving(app) as url:
                load(url, body, args.clients, 2)  # warm-up
                result = load(url, body, args.clients, args.requests)
            rows.append({"round": round_, "configuration": label, **result})
            print(f"{round_:<7}{label:<32}{result['requests/s']:>12.1f}{result['p50 ms']:>10.1f}"
                  f"{result['p99 ms']:>10.1f}", flush=True)
    if args.record:
        record(end(run), args, body, rows)


def record(run: dict, args, body: bytes, rows: list[dict]) -> None:
    height, width = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
    image = f"{args.image.name} ({width} x {height}, {len(body) / 2**10:.0f} KiB)"
    model = f"{args.model.name} ({args.model.stat().st_size / 2**20:.1f} MiB)"
    lines = ["# Load on `onnxcam serve`'s app (benchmarks/serve_load.py)", "", *describe(run), "",
             f"Model {model}, CPU; {args.clients} clients x {args.requests} POST /explain each (after 2 each of "
             f"warm-up) with {image}, JSON answers; server and clients in one process on 127.0.0.1; "
             f"max wait {args.max_wait_ms} ms; {args.rounds} round(s), the configurations taking turns (the order "
             "reversed every other round).", "",
             "| round | configuration | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['configuration']} | {r['requests/s']:.1f} | {r['p50 ms']:.1f} | {r['p99 ms']:.1f} |"
              for r in rows]
    lines += ["", "| configuration | requests/s (range) | p50 ms (range) | p99 ms (range) |", "|---|---|---|---|"]
    for label in dict.fromkeys(r["configuration"] for r in rows):
        mine = [r for r in rows if r["configuration"] == label]
        spans = [f"{min(r[key] for r in mine):.1f}-{max(r[key] for r in mine):.1f}"
                 for key in ("requests/s", "p50 ms", "p99 ms")]
        lines.append(f"| {label} | {' | '.join(spans)} |")
    write("serve-load", "\n".join(lines), {"run": run, "model": model, "image": image, "clients": args.clients,
                                           "requests per client": args.requests, "rows": rows})


if __name__ == "__main__":
    main()
