"""Search benchmark on 100,000 real Fashion-MNIST vectors: exact vs approximate, and through the service.

Vectors (EfficientNet-Lite0 ``final`` tap, 1280-d, fingerprint d95b46f534bdda5179bd):
the 70,000 Fashion-MNIST images (60k train + 10k test) plus 30,000 horizontal mirrors of
train images 0..29,999, embedded by ``benchmarks/gpu_mirror_vectors.py`` through
featcache's own decode + Embedder path (fp32, TF32 off; stored as float16 for transfer).

    python benchmarks/bench_search.py --vectors /work/data/fmnist-gpu-vectors \
        --cache /work/data/fmnist-cache --index bench-data/fmnist100k-index

Writes benchmarks/results/search.json (``python benchmarks/render.py`` then rewrites
BENCHMARKS.md). The service part starts ``featcache serve`` on 127.0.0.1 (a free port),
sends bounded sequential search-by-key requests, and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import faiss
import httpx
import numpy as np
from assemble_fmnist_cache import parts
from PIL import Image
from record import RESULTS, save
from served import http_post, metric, send, serving
from targets import SEARCH_P50_MS, SEARCH_RECALL_AT_10, SERVICE_SEARCH_P50_MS

from featcache.datasets import FASHION_CLASSES, fashion_mnist
from featcache.runtime import available_cpus
from featcache.store.cache import FeatureCache
from featcache.store.index import IndexParams, VectorIndex, normalise

ROOT = Path(__file__).resolve().parent.parent


def _png_sha(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def load_vectors(folder: Path) -> tuple[np.ndarray, list[str], list[str], dict]:
    """100k vectors with keys (as the extractor names them) and sha256 of the PNG bytes."""
    vecs, keys, shas = [], [], []
    for split in ("train", "test"):
        images, labels = fashion_mnist(split)
        vecs.append(parts(folder, split, len(images)))
        keys += [f"{split}/{FASHION_CLASSES[y]}/{split}-{i:05d}.png" for i, y in enumerate(labels)]
        shas += [_png_sha(im) for im in images]
    images, labels = fashion_mnist("train")
    m = parts(folder, "mirror")
    vecs.append(m)
    keys += [f"mirror/{FASHION_CLASSES[labels[i]]}/train-{i:05d}-mirror.png" for i in range(len(m))]
    shas += [_png_sha(np.ascontiguousarray(images[i, :, ::-1])) for i in range(len(m))]
    info = {"train": 60000, "test": 10000, "mirrored_train": len(m)}
    return np.concatenate(vecs), keys, shas, info


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)) * 1000, 3)


def single_query_latency(search, queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        t = time.perf_counter()
        search(q[None])
        out.append(time.perf_counter() - t)
    return out


def bench_index(x: np.ndarray, keys, shas, fp: str, attrs: dict, out: Path, rebuild: bool, n_queries: int) -> dict:
    if rebuild or not (out / "manifest.json").is_file():
        faiss.omp_set_num_threads(available_cpus())
        vi = VectorIndex.build(x, np.arange(len(x)), keys, shas, fingerprint=fp, canon=attrs["fingerprint"],
                               backbone=attrs["backbone"], tap="final",
                               params=IndexParams(kind="auto", target_recall=SEARCH_RECALL_AT_10, eval_queries=1000),
                               source={"vectors": "Fashion-MNIST 70k + 30k mirrored train images (GPU-embedded)"})
        vi.save(out)
    vi = VectorIndex.load(out)
    faiss.omp_set_num_threads(1)
    xn = normalise(x)
    rng = np.random.default_rng(123)
    qi = rng.choice(len(xn), n_queries, replace=False)
    q = xn[qi]
    flat = faiss.IndexFlatIP(xn.shape[1])
    flat.add(xn)
    flat70 = faiss.IndexFlatIP(xn.shape[1])
    flat70.add(xn[:70000])
    exact_lat = single_query_latency(lambda v: flat.search(v, 11), q[:100])
    exact70_lat = single_query_latency(lambda v: flat70.search(v, 11), q[:100])
    approx_lat = single_query_latency(lambda v: vi.index.search(v, 11), q)
    # recall@10 of the index vs exact, each query's own vector excluded from both lists
    faiss.omp_set_num_threads(available_cpus())
    _, exact = flat.search(q, 11)
    _, found = vi.index.search(q, 11)
    hits = 0
    for e, f, s in zip(exact, found, qi, strict=True):
        hits += len(set([i for i in e if i != s][:10]) & set([i for i in f if i != s][:10]))
    m = vi.manifest
    return {
        "kind": m["kind"], "params": m["params"], "count": len(vi), "dim": m["dim"],
        "build_seconds": m["build_seconds"], "memory_bytes": m["memory_bytes"],
        "recall_at_10_manifest": m["recall_at_10"], "recall_note": m["recall_note"], "tuning": m.get("tuning"),
        "recall_at_10_bench": round(hits / (10 * len(qi)), 4), "bench_queries": int(len(qi)),
        "approx_single_query_ms": {"p50": pct(approx_lat, 50), "p90": pct(approx_lat, 90), "p99": pct(approx_lat, 99)},
        "exact_single_query_ms_100k": {"p50": pct(exact_lat, 50), "p90": pct(exact_lat, 90)},
        "exact_single_query_ms_70k": {"p50": pct(exact70_lat, 50), "p90": pct(exact70_lat, 90)},
        "threads": 1,
    }


def bench_service(cache: str, index: Path, keys: list[str], n: int, time_limit: float) -> dict:
    with serving("--cache", cache, "--index", str(index), "--device", "cpu") as (url, start_s, _):
        rng = np.random.default_rng(7)
        picks = [keys[i] for i in rng.choice(len(keys), n, replace=False)]
        port = int(url.rsplit(":", 1)[1])
        requests = [http_post(port, "/v1/search", urlencode({"key": key, "k": "10"}).encode(),
                              "application/x-www-form-urlencoded") for key in picks]
        asyncio.run(send(port, requests[:20], 1, 20, 60))  # warm-up
        replies = asyncio.run(send(port, requests[20:], 1, len(requests) - 20, time_limit))  # one at a time
        lat, server_ms = [], []
        for seconds, status, body in replies:
            r = json.loads(body)
            assert status == 200 and len(r["hits"]) == 10, body
            lat.append(seconds)
            server_ms.append(r["timings_ms"]["search"])
        metrics = httpx.get(url + "/metrics").text
        srv = {name: metric(metrics, f"featcache_request_seconds_{name}", 'route="/v1/search"')
               for name in ("sum", "count")}
        mean = round(1000 * srv["sum"] / srv["count"], 3) if srv["sum"] is not None and srv["count"] else None
        return {"server_request_ms_mean": mean,
                "requests": len(lat), "client_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99)},
                "server_search_stage_ms_p50": round(float(np.median(server_ms)), 3), "server_start_seconds": round(start_s, 1),
                "transport": "HTTP/1.1 keep-alive, lean asyncio client (benchmarks/served.py), loopback 127.0.0.1, form-encoded key + k=10"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vectors", default="/work/data/fmnist-gpu-vectors")
    p.add_argument("--cache", default="/work/data/fmnist-cache", help="cache of the same fingerprint the service serves")
    p.add_argument("--index", default=str(ROOT / "bench-data" / "fmnist100k-index"))
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--requests", type=int, default=520)
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--note", default="", help="how this run was made (recorded with the figures)")
    a = p.parse_args()
    x, keys, shas, info = load_vectors(Path(a.vectors))
    cache = FeatureCache(a.cache)
    fp = cache.resolve_fingerprint()
    attrs = cache.group_attrs(fp)
    feats = cache.read(fp)
    # GPU vectors vs the CPU-extracted cache, where the cache has the image
    pos = {k: i for i, k in enumerate(keys)}
    common = [(pos["train/" + k], j) for j, k in enumerate(feats.keys.tolist()) if "train/" + k in pos]
    common += [(pos["test/" + k], j) for j, k in enumerate(feats.keys.tolist()) if "test/" + k in pos]
    a_, b_ = normalise(x[[c[0] for c in common]]), normalise(feats.vectors[[c[1] for c in common]])
    cos = (a_ * b_).sum(1)
    index_res = bench_index(x, keys, shas, fp, attrs, Path(a.index), a.rebuild, a.queries)
    service_res = bench_service(a.cache, Path(a.index), keys, a.requests, a.time_limit)
    r = {
        "machine": f"{platform.machine()}, {available_cpus()} CPUs available, Python {platform.python_version()}, "
                   f"faiss {faiss.__version__}",
        "command": "python " + shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "fingerprint": fp, "vectors": {**info, "total": len(x)},
        "cache_rows": len(feats), "gpu_vs_cpu_compared": len(common),
        "gpu_vs_cpu_min_cosine": round(float(cos.min()), 7) if len(cos) else None,
        "index": index_res, "service": service_res,
        "targets": {"approx": index_res["approx_single_query_ms"]["p50"] <= SEARCH_P50_MS
                    and index_res["recall_at_10_bench"] >= SEARCH_RECALL_AT_10,
                    "service": service_res["client_ms"]["p50"] <= SERVICE_SEARCH_P50_MS},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": a.note, "loadavg_at_end": round(os.getloadavg()[0], 2),
    }
    save(r, RESULTS / "search.json")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(available_cpus()))
    main()
