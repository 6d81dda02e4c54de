"""Ensembles across backbones (issue 15): held-out accuracy of each single backbone vs their ensemble.

    python benchmarks/bench_ensemble.py \
        --set tux bench-data/ens/tux/cache \
        --set fmnist bench-data/ens/fmnist/cache bench-data/ens/fmnist/test

Each ``--set NAME CACHE [TEST_SOURCE]`` trains, through ``featcache.classify.train`` (what
``featcache train --fingerprint A B ...`` runs), one head kind on every backbone of the cache
alone and as an ensemble over all of them, on the same rows (the images every backbone holds)
and the same evaluation: the rows in TEST_SOURCE (a folder or CSV) held out, or without one
``--cv`` folds (every row held out once; small sets). The ensemble's weights come from
validation folds inside its training rows only. Writes benchmarks/results/ensemble.json.

A set named ``fmnist-full`` (the 60,000 train images cached with several backbones, the
10,000 test images as TEST_SOURCE) is what render.py checks the >= 91.5 % target on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from record import RESULTS, save

from featcache.classify.bundle import library_versions
from featcache.classify.train import TrainConfig, train
from featcache.extract.runtimes import cpu_model
from featcache.runtime import available_cpus
from featcache.store.cache import FeatureCache


def measure(name: str, cache: str, test_source: str | None, head: str, cv: int, tap: str) -> dict:
    """One set: every backbone alone and the ensemble over all of them, on one split."""
    fps = FeatureCache(cache).fingerprints()
    cfg = TrainConfig(cache=cache, out=None, fingerprint=fps, taps=[tap], heads=[head],
                      cv=None if test_source else cv, test_source=test_source)
    t = time.perf_counter()
    summary, _ = train(cfg)
    seconds = time.perf_counter() - t
    rows = summary["results"]
    ens = next(r for r in rows if "weights" in r)
    singles = [{"backbone": r["backbone"], "fingerprint": r["fingerprint"], "accuracy": r["accuracy"],
                "macro_f1": r["macro_f1"]} for r in rows if "weights" not in r]
    best = max(singles, key=lambda r: r["accuracy"])
    chosen = ens["validation"].get(ens["choice"], {})
    return {
        "name": name, "cache": cache, "evaluation": summary["evaluation"], "head": head, "tap": tap,
        "rows": summary["labelled_rows"], "classes": summary["classes"],
        "left_out": {m["backbone"]: m["dropped_rows"] for m in summary["members"]},
        "singles": singles,
        "ensemble": {"accuracy": ens["accuracy"], "macro_f1": ens["macro_f1"], "weights": ens["weights"],
                     "choice": ens["choice"], "validation_accuracy": chosen.get("accuracy")},
        "best_single": best,
        "gain_over_best_single": ens["accuracy"] - best["accuracy"],
        "seconds": round(seconds, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", nargs="+", action="append", required=True, metavar="NAME CACHE [TEST_SOURCE]",
                   help="a cached set with several backbones; repeat for several sets")
    p.add_argument("--head", default="logreg", help="the head kind of every single backbone and ensemble member")
    p.add_argument("--cv", type=int, default=5, help="folds, for a set given without a test source")
    p.add_argument("--tap", default="final")
    p.add_argument("--out", default=str(RESULTS / "ensemble.json"))
    p.add_argument("--keep-others", action="store_true",
                   help="keep the sets of --out that this run does not measure (each keeps its own command)")
    a = p.parse_args()
    if any(len(s) not in (2, 3) for s in a.set):
        p.error("--set takes NAME CACHE [TEST_SOURCE]")
    command = " ".join(["python", *sys.argv])
    sets = []
    for name, cache, *test in a.set:
        r = {**measure(name, cache, test[0] if test else None, a.head, a.cv, a.tap), "command": command}
        sets.append(r)
        line = ", ".join(f"{s['backbone']} {s['accuracy']:.4f}" for s in r["singles"])
        print(f"{name}: {line}; ensemble {r['ensemble']['accuracy']:.4f} (weights {r['ensemble']['weights']}); "
              f"gain over best single {r['gain_over_best_single']:+.4f} ({r['seconds']} s)", flush=True)
    if a.keep_others and Path(a.out).is_file():
        before = json.loads(Path(a.out).read_text())
        measured = {r["name"] for r in sets}
        sets = [{**r, "command": r.get("command", before["command"])} for r in before["sets"]
                if r["name"] not in measured] + sets
    doc = {"command": command, "sets": sets,
           "machine": {"cpu": cpu_model(), "cpus": available_cpus()},
           "versions": library_versions()}
    print(f"wrote {save(doc, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
