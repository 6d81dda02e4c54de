"""The Ray engine against the local engine, side by side, and what one writer can commit.

One run, the same 1,000 JPEGs of 500x375 (made from the 20 real ImageNet photos, as in
bench_extract.py), default Lite0, fresh caches:

  end to end (the target)  the commands users run, each a new process, alternated twice:
                  featcache extract SRC --cache C                     (local engine)
                  featcache extract SRC --cache C --engine ray --ray-address HOST:PORT
                  against a cluster already running (`ray start --head`, its start timed apart:
                  a cluster is a long-lived service; loopback only, so without token auth)
  in one process  Extraction(...).run() in this process, whose model libraries are already
                  imported (the Python API called twice): local, ray on a cluster this process
                  started, ray starting (and stopping) its own cluster, local again

and the writer's capacity with a stand-in embedder (random 1280-d float32 vectors, no model):

  writer alone    CacheWriter.register + add + commit, in this process
  through Ray     a Ray Data stage of stand-in actors -> iter_batches -> the same writer (what the
                  driver commits when the cluster delivers faster than it can write)

    python benchmarks/bench_ray.py [--images 1000] [--writer-rows 50000]
    python benchmarks/bench_ray.py --end-to-end-only [--tree DIR]   # the commands only; DIR: another
        featcache checkout (e.g. `git worktree add DIR COMMIT`) run by the commands and the cluster's
        workers instead of this one, for a before/after side by side (printed, not saved)

Writes benchmarks/results/ray.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_jpegs  # noqa: E402
from record import RESULTS, save  # noqa: E402

from featcache.extract.pipeline import ExtractConfig, Extraction  # noqa: E402
from featcache.extract.sources import Item  # noqa: E402
from featcache.extract.writer import CacheWriter  # noqa: E402
from featcache.runtime import available_cpus  # noqa: E402
from featcache.store.cache import FeatureCache  # noqa: E402

DIM = 1280
# The cluster of the end-to-end runs and its drivers: loopback only, so without the token auth that Ray 2.59+
# asks for by default (and that an in-process ray.init leaves switched on in os.environ).
LOOPBACK_ENV = {"RAY_AUTH_MODE": "disabled"}


def extract(src: Path, cache: Path, **kw) -> dict:
    t = time.perf_counter()
    s = Extraction(ExtractConfig(str(src), str(cache), progress=False, **kw)).run()
    wall = time.perf_counter() - t
    assert s["extracted"] == s["files"], s
    return {"wall_s": round(wall, 2), "images_per_s": round(s["extracted"] / wall, 2), "timings": s["timings"],
            "fingerprint": s["fingerprint"]}


def cli_extract(src: Path, cache: Path, *flags: str, env: dict | None = None) -> dict:
    """``featcache extract`` as a user runs it: a new process, timed from start to exit."""
    env = env or {**os.environ, **LOOPBACK_ENV}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", str(src), "--cache", str(cache), "--json",
                          "-q", *flags], capture_output=True, text=True, timeout=900, env=env, cwd=env.get("PYTHONPATH"))
    wall = time.perf_counter() - t
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)
    assert s["extracted"] == s["files"], s
    return {"wall_s": round(wall, 2), "images_per_s": round(s["extracted"] / wall, 2), "fingerprint": s["fingerprint"]}


@contextlib.contextmanager
def ray_start(env: dict, port: int = 6391):
    """A one-machine cluster as `ray start --head` runs one (other processes), on loopback; stopped after."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    t = time.perf_counter()
    subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", str(available_cpus()),
                    "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                    "--object-store-memory", str(512 * 2**20)], env=env, check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}", round(time.perf_counter() - t, 2)
    finally:
        subprocess.run([ray_bin, "stop"], env=env, capture_output=True)


def end_to_end(src: Path, work: Path, tree: Path | None = None) -> dict:
    """local and ray commands alternated twice against one running cluster; the ratio of mean images/s."""
    runs: dict = {"local": [], "ray": []}
    env = {**os.environ, **LOOPBACK_ENV}
    if tree is not None:  # the commands and the cluster's workers import featcache from there
        env["PYTHONPATH"] = str(tree)
    with ray_start(env) as (address, started):
        for i in range(2):
            runs["local"].append(cli_extract(src, work / f"cli-local{i}", env=env))
            runs["ray"].append(cli_extract(src, work / f"cli-ray{i}", "--engine", "ray", "--ray-address", address,
                                           env=env))
    mean = {k: sum(r["images_per_s"] for r in v) / len(v) for k, v in runs.items()}
    assert {r["fingerprint"] for v in runs.values() for r in v} == {runs["local"][0]["fingerprint"]}
    return {**runs, "cluster_start_s": started, "ray_vs_local": round(mean["ray"] / mean["local"], 3)}


