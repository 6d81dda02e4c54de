"""Partial unfreeze on Fashion-MNIST: accuracy vs a frozen-feature head, and the cached-prefix speed-up.

    python benchmarks/bench_finetune.py [--train 60000] [--test 10000] [--epochs 8] [--unfreeze-from stage5]
    python benchmarks/bench_finetune.py --train 2000 --test 1000 --epochs 1 --speed-only   # the epoch ratio alone
    python benchmarks/bench_finetune.py --cache CACHE --test-source FMNIST/test --epochs 4   # an existing cache

1. Writes the first N train/test images as PNG folders, extracts them into a cache (or uses
   ``--cache``, which must hold the final tap of Fashion-MNIST train and test).
2. Epoch time with the cached prefix vs the same epoch recomputing the frozen layers, side by side.
3. Unless --speed-only: fine-tunes for --epochs and compares test accuracy with a logistic-
   regression head on the frozen final features of the same images.
Writes benchmarks/results/finetune_<cut>[_speed].json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from record import RESULTS, save

from featcache.classify.finetune import FinetuneConfig, Finetuner
from featcache.datasets import write_fashion_mnist
from featcache.extract.pipeline import ExtractConfig, extract


def epoch_seconds(ft: Finetuner, acts, paths, y, idx, recompute: bool) -> float:
    """One training epoch over ``idx``, the frozen prefix read from the cache or recomputed."""
    import torch

    _, prefix, suffix = ft.build(int(y.max()) + 1)
    ft.cfg.recompute_prefix = recompute
    opt = torch.optim.AdamW(suffix.parameters(), lr=1e-4)
    t = time.perf_counter()
    ft.train_epoch(prefix, suffix, opt, acts, paths, y, idx)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=60000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--unfreeze-from", default="stage5")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--cache", help="an existing cache of Fashion-MNIST train+test (skips writing and extracting)")
    p.add_argument("--test-source", help="with --cache: the test folder")
    p.add_argument("--speed-images", type=int, default=512, help="images in the side-by-side epoch timing")
    p.add_argument("--bn", choices=("train", "frozen"), default="train", help="BatchNorm in the unfrozen layers")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup at the cut, Beta(a, a)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--work", default=None)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="featcache-ft-"))
    if a.cache:
        cache, test_source = Path(a.cache), a.test_source
    else:
        folders = work / "fmnist"
        write_fashion_mnist(folders, "train", a.train)
        write_fashion_mnist(folders, "test", a.test)
        cache, test_source = work / "cache", str(folders / "test")
        for split in ("train", "test"):
            extract(ExtractConfig(str(folders / split), str(cache), progress=False))
    cfg = FinetuneConfig(cache=str(cache), out=str(work / "backbone"), unfreeze_from=a.unfreeze_from,
                         epochs=a.epochs, warmup_epochs=a.warmup_epochs, bn=a.bn, mixup=a.mixup,
                         label_smoothing=a.label_smoothing, test_source=test_source)
    ft = Finetuner(cfg)
    t = time.perf_counter()
    data, paths = ft.cached_prefix(ft.prefix_embedder())
    acts = data.X
    prefix_seconds = time.perf_counter() - t
    y = np.searchsorted(sorted(set(data.y.tolist())), data.y)
    idx = np.random.default_rng(0).permutation(len(y))[: a.speed_images]
    epoch_seconds(ft, acts, paths, y, idx[:64], recompute=False)  # one-off costs (first optimizer step imports)
    cached = epoch_seconds(ft, acts, paths, y, idx, recompute=False)
    recomputed = epoch_seconds(ft, acts, paths, y, idx, recompute=True)
    result = {"command": "python benchmarks/bench_finetune.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k not in ("work", "speed_only") + (("train", "test") if a.cache else ()) and v is not None)
              + (" --speed-only" if a.speed_only else ""),
              "unfreeze_from": a.unfreeze_from, "prefix_tap": ft.raw_tap, "prefix_cache_seconds": round(prefix_seconds, 1),
              "speed_images": len(idx), "epoch_seconds_cached": round(cached, 2),
              "epoch_seconds_recompute": round(recomputed, 2), "speedup": round(recomputed / cached, 2)}
    print(json.dumps(result, indent=2), flush=True)
    del data, acts  # run() loads the prefix again; a full-size raw tap is gigabytes
    if not a.speed_only:
        from featcache.classify.train import TrainConfig, train

        ft.cfg.recompute_prefix = False
        tuned = ft.run()
        head, _ = train(TrainConfig(cache=str(cache), out=str(work / "head"), test_source=test_source))
        result.update({"finetune": {k: tuned[k] for k in ("best_val_accuracy", "test_accuracy", "train_seconds", "wall_seconds", "history")},
                       "frozen_head": head})
    variant = ("_bnfrozen" if a.bn == "frozen" else "") + (f"_mixup{a.mixup:g}" if a.mixup else "") + (
        f"_ls{a.label_smoothing:g}" if a.label_smoothing else "")
    name = f"finetune_{a.unfreeze_from}{variant}{'_speed' if a.speed_only else ''}.json"
    save(result, RESULTS / name, default=str)
    print(json.dumps({k: v for k, v in result.items() if k != "frozen_head"}, indent=2, default=str))


if __name__ == "__main__":
    main()
