"""Head accuracy on frozen features: Fashion-MNIST test set, and Tux Paint 5-fold CV per backbone.

    python benchmarks/accuracy_heads.py              # full: /work/data caches (extracts what is missing)
    python benchmarks/accuracy_heads.py --reduced    # CI-sized: small Fashion-MNIST subset, Tux Paint on Lite0
    python benchmarks/accuracy_heads.py --fmnist-cache /work/data/fmnist-gpu-cache   # see assemble_fmnist_cache.py

Full mode trains every head on the 60,000 Fashion-MNIST training images of the cache
(default backbone, final tap), scores the 10,000 test images (targets: best head >= 0.897),
and runs 5-fold CV of every head on Tux Paint (7 classes) for each bundled backbone
(target: best >= 0.88). Writes OUT/accuracy_heads[_reduced].json plus a report per dataset
(OUT/*_report*.json; the HTML beside it, with confusion matrix, calibration and mistakes, is not
committed). OUT: benchmarks/results, or benchmarks/results/ci with --reduced (what CI runs; git
ignores it); ``--out benchmarks/results`` records a reduced run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from record import CI_RESULTS, RESULTS, rewrite, save
from targets import FMNIST_ACCURACY, REDUCED_FLOOR, TUX_CV_ACCURACY

from featcache.classify.report import write_report
from featcache.classify.train import TrainConfig, train
from featcache.datasets import write_fashion_mnist, write_tuxpaint_csv
from featcache.extract.pipeline import ExtractConfig, extract
from featcache.extract.registry import BUILTIN, DEFAULT_BACKBONE
from featcache.store.cache import FeatureCache

HEADS = ["logreg", "linear-svm", "knn", "mlp"]


def _fingerprint_of(cache: str, backbone: str) -> str | None:
    try:
        info = FeatureCache(cache).info()
    except Exception:  # noqa: BLE001 - no cache yet
        return None
    hits = [f["fingerprint"] for f in info["fingerprints"] if f["backbone"] == backbone and f["ok"] > 0]
    return hits[0] if hits else None


def fashion(cache: str, test_dir: str, out: Path, tag: str) -> dict:
    fp = _fingerprint_of(cache, DEFAULT_BACKBONE)
    t = time.perf_counter()
    summary, evals = train(TrainConfig(cache, None, fingerprint=fp, heads=HEADS, test_source=test_dir))
    write_report(out / f"fmnist_report{tag}.html", summary, evals, FeatureCache(cache))
    rewrite(out / f"fmnist_report{tag}.json")
    best = max(summary["results"], key=lambda r: r["accuracy"])
    res = {"train_rows": summary["evaluation"]["train_rows"], "test_rows": summary["evaluation"]["test_rows"],
           "heads": {r["head"]: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "train_seconds": r["train_seconds"]}
                     for r in summary["results"]},
           "best": best["head"], "best_accuracy": best["accuracy"], "target": FMNIST_ACCURACY,
           "met": best["accuracy"] >= FMNIST_ACCURACY, "seconds": time.perf_counter() - t,
           "report": f"fmnist_report{tag}.html"}
    print(json.dumps({"fashion_mnist": res}, indent=1), flush=True)
    return res


def tux(cache: str, csv: str, backbones: list[str], out: Path, tag: str) -> dict:
    res = {}
    for b in backbones:
        fp = _fingerprint_of(cache, b)
        if fp is None:
            extract(ExtractConfig(csv, cache, backbone=b, progress=False))
            fp = _fingerprint_of(cache, b)
        summary, evals = train(TrainConfig(cache, None, fingerprint=fp, heads=HEADS, cv=5))
        write_report(out / f"tux_report_{b}{tag}.html", summary, evals, FeatureCache(cache))
        rewrite(out / f"tux_report_{b}{tag}.json")
        res[b] = {r["head"]: {"cv_accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                              "fold_std": r.get("cv_accuracy_std")} for r in summary["results"]}
        print(b, json.dumps(res[b]), flush=True)
    best = max(((b, h, v["cv_accuracy"]) for b, hs in res.items() for h, v in hs.items()), key=lambda x: x[2])
    return {"backbones": res, "best": {"backbone": best[0], "head": best[1], "cv_accuracy": best[2]},
            "target": TUX_CV_ACCURACY, "met": best[2] >= TUX_CV_ACCURACY}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="CI size: 1000 train + 300 test Fashion-MNIST, Tux on Lite0")
    p.add_argument("--work", help="where data and caches live or are made (default /work/data; "
                                  "--reduced: bench-data/heads-reduced)")
    p.add_argument("--fmnist-cache", help="default: WORK/fmnist-cache (full) or WORK/fmnist-small/cache (reduced)")
    p.add_argument("--skip-fmnist", action="store_true")
    p.add_argument("--skip-tux", action="store_true")
    p.add_argument("--out", help=f"results folder (default {RESULTS.relative_to(RESULTS.parents[1])}; "
                                 f"--reduced: {CI_RESULTS.relative_to(RESULTS.parents[1])})")
    a = p.parse_args()
    t0 = time.perf_counter()
    work = Path(a.work or ("bench-data/heads-reduced" if a.reduced else "/work/data"))
    out_dir = Path(a.out) if a.out else CI_RESULTS if a.reduced else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "_reduced" if a.reduced else ""
    doc: dict = {"mode": "reduced" if a.reduced else "full"}
    if not a.skip_fmnist:
        if a.reduced:
            root = work / "fmnist-small"
            cache = a.fmnist_cache or str(root / "cache")
            for split, n in (("train", 1000), ("test", 300)):
                folder = write_fashion_mnist(root, split, n)
                extract(ExtractConfig(str(folder), cache, progress=False))
            test_dir = str(root / "test")
        else:
            cache, test_dir = a.fmnist_cache or str(work / "fmnist-cache"), str(work / "fmnist" / "test")
        doc["fashion_mnist"] = fashion(cache, test_dir, out_dir, tag)
    if not a.skip_tux:
        csv = write_tuxpaint_csv(work / "tux" / "tuxpaint.csv")
        backbones = [DEFAULT_BACKBONE] if a.reduced else list(BUILTIN)
        doc["tuxpaint"] = tux(str(work / "tux" / "cache"), str(csv), backbones, out_dir, tag)
    doc["seconds"] = round(time.perf_counter() - t0, 1)  # the whole run, extraction of missing rows included
    print(f"wrote {save(doc, out_dir / f'accuracy_heads{tag}.json')}")
    if a.reduced:
        best = [doc["fashion_mnist"]["best_accuracy"]] if "fashion_mnist" in doc else []
        best += [doc["tuxpaint"]["best"]["cv_accuracy"]] if "tuxpaint" in doc else []
        ok = all(b >= REDUCED_FLOOR for b in best)
        print(f"reduced: best accuracies {best}, floor {REDUCED_FLOOR}: {'ok' if ok else 'BELOW FLOOR'}")
        return 0 if ok else 1
    return 0 if all(doc[k]["met"] for k in ("fashion_mnist", "tuxpaint") if k in doc) else 1


if __name__ == "__main__":
    sys.exit(main())
