"""Validate ``featcache advise`` across kinds of data: does it recommend the strategy that measures best?

    python benchmarks/validate_advise.py --work /work/data/advise-validation            # every set, full size
    python benchmarks/validate_advise.py --work /tmp/av --sets digits lfw --max-rows 300  # a quick try
    python benchmarks/validate_advise.py --work /work/data/advise-validation --timing 10000  # the 2-minute target

For each labelled set (all install offline) the script writes the images as PNG folders under
``--work``, extracts them with the default backbone (every pooled tap; small images are upscaled
by the backbone's own preprocessing), runs ``advise`` with ``--budget``, and then measures, on the
very split advise used, every strategy it could have recommended, each in full (a fine-tune trains
on every training row, not on advise's subset; ``--ft-folds`` limits it to the first folds). Heads
advise measured are not fitted again: the same function, folds and seed give the same rows. Writes
``benchmarks/results/advise.json`` through ``record.save`` after every set (``render.py`` shows it).

``--timing N`` instead times ``featcache advise`` (default budget, its own process) on a cache of N
Fashion-MNIST training images (written and extracted first, resumably) and writes
``benchmarks/results/advise_timing.json``: the issue's target is <= 2 minutes on 10,000 cached images.

Sets: Tux Paint photos (clip-art-like cut-outs, 7 classes); line drawings made from them (edges);
photos -> drawings (train on photos, test on drawings: a shifted pair); Fashion-MNIST (a 10,000-image
subset: grayscale clothing, the timing target); animal-mnist (silhouettes); scikit-learn's digits
(8x8, where ImageNet features are weak); scikit-image's lfw_subset (faces vs background, 25x25).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from featcache.datasets import tuxpaint_items, write_fashion_mnist
from featcache.extract.pipeline import ExtractConfig, extract

sys.path.insert(0, str(Path(__file__).parent))
from record import RESULTS, portable, save  # noqa: E402

GAP = 0.01  # the target: the recommendation within 1 point of the best strategy (or within that figure's interval)
SECONDS_10K = 120.0  # ... and advise within 2 minutes on 10,000 cached images
SETS = ("tux-photos", "tux-drawings", "tux-photos-to-drawings", "fashion-mnist", "animal-mnist", "digits", "lfw")
TAPS = ["final", "stage1", "stage2", "stage3", "stage4", "stage5"]


# -- data preparation: each set as PNG folders <root>/<class>/<name>.png --------------------------
def _save(img: np.ndarray, path: Path) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def _per_class(y: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` images, the same share of every class (all when None)."""
    if limit is None or limit >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    each = max(2, limit // len(classes))
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:each] for c in classes]))


def _write_arrays(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str], limit: int | None) -> Path:
    for i in _per_class(labels, limit):
        _save(images[i], root / names[labels[i]] / f"{i:05d}.png")
    return root


def tux_photos(work: Path, limit: int | None) -> Path:
    """The Tux Paint stamps composited onto white (the extractor would do the same), as RGB PNGs."""
    root = work / "tux-photos"
    items = tuxpaint_items()
    labels = np.asarray([lbl for _, lbl in items])
    for i in _per_class(labels, limit):
        path, label = items[i]
        out = root / label / f"{path.parent.name}-{path.stem}.png"
        if not out.exists():
            with Image.open(path) as im:
                rgba = im.convert("RGBA")
                rgba.thumbnail((512, 512))
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                _save(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), out)
    return root


def tux_drawings(work: Path, limit: int | None) -> Path:
    """Line drawings made from the composited photos: Canny edges, dark lines on white."""
    from skimage.feature import canny
    from skimage.morphology import dilation, disk

    photos = tux_photos(work, limit)
    root = work / "tux-drawings"
    for p in sorted(photos.rglob("*.png")):
        out = root / p.parent.name / f"{p.stem}-lines.png"
        if not out.exists():
            gray = np.asarray(Image.open(p).convert("L"), np.float32) / 255
            edges = dilation(canny(gray, sigma=2.0), disk(1))
            _save(np.where(edges, 0, 255).astype(np.uint8), out)
    return root


