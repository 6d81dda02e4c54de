"""Validate ``featcache advise`` across kinds of data: does it recommend the strategy that measures best?

    python benchmarks/validate_advise.py --work /work/data/advise-validation            # every set, full size
    python benchmarks/validate_advise.py --work /tmp/av --sets digits lfw --limit 300     # a quick try

For each labelled set (all install offline) the script writes the images as PNG folders under
``--work``, extracts them with the default backbone (every pooled tap; small images are upscaled
by the backbone's own preprocessing), runs ``advise`` with ``--budget``, and then measures, on the
very split advise used, every strategy it could have recommended, each in full (a fine-tune trains
on every training row, not on advise's subset). Writes ``benchmarks/results/advise.json`` and a
markdown table (``--markdown``) for BENCHMARKS.md.

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
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from featcache.datasets import tuxpaint_items, write_fashion_mnist
from featcache.extract.pipeline import ExtractConfig, extract

RESULTS = Path(__file__).parent / "results"
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
    "tux-drawings": "line drawings made from the same stamps (Canny edges)",
    "tux-photos-to-drawings": "shifted pair: train on the photos, test on the drawings",
    "fashion-mnist": "Fashion-MNIST, 10,000 of the training images (grayscale clothing, 28 px)",
    "animal-mnist": "animal-mnist silhouettes (shapes without texture, 28 px)",
    "digits": "scikit-learn digits (8x8 px, 16 grey levels)",
    "lfw": "scikit-image lfw_subset: faces vs background crops (25 px)",
}


def _figure(out) -> dict:
    from featcache.classify.measure import wilson

    return {"accuracy": out.accuracy, "interval": wilson(int(out.correct.sum()), len(out.correct)),
            "test_rows": int(len(out.rows)), "train_rows": out.train_rows, "seconds": round(out.seconds, 1)}


def reference(cache: Path, test_source: str | None, seed: int, ft_folds: int | None) -> tuple[dict, dict]:
    """Every strategy advise could recommend, each measured in full on advise's split: (figures, outcomes)."""
    from featcache.classify.advise import BASELINE, candidates, prepare
    from featcache.classify.finetune_probe import measure_in_full

    ctx, baseline, _ = prepare(str(cache), budget=1e9, seed=seed, test_source=test_source)
    outcomes, figures = {BASELINE: baseline}, {BASELINE: _figure(baseline) | {"recommendable": True}}
    for cand in candidates(ctx):
        t = time.perf_counter()
        out = measure_in_full(ctx, cand.config, ft_folds) if cand.config is not None else cand.measure(ctx)
        outcomes[cand.name] = out
        figures[cand.name] = _figure(out) | {"recommendable": cand.command is not None}
        print(f"  {cand.name:40} {out.accuracy:.4f} on {len(out.rows)} rows ({time.perf_counter() - t:.0f}s)", flush=True)
    return figures, outcomes


def verdict(recommended: str, figures: dict, outcomes: dict, seed: int) -> dict:
    """Is the recommendation within 1 point of the best recommendable strategy (or within that figure's interval)?

    Strategies are compared on the rows both were scored on (a fine-tune measured on fewer folds).
    """
    from featcache.classify.measure import paired_difference, wilson

    rec = outcomes[recommended]
    gaps = {}
    for name, out in outcomes.items():
        if figures[name]["recommendable"] and name != recommended:
            gaps[name] = paired_difference(out.correct, rec.on(out.rows), seed)
    best = max(gaps, key=lambda n: gaps[n]["difference"], default=recommended)
    if best == recommended or gaps[best]["difference"] <= 0:
        return {"best": recommended, "gap": 0.0, "met": True}
    g = gaps[best]
    out = outcomes[best]
    lo, _ = wilson(int(out.correct.sum()), len(out.correct))
    rec_same_rows = float(rec.on(out.rows).mean())
    return {"best": best, "gap": g["difference"], "gap_interval": g["interval"], "rows": g["rows"],
            "met": g["difference"] <= 0.01 or rec_same_rows >= lo,
            "within": "1 point" if g["difference"] <= 0.01 else ("the best figure's interval" if rec_same_rows >= lo
                                                                 else "no")}