def _standin_writer(root: Path, commit_every: int) -> tuple[FeatureCache, CacheWriter]:
    cache = FeatureCache(root, create=True)
    canon = {"arch": "stand-in", "dim": DIM}
    group = cache.feature_group("standin", canon, {"name": "stand-in"}, {"final": DIM})
    return cache, CacheWriter(cache, {"standin": group}, commit_every)


FEED_BATCH = 256  # rows per register_many / add_many call in the "batch" feed (an engine's batch)


def writer_alone(root: Path, rows: int, commit_every: int, feed: str = "batch") -> dict:
    """Committed rows/s of the writer fed from memory: the ceiling of one driver.

    ``feed``: "batch" hands rows over as an engine's batches (``register_many`` + ``add_many``, 256 rows a
    call); "row" one call per row (``register`` + ``add``), as engines did before the batch calls existed.
    """
    _, w = _standin_writer(root, commit_every)
    vecs = np.random.default_rng(0).standard_normal((1024, DIM)).astype(np.float32)
    items = [Item(Path(f"/data/c{i % 10}/img{i:08d}.jpg"), f"c{i % 10}/img{i:08d}.jpg", f"c{i % 10}")
             for i in range(rows)]
    shas = [f"{i:064x}" for i in range(rows)]
    gc.collect()  # the full collection that making these items calls for is the setup's, not the writer's
    t = time.perf_counter()
    if feed == "row":
        for i in range(rows):
            _, row = w.register(items[i], shas[i])
            w.add(row, {"standin": {"final": vecs[i % 1024]}})
    elif feed == "batch":
        for i in range(0, rows, FEED_BATCH):
            got = w.register_many(items[i : i + FEED_BATCH], shas[i : i + FEED_BATCH])
            w.add_many([row for _, row in got], [{"standin": {"final": vecs[j % 1024]}} for j in range(i, i + len(got))])
    else:
        raise ValueError(f"feed must be 'row' or 'batch', not {feed!r}")
    w.commit()
    dt = time.perf_counter() - t
    return {"rows": rows, "commit_every": commit_every, "feed": feed, "commits": getattr(w, "commits", None),
            "seconds": round(dt, 3),
            "rows_per_s": round(rows / dt), "MB_per_s": round(rows * DIM * 4 / dt / 1e6, 1)}


class StandIn:
    """A stand-in embedding actor: a vector per row, no model."""

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        rng = np.random.default_rng(int(batch["id"][0]))
        return {"id": batch["id"], "vector": rng.standard_normal((n, DIM)).astype(np.float32)}