def tux_shift(work: Path, limit: int | None) -> tuple[Path, Path]:
    """(a CSV of photos + drawings, the drawings folder = the test set): train on photos, test on drawings."""
    photos, drawings = tux_photos(work, limit), tux_drawings(work, limit)
    csv = work / "tux-photos-to-drawings.csv"
    rows = [f"{p},{p.parent.name}\n" for root in (photos, drawings) for p in sorted(root.rglob("*.png"))]
    csv.write_text("path,label\n" + "".join(rows))
    return csv, drawings


def fashion(work: Path, limit: int | None) -> Path:
    return write_fashion_mnist(work / "fashion-mnist", "train", limit=limit or 10000)


def animal(work: Path, limit: int | None) -> Path:
    """animal-mnist's gzip-pickled arrays, read here only (never its keras loader, never in featcache)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None:
        sys.exit("animal-mnist is not installed: pip install --no-deps animal-mnist==0.4")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    with gzip.open(data / "animal_data_version_3.gz") as f:
        images = pickle.load(f)  # noqa: S301 - a fixed file of an installed package, data preparation only
    with gzip.open(data / "animal_label_version_3.gz") as f:
        labels = np.asarray(pickle.load(f))  # noqa: S301
    return _write_arrays(work / "animal-mnist", images, labels, [f"animal{c}" for c in range(10)], limit or 2000)


def digits(work: Path, limit: int | None) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    return _write_arrays(work / "digits", images, d.target, [f"digit{c}" for c in range(10)], limit)


def lfw(work: Path, limit: int | None) -> Path:
    from skimage.data import lfw_subset

    images = np.round(lfw_subset() * 255).astype(np.uint8)
    labels = np.repeat([0, 1], 100)  # the first 100 are faces, the next 100 background crops
    return _write_arrays(work / "lfw", images, labels, ["face", "background"], limit)


def build_set(name: str, work: Path, limit: int | None) -> tuple[str, str | None]:
    """(extract SOURCE, test source or None) of set ``name``."""
    if name == "tux-photos-to-drawings":
        csv, test = tux_shift(work, limit)
        return str(csv), str(test)
    build = {"tux-photos": tux_photos, "tux-drawings": tux_drawings, "fashion-mnist": fashion,
             "animal-mnist": animal, "digits": digits, "lfw": lfw}[name]
    return str(build(work, limit)), None


def extract_set(source: str, cache: Path) -> dict:
    return extract(ExtractConfig(source, str(cache), taps=TAPS, progress=False))


# -- measurement -------------------------------------------------------------------------------------
KINDS = {
    "tux-photos": "Tux Paint stamps: photos of objects cut out on white (7 classes)",
    "tux-drawings": "line drawings made from the same stamps (Canny edges): a shifted set",
    "tux-photos-to-drawings": "shifted pair: train on the photos, test on the drawings",
    "fashion-mnist": "Fashion-MNIST, 10,000 of the training images (grayscale clothing, 28 px)",
    "animal-mnist": "animal-mnist silhouettes (shapes without texture, 28 px)",
    "digits": "scikit-learn digits (8x8 px, 16 grey levels)",
    "lfw": "scikit-image lfw_subset: faces vs background crops (25 px)",
}


def _figure(out, recommendable: bool, source: str, per_row: bool = False) -> dict:
    from featcache.classify.measure import wilson

    fig = {"accuracy": out.accuracy, "interval": wilson(int(round(out.accuracy * len(out.rows))), len(out.rows)),
           "test_rows": int(len(out.rows)), "train_rows": out.train_rows, "seconds": round(out.seconds, 1),
           "recommendable": recommendable, "source": source}
    if per_row and out.correct is not None:  # what --reuse-reference needs to compare row by row later
        fig["per_row"] = {"rows": [int(r) for r in out.rows], "correct": "".join("1" if c else "0" for c in out.correct)}
    return fig


class Figure:
    """A fine-tune measured in full by an earlier run (``--reuse-reference``): its rows, its figure, and its
    per-row correctness when that run recorded it (``correct`` None: only the figure is known)."""

    def __init__(self, fig: dict, rows: np.ndarray):
        per = fig.get("per_row")
        self.rows = np.asarray(per["rows"]) if per else rows
        self.correct = np.asarray([c == "1" for c in per["correct"]]) if per else None
        self.accuracy, self.train_rows, self.seconds = fig["accuracy"], fig["train_rows"], 0.0

    def on(self, rows: np.ndarray) -> np.ndarray:
        pos = {int(r): i for i, r in enumerate(self.rows)}
        return self.correct[[pos[int(r)] for r in rows]]


def _reusable(old: dict | None, name: str, baseline, ctx, ft_folds: int | None, rows: np.ndarray) -> dict | None:
    """The earlier run's in-full figure of fine-tune ``name``, if that run used the very same split (``rows``: the
    test rows of the folds a fine-tune is measured on)."""
    if not old or old["config"].get("ft_folds") != ft_folds:
        return None
    ref = old["reference"]
    base, fig = ref.get("logreg@final", {}), ref.get(name, {})
    same = (old["evaluation"]["flags"] == portable(ctx.split.flags) and old["evaluation"]["test_rows"] == len(ctx.split.test_rows)
            and old["images"] == len(ctx.base) and base.get("test_rows") == len(baseline.rows)
            and abs(base.get("accuracy", -1) - baseline.accuracy) < 1e-12 and base.get("train_rows") == baseline.train_rows)
    ok = same and fig.get("source", "").startswith("in full") and fig.get("test_rows") == len(rows)
    return fig if ok else None


def reference(cache: Path, test_source: str | None, seed: int, max_rows: int, ft_folds: int | None,
              measured: dict, old: dict | None = None) -> tuple[dict, dict]:
    """Every strategy advise could recommend, measured in full on advise's split: (figures, outcomes).

    ``measured``: advise's own outcomes; a head it measured is the same fit on the same folds, so it is reused.
    ``old``: this set's entry of an earlier run; its fine-tunes in full are reused when its split was this one
    (same flags, rows, and the same baseline figure on the same rows).
    """
    from featcache.classify.advise import BASELINE, candidates, prepare
    from featcache.classify.finetune_probe import measure_in_full

    ctx, baseline, _ = prepare(str(cache), budget=1e9, seed=seed, test_source=test_source, max_rows=max_rows)
    outcomes = {BASELINE: baseline}
    figures = {BASELINE: _figure(baseline, True, "advise")}
    ft_rows = np.concatenate([te for _, te in ctx.split.folds[: ft_folds or len(ctx.split.folds)]])
    for cand in candidates(ctx):
        t = time.perf_counter()
        if cand.config is not None and (fig := _reusable(old, cand.name, baseline, ctx, ft_folds, ft_rows)):
            out = Figure(fig, ft_rows)
            source = fig["source"] if "earlier run" in fig["source"] else fig["source"] + ", reused from an earlier run"
            figures[cand.name] = fig | {"source": source}
            outcomes[cand.name] = out
            print(f"  {cand.name:40} {out.accuracy:.4f} on {len(out.rows)} rows ({source})", flush=True)
            continue
        if cand.config is not None:
            out, source = measure_in_full(ctx, cand.config, ft_folds), "in full"
        elif cand.name in measured:
            out, source = measured[cand.name], "advise"
        else:
            out, source = cand.measure(ctx), "in full"
        outcomes[cand.name] = out
        figures[cand.name] = _figure(out, cand.recommendable, source, per_row=cand.config is not None)
        print(f"  {cand.name:40} {out.accuracy:.4f} on {len(out.rows)} rows ({source}, "
              f"{time.perf_counter() - t:.0f}s)", flush=True)
    return figures, outcomes


def _compare(a, b, seed: int) -> tuple[dict, float, int, int]:
    """(``a`` minus ``b`` on the rows both were scored on, b's accuracy there, a's right answers there, rows).

    Row by row with a paired interval when both are known per row; a reused figure known only as a whole is
    compared on its own rows (the other's accuracy on exactly those), without an interval.
    """
    from featcache.classify.measure import paired_difference

    rows = np.intersect1d(a.rows, b.rows)

    def acc(o) -> float:
        if o.correct is not None:
            return float(o.on(rows).mean())
        assert len(rows) == len(o.rows), "a figure without per-row results compares only on all of its rows"
        return float(o.accuracy)

    if a.correct is not None and b.correct is not None:
        d = paired_difference(a.on(rows), b.on(rows), seed)
    else:
        d = {"difference": acc(a) - acc(b), "interval": None, "rows": int(len(rows))}
    return d, acc(b), int(round(acc(a) * len(rows))), len(rows)


def verdict(recommended: str, figures: dict, outcomes: dict, seed: int) -> dict:
    """Is the recommendation within 1 point of the best recommendable strategy (or within that figure's interval)?

    Strategies are compared on the rows both were scored on.
    """
    from featcache.classify.measure import wilson

    rec = outcomes[recommended]
    gaps = {n: _compare(out, rec, seed) for n, out in outcomes.items() if figures[n]["recommendable"] and n != recommended}
    best = max(gaps, key=lambda n: gaps[n][0]["difference"], default=recommended)
    if best == recommended or gaps[best][0]["difference"] <= 0:
        return {"best": recommended, "gap": 0.0, "met": True, "within": "best"}
    g, rec_acc, best_right, n = gaps[best]
    lo, _ = wilson(best_right, n)
    within = "1 point" if g["difference"] <= GAP + 1e-9 else ("the best figure's interval" if rec_acc >= lo else "no")
    return {"best": best, "gap": g["difference"], "gap_interval": g["interval"], "rows": g["rows"],
            "met": within != "no", "within": within}


def run_set(name: str, work: Path, limit: int | None, budget: float, seed: int, max_rows: int,
            ft_folds: int | None, old: dict | None = None) -> dict:
    from featcache.classify.advise import advise

    print(f"== {name}", flush=True)
    source, test_source = build_set(name, work, limit)
    cache = work / "caches" / name
    t = time.perf_counter()
    ex = extract_set(source, cache)
    extract_seconds = time.perf_counter() - t
    t = time.perf_counter()
    measured: dict = {}
    adv = advise(str(cache), budget=budget, seed=seed, test_source=test_source, max_rows=max_rows, outcomes=measured)
    advise_seconds = time.perf_counter() - t
    rec = adv["recommendation"]
    print(f"  advise ({advise_seconds:.0f}s): {rec['name']} {rec['accuracy']:.4f}; skipped {adv['budget']['skipped']}",
          flush=True)
    figures, outcomes = reference(cache, test_source, seed, max_rows, ft_folds, measured, old)
    keys = ("name", "status", "accuracy", "interval", "test_rows", "train_rows", "vs_frozen", "vs_baseline",
            "clearly_better", "measured_worse", "why", "subset", "measured_with")
    return {"set": name, "kind": KINDS[name], "images": adv["data"]["labelled"],
            "subsampled_from": adv["data"]["subsampled_from"], "classes": adv["data"]["classes"],
            "evaluation": adv["evaluation"], "extract": {"images": ex["unique_images"], "seconds": round(extract_seconds, 1)},
            "advise": {"seconds": round(advise_seconds, 1), "budget": budget, "recommendation": rec, "why": adv["why"],
                       "finetune_order": adv["finetune_order"], "kept_for_finetunes": adv["budget"]["kept_for_finetunes"],
                       "candidates": [{k: c.get(k) for k in keys} for c in adv["candidates"]],
                       "learning_curve": adv["learning_curve"], "imagenet_similarity": adv["imagenet_similarity"]},
            "reference": figures, "verdict": verdict(rec["name"], figures, outcomes, seed)}


def timing(work: Path, images: int, budget: float) -> dict:
    """``featcache advise`` on ``images`` cached Fashion-MNIST images, in its own process, timed end to end."""
    source = write_fashion_mnist(work / f"fashion-mnist-{images}", "train", limit=images)
    cache = work / "caches" / f"fashion-mnist-{images}"
    t = time.perf_counter()
    extract_set(str(source), cache)
    extract_seconds = time.perf_counter() - t
    argv = [sys.executable, "-c", "import sys; from featcache.cli import main; sys.exit(main(sys.argv[1:]))",
            "advise", "--cache", str(cache), "--budget", str(budget), "--json"]
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    r = json.loads(done.stdout)
    return {"images": r["data"]["labelled"], "budget": budget, "wall_seconds": round(wall, 1),
            "budget_used": r["budget"]["used"], "skipped": r["budget"]["skipped"],
            "recommendation": r["recommendation"]["name"], "accuracy": r["recommendation"]["accuracy"],
            "extract_seconds": round(extract_seconds, 1), "target_seconds": SECONDS_10K, "target_images": 10000,
            "met": wall <= SECONDS_10K and r["data"]["labelled"] >= 10000, "cpus": os.cpu_count(),
            "command": f"python benchmarks/validate_advise.py --work {work} --timing {images}"
                       + (f" --budget {budget:g}" if budget != 120 else "")}


def set_command(name: str, c: dict) -> str:
    """The command that measures set ``name`` as this run did."""
    return (f"python benchmarks/validate_advise.py --work {c['work']} --sets {name} --max-rows {c['max_rows']} "
            f"--budget {c['budget']:g}" + (f" --limit {c['limit']}" if c["limit"] else "")
            + (f" --ft-folds {c['ft_folds']}" if c["ft_folds"] else "") + (f" --seed {c['seed']}" if c["seed"] else "")
            + (f" --reuse-reference {c['reuse_reference']}" if c["reuse_reference"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the PNG sets and their caches (reused)")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--limit", type=int, help="at most this many images per set written (default: each set's full "
                                              "size; Fashion-MNIST 10,000, animal-mnist 2,000)")
    ap.add_argument("--max-rows", type=int, default=20000, help="advise --max-rows: a stratified subsample of each "
                                                                "cache, for advise and the reference alike")
    ap.add_argument("--budget", type=float, default=120.0, help="advise --budget")
    ap.add_argument("--ft-folds", type=int, help="folds the reference fine-tunes run on (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing", type=int, metavar="N", help="only time advise on N cached Fashion-MNIST images")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/advise.json (advise_timing.json)")
    ap.add_argument("--reuse-reference", type=Path, metavar="JSON",
                    help="an earlier run's results (advise.json): its fine-tunes measured in full are reused for every set "
                         "whose split is the same (same flags, rows and baseline figure) with the same --ft-folds; the "
                         "slow part of a run. A figure recorded without per-row results is compared as a whole")
    ap.add_argument("--update", action="store_true",
                    help="replace only these sets' entries in the results file and keep the others (each entry "
                         "records the command that measured it)")
    args = ap.parse_args()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.timing:
        r = timing(args.work, args.timing, args.budget)
        save(r | {"config": config}, args.out or RESULTS / "advise_timing.json")
        print(json.dumps(r, indent=1))
        sys.exit(0 if r["met"] else 1)
    earlier = {}
    if args.reuse_reference:
        prev = json.loads(args.reuse_reference.read_text())
        earlier = {s["set"]: s | {"config": prev["config"]} for s in prev["sets"]
                   if prev["config"].get("max_rows") == args.max_rows and prev["config"].get("seed") == args.seed}
    out = args.out or RESULTS / "advise.json"
    results = json.loads(out.read_text())["sets"] if args.update and out.is_file() else []
    for s in args.sets:  # saved after every set: a long run stopped half-way keeps what it measured
        entry = run_set(s, args.work, args.limit, args.budget, args.seed, args.max_rows, args.ft_folds,
                        earlier.get(s)) | {"command": set_command(s, config)}
        at = next((i for i, r in enumerate(results) if r["set"] == s), len(results))
        results[at : at + 1] = [entry]  # in place of this set's earlier entry (--update), else at the end
        save({"config": config, "target_gap": GAP, "cpus": os.cpu_count(), "sets": results}, out)
        v = entry["verdict"]
        print(f"  verdict: best {v['best']}, gap {100 * v['gap']:+.1f} pt, met: {v['met']}", flush=True)
    sys.exit(0 if all(r["verdict"]["met"] for r in results) else 1)


if __name__ == "__main__":
    main()
