"""Model-only throughput on CPU: intra-op threads vs passes side by side, at several batch sizes.

    python benchmarks/model_passes.py [--seconds 10] [--rounds 2]

Runs the frozen Lite0 graph (featcache's ``Embedder``, the service's path) on uint8 224x224
inputs as (a) one pass at a time on all cores' torch threads and (b) one single-threaded pass
per core in parallel, at batch 1, 4 and 8; rounds alternate the settings so drift hits each
alike. This is the evidence behind the service's CPU default (one pass per core, no batching).
Writes benchmarks/results/model_passes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch
from record import RESULTS, save

from featcache.extract.backbone import Backbone
from featcache.extract.embedder import Embedder
from featcache.extract.registry import DEFAULT_BACKBONE, resolve
from featcache.runtime import available_cpus


def throughput(backbone: Backbone, passes: int, threads: int, batch: int, seconds: float) -> dict:
    emb = Embedder(backbone, ["final"], "cpu", threads=threads)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    for _ in range(3):  # trace + freeze, then warm
        emb.embed(x)
    done = [0] * passes
    stop = time.perf_counter() + seconds

    def run(i: int) -> None:
        while time.perf_counter() < stop:
            emb.embed(x)
            done[i] += batch

    t0, c0 = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(passes)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    return {"img_per_s": round(sum(done) / wall, 1), "cores_busy": round((time.process_time() - c0) / wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    cpus = available_cpus()
    backbone = Backbone.load(resolve(DEFAULT_BACKBONE))
    settings = [(passes, threads, batch) for batch in (1, 4, 8) for passes, threads in ((1, cpus), (cpus, 1))]
    rows = {s: [] for s in settings}
    for _ in range(a.rounds):
        for s in settings:
            rows[s].append(throughput(backbone, *s, a.seconds))
            print(s, rows[s][-1], flush=True)
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "cpus": cpus,
           "backbone": DEFAULT_BACKBONE, "torch": torch.__version__,
           "settings": [{"passes": s[0], "threads_per_pass": s[1], "batch": s[2],
                         "img_per_s": [r["img_per_s"] for r in rows[s]],
                         "cores_busy": [r["cores_busy"] for r in rows[s]]} for s in settings],
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save(out, RESULTS / "model_passes.json")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