def writer_through_ray(root: Path, rows: int, commit_every: int) -> dict:
    """Committed rows/s when stand-in actors deliver rows as fast as Ray Data can stream them."""
    import ray
    from ray.data import ActorPoolStrategy

    _, w = _standin_writer(root, commit_every)
    ds = ray.data.range(rows, override_num_blocks=max(1, rows // 256))
    ds = ds.map_batches(StandIn, batch_size=256, batch_format="numpy", num_cpus=0.5, compute=ActorPoolStrategy(size=2))
    t = time.perf_counter()
    for b in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        ids = b["id"].tolist()
        got = w.register_many([Item(f"/data/img{i:08d}.jpg", f"img{i:08d}.jpg", "") for i in ids],
                              [f"{i:064x}" for i in ids])
        w.add_many([row for _, row in got], [{"standin": {"final": v}} for v in b["vector"]])
    w.commit()
    dt = time.perf_counter() - t
    return {"rows": rows, "commit_every": commit_every, "commits": w.commits, "seconds": round(dt, 3),
            "rows_per_s": round(rows / dt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--writer-rows", type=int, default=50000)
    ap.add_argument("--out", default=str(RESULTS / "ray.json"))
    ap.add_argument("--end-to-end-only", action="store_true")
    ap.add_argument("--tree", type=Path, help="with --end-to-end-only: the featcache checkout the commands run")
    args = ap.parse_args()
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0")
    if args.end_to_end_only:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            make_jpegs(Path(tmp) / "jpegs", args.images)
            cli_extract(Path(tmp) / "jpegs", Path(tmp) / "warm")  # untimed: page cache and model cache warm
            print(json.dumps(end_to_end(Path(tmp) / "jpegs", Path(tmp), args.tree and args.tree.resolve()), indent=1))
        return
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        src = work / "jpegs"
        make_jpegs(src, args.images)
        res: dict = {"machine": {"cpu": platform.processor() or _cpu_model(), "cpus": available_cpus(),
                                 "ray": ray.__version__}, "images": args.images}
        # untimed: the files into the page cache and auto's model prepared once (an int8 model is quantised
        # on these files and kept in the model cache), so every timed run below starts equal
        res["warm_up"] = extract(src, work / "warm")
        res["local"] = extract(src, work / "local")
        t = time.perf_counter()
        ray.init(num_cpus=available_cpus(), object_store_memory=512 * 2**20, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
        res["cluster_start_s"] = round(time.perf_counter() - t, 2)
        res["ray_running"] = extract(src, work / "ray-running", engine="ray")
        res["writer_through_ray"] = writer_through_ray(work / "w-ray", args.writer_rows, 512)
        ray.shutdown()
        res["ray_own_cluster"] = extract(src, work / "ray-own", engine="ray")
        res["local_again"] = extract(src, work / "local2")
        res["writer_alone"] = [writer_alone(work / f"w-{c}-{feed}", args.writer_rows, c, feed)
                               for c in (512, 4096) for feed in ("batch", "row")]
        res["end_to_end"] = end_to_end(src, work)
        local = (res["local"]["images_per_s"] + res["local_again"]["images_per_s"]) / 2
        res["ratios"] = {"end_to_end": res["end_to_end"]["ray_vs_local"],
                         "ray_running_vs_local": round(res["ray_running"]["images_per_s"] / local, 3),
                         "ray_own_cluster_vs_local": round(res["ray_own_cluster"]["images_per_s"] / local, 3)}
        res["min_cosine_ray_vs_local"] = min(min_cosine(work / "local", work / ray) for ray in ("ray-running", "cli-ray0"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save(res, args.out)
    print(markdown(res))


def min_cosine(a: Path, b: Path) -> float:
    """The smallest cosine between the two caches' vectors of the same contents (the row sets must be equal)."""
    fa, fb = FeatureCache(a).read(), FeatureCache(b).read()
    assert sorted(fa.sha256.tolist()) == sorted(fb.sha256.tolist())
    va, vb = (f.vectors[np.argsort(f.sha256)] for f in (fa, fb))
    return float(((va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)).min())


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def markdown(r: dict) -> str:
    rows = [("local engine", r["local"]), ("ray, cluster already running", r["ray_running"]),
            ("ray, starting its own cluster", r["ray_own_cluster"]), ("local engine again", r["local_again"])]
    e = r["end_to_end"]
    lines = [f"{r['images']} JPEGs, {r['machine']['cpu']}, {r['machine']['cpus']} CPUs, Ray {r['machine']['ray']}",
             "", "| command (new process each) | wall s | images/s |", "|---|---|---|"]
    lines += [f"| featcache extract --engine {k} ({i + 1}) | {x['wall_s']} | {x['images_per_s']} |"
              for i in range(len(e["local"])) for k, x in (("local", e["local"][i]), ("ray", e["ray"][i]))]
    lines += ["", f"end to end: ray/local {e['ray_vs_local']}x", "", "| in one process | wall s | images/s |", "|---|---|---|"]
    lines += [f"| {name} | {x['wall_s']} | {x['images_per_s']} |" for name, x in rows]
    lines += ["", f"cluster start (not in 'already running'): {r['cluster_start_s']} s; ratios: {r['ratios']}; "
              f"min cosine ray vs local {r['min_cosine_ray_vs_local']:.7f}", "",
              "| writer (1280-d float32 rows) | commit every | rows/s |", "|---|---|---|"]
    lines += [f"| alone, {w.get('feed', 'row')} calls | {w['commit_every']} | {w['rows_per_s']:,} ({w['MB_per_s']} MB/s) |"
              for w in r["writer_alone"]]
    w = r["writer_through_ray"]
    lines.append(f"| through Ray Data (stand-in actors) | {w['commit_every']} | {w['rows_per_s']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
