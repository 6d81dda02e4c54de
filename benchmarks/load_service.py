"""Classify throughput with and without micro-batching: 16 concurrent clients on loopback.

    python benchmarks/load_service.py --cache /work/data/fmnist-gpu-cache --head fm=HEAD_DIR \
        --images /work/data/fmnist/test --clients 16 --requests 480 --time-limit 90 --rounds 2

Starts ``featcache serve`` on 127.0.0.1 (a free port) once per setting: micro-batching on and
off, each with one forward pass at a time on all cores' torch threads (``--model-workers 1``)
and with one single-threaded pass per core (the CPU default); ``--rounds`` repeats the four,
alternating, and the median counts. Each run sends at most ``--requests`` classify requests
(real images) over ``--clients`` concurrent keep-alive connections (a lean asyncio client),
stopping early at ``--time-limit`` seconds, and records the CPU time per request of the server
and of the load generator. HEAD_DIR: a ``featcache train`` bundle (the default logreg head).
Writes benchmarks/results/service_load.json (``python benchmarks/render.py`` then rewrites
BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from record import RESULTS, save
from served import cpu_seconds, http_post, metric, send, serving

from featcache.runtime import available_cpus


def classify_request(port: int, image: bytes, head: str) -> bytes:
    """A complete multipart POST /v1/classify, encoded once so the client spends no CPU on it."""
    b = "featcache-load-boundary"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="head"\r\n\r\n{head}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{b}--\r\n".encode()
    return http_post(port, "/v1/classify", body, f"multipart/form-data; boundary={b}")


def run_mode(a, batching: bool, workers: int, images: list[bytes], head: str) -> dict:
    args = ["--cache", a.cache, "--head", a.head, "--device", "cpu", "--batching", "on" if batching else "off",
            "--model-workers", str(workers), "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)]
    with serving(*args) as (url, _, pid):
        port = int(url.rsplit(":", 1)[1])
        requests = [classify_request(port, data, head) for data in images]
        asyncio.run(send(port, requests, a.clients, a.clients, 60))  # warm-up round, not counted
        before = httpx.get(url + "/metrics").text
        cpu0 = cpu_seconds(pid), sum(os.times()[:2])
        start = time.perf_counter()
        replies = asyncio.run(send(port, requests, a.clients, a.requests, a.time_limit))
        lat = [t for t, _, _ in replies]
        statuses = {c: sum(1 for _, s, _ in replies if s == c) for c in {s for _, s, _ in replies}}
        elapsed = time.perf_counter() - start
        server_cpu, client_cpu = cpu_seconds(pid) - cpu0[0], sum(os.times()[:2]) - cpu0[1]
        after = httpx.get(url + "/metrics").text
        n_fwd = metric(after, "featcache_batch_size_count") - metric(before, "featcache_batch_size_count")
        n_img = metric(after, "featcache_batch_size_sum") - metric(before, "featcache_batch_size_sum")
        ok = statuses.get(200, 0)
        return {"batching": batching, "workers": workers, "requests": len(lat), "ok": ok, "statuses": statuses,
                "seconds": round(elapsed, 2), "throughput_rps": round(ok / elapsed, 2),
                "latency_ms": {"p50": round(float(np.percentile(lat, 50)) * 1000, 1),
                               "p90": round(float(np.percentile(lat, 90)) * 1000, 1)},
                "mean_batch": round(n_img / n_fwd, 2) if n_fwd else None,
                # CPU time per request: where the 2 cores go (the load generator shares them)
                "server_cpu_ms_per_request": round(server_cpu / max(1, len(lat)) * 1000, 1),
                "client_cpu_ms_per_request": round(client_cpu / max(1, len(lat)) * 1000, 1)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the upper middle one of an even count), with every round's figure."""
    ranked = sorted(runs, key=lambda r: r["throughput_rps"])
    return {**ranked[len(ranked) // 2], "rounds_rps": [r["throughput_rps"] for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--head", required=True, help="NAME=HEAD_DIR")
    p.add_argument("--images", required=True, help="folder of real images (recursively, first 256)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=320)
    p.add_argument("--time-limit", type=float, default=90.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args()
    files = sorted(f for f in Path(a.images).rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg"))[:256]
    images = [f.read_bytes() for f in files]
    head = a.head.split("=", 1)[0]
    workers = sorted({1, available_cpus()})  # one pass at a time, and one pass per core
    settings = [(w, b) for w in workers for b in (True, False)]
    runs: dict[tuple[int, bool], list[dict]] = {s: [] for s in settings}
    for _ in range(a.rounds):
        for w, b in settings:
            runs[(w, b)].append(run_mode(a, b, w, images, head))
            print(f"workers {w} batching {b}: {runs[(w, b)][-1]['throughput_rps']} req/s", flush=True)
    configs = [median_run(runs[s]) for s in settings]
    by = {(c["workers"], c["batching"]): c for c in configs}
    ratios = {str(w): round(by[(w, True)]["throughput_rps"] / by[(w, False)]["throughput_rps"], 2)
              for w in workers}
    r = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
         "clients": a.clients, "images": f"{len(images)} files from {a.images}", "cpus": available_cpus(),
         "configs": configs, "ratio_on_off_by_workers": ratios,
         "best": max(configs, key=lambda c: c["throughput_rps"]),
         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save(r, RESULTS / "service_load.json")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