def run_set(name: str, work: Path, limit: int | None, budget: float, seed: int, ft_folds: int | None) -> dict:
    from featcache.classify.advise import advise

    print(f"== {name}", flush=True)
    source, test_source = build_set(name, work, limit)
    cache = work / "caches" / name
    t = time.perf_counter()
    ex = extract_set(source, cache)
    extract_seconds = time.perf_counter() - t
    t = time.perf_counter()
    adv = advise(str(cache), budget=budget, seed=seed, test_source=test_source)
    advise_seconds = time.perf_counter() - t
    rec = adv["recommendation"]
    print(f"  advise ({advise_seconds:.0f}s): {rec['name']} {rec['accuracy']:.4f}; skipped {adv['budget']['skipped']}",
          flush=True)
    figures, outcomes = reference(cache, test_source, seed, ft_folds)
    return {"set": name, "kind": KINDS[name], "images": adv["data"]["labelled"], "classes": adv["data"]["classes"],
            "evaluation": adv["evaluation"], "extract": {"images": ex["unique_images"], "seconds": round(extract_seconds, 1)},
            "advise": {"seconds": round(advise_seconds, 1), "budget": budget, "recommendation": rec, "why": adv["why"],
                       "candidates": [{k: c.get(k) for k in ("name", "status", "accuracy", "interval", "test_rows",
                                                              "train_rows", "vs_frozen", "clearly_better", "why",
                                                              "subset")} for c in adv["candidates"]],
                       "learning_curve": adv["learning_curve"], "imagenet_similarity": adv["imagenet_similarity"]},
            "reference": figures, "verdict": verdict(rec["name"], figures, outcomes, seed)}


def markdown(results: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in results for n in r["reference"]))
    short = {n: n.replace("logreg@final+stage1+stage2+stage3+stage4+stage5", "logreg@all taps") for n in names}
    lines = ["| set | images / classes | split | advise recommends (its figure) | advise s | best in full (figure) "
             "| gap | met |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rec, v, ev = r["advise"]["recommendation"], r["verdict"], r["evaluation"]
        best = r["reference"][v["best"]]
        lines.append(f"| {r['set']} | {r['images']} / {r['classes']} | {ev['mode']} ({ev['test_rows']} test rows) | "
                     f"{rec['name']} ({rec['accuracy']:.3f}) | {r['advise']['seconds']:.0f} | "
                     f"{v['best']} ({best['accuracy']:.3f}) | {100 * v['gap']:+.1f} pt | "
                     f"{'yes' if v['met'] else 'NO'} |")
    lines += ["", "Every strategy measured in full on advise's split (accuracy; * = advise's recommendation; "
              "fine-tunes train on every training row of a fold; italics: not recommendable, no train command):", "",
              "| set | " + " | ".join(short[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for r in results:
        cells = []
        for n in names:
            f = r["reference"].get(n)
            if f is None:
                cells.append("-")
                continue
            text = f"{f['accuracy']:.3f}" + ("*" if n == r["advise"]["recommendation"]["name"] else "")
            cells.append(text if f["recommendable"] else f"_{text}_")
        lines.append(f"| {r['set']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the PNG sets and their caches (reused)")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--limit", type=int, help="at most this many images per set (default: each set's full size; "
                                              "Fashion-MNIST 10,000, animal-mnist 2,000)")
    ap.add_argument("--budget", type=float, default=120.0, help="advise --budget")
    ap.add_argument("--ft-folds", type=int, help="folds the reference fine-tunes run on (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "advise.json")
    ap.add_argument("--markdown", type=Path, help="also write the tables here")
    args = ap.parse_args()
    results = [run_set(s, args.work, args.limit, args.budget, args.seed, args.ft_folds) for s in args.sets]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": config, "sets": results}, indent=1, default=float))
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    sys.exit(0 if all(r["verdict"]["met"] for r in results) else 1)


if __name__ == "__main__":
    main()
