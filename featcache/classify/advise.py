"""``featcache advise``: which cell of the transfer-learning matrix the data is in, measured on the data.

Each cell of the matrix in ARCHITECTURE.md is made concrete as candidate strategies, and each
candidate is measured, within ``budget`` seconds, on one split shared by all (``measure``):

    frozen head on the final tap (logreg)   the baseline: small data, similar to ImageNet
    frozen head on an earlier tap            reuse early layers (frozen) + a new head
    frozen head on another cached backbone   which backbone's features suit the data
    MLP head on the final tap                a non-linear head on frozen features
    frozen head on concatenated taps         measured only: ``featcache train`` cannot train it yet
    fine-tune the last block                  fine-tune deeper layers, small learning rate
    new top layers on the last stage          reuse early layers, train new top layers + head

plus a learning curve of the baseline (does more data still pay?). The budget is spent in that order,
except that ``FT_SHARE`` of it is kept for the fine-tunes: an MLP or concatenated head that would eat
into it waits until after them, and runs only if they left the time (the per-tap probes are cheap and
are the evidence the fine-tunes are ordered by). The fine-tune the probes point to runs first, with the larger share of the time left: new top
layers when an earlier tap beat the final one (the last layers are too ImageNet-specific for the
data), the last block otherwise. Each fine-tune is sized to what it may use (fewer epochs, fewer
training and test images) rather than skipped, and reports what it ran with. A strategy is recommended only
if it is clearly better than the frozen head: the 95 % paired-bootstrap interval of its accuracy
minus the frozen head's, on the same test rows and trained on the same rows, lies above zero
(a fine-tune the budget confined to a subset is compared with the frozen head trained on that
subset) and it is not below the baseline's own figure on those test rows; otherwise the baseline is.
So advise never recommends a strategy that measured worse. ImageNet similarity is shown per backbone
(and as agreement across backbones), for information only.

Adding a strategy (an ensemble of cached backbones, say) is one more ``Candidate`` from
``candidates``: a name, its cell, a command, a cost estimate and a function returning an
``Outcome`` on the shared split.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import FeatcacheError, UsageError
from ..store.cache import FeatureCache
from .data import Labelled, align, load_labelled
from .measure import (
    Outcome,
    OutOfBudget,
    SharedSplit,
    fraction_folds,
    head_outcome,
    paired_difference,
    shared_split,
    wilson,
)
from .probe import imagenet_similarity, labelled_rows, pooled_taps

MIN_FT_SECONDS = 20.0  # below this left, a fine-tune is not even started (loading and timing it take ~10s)

CELL_FROZEN = "small / similar: frozen features + new head"
CELL_EARLY = "small / not similar: reuse early layers + new head"
CELL_NEW_TOP = "small / not similar: reuse early layers, train new top layers + head"
CELL_FINETUNE = "large / similar: fine-tune deeper layers, small learning rate"
BASELINE = "logreg@final"
CURVE = (0.125, 0.25, 0.5)  # learning-curve fractions of the training rows (1.0 is the baseline itself)
STEEP = 0.02  # the last doubling of the data gained at least this, clearly above 0: more data still pays
LOW = 0.9  # ... and the best accuracy is below this: "collect more data" leads the advice
MIN_PER_CLASS = 10  # fewer in the smallest class: every figure is shaky, and advise says so
FT_SHARE = 0.6  # of the budget kept for the fine-tunes: the optional heads (mlp, concat) only run beyond it
FIRST_FT_SHARE = 0.7  # of the time left, for the fine-tune the evidence puts first (the other gets the rest)
END_MARGIN = 6.0  # seconds of the budget kept back: the command's start (imports) and its report count too
SIMILARITY_SAMPLE = 2000
SIMILARITY_SECONDS = 3.0  # per backbone: load it, apply its ImageNet classifier


@dataclass
class Context:
    """What every candidate measures against: the data, the shared split, the clock."""

    cache: FeatureCache
    cache_arg: str  # the cache as the user named it (for commands)
    fingerprint: str
    attrs: dict
    base: Labelled  # the final tap's labelled rows: the baseline's features
    split: SharedSplit
    seed: int
    deadline: float
    fingerprint_flag: str = ""  # " --fingerprint FP" when the cache holds several
    seconds_per_dim: float = 0.0  # the baseline's fit time per feature: the cost model of the other heads
    share: float = 1.0  # of the time left, what the fine-tune being measured may plan with

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def train_command(self, tap: str, head: str, fingerprint: str | None = None) -> str:
        fp = f" --fingerprint {fingerprint[:12]}" if fingerprint else self.fingerprint_flag
        return f"featcache train --cache {self.cache_arg}{fp} --tap {tap} --head {head} {self.split.flags} --out head"

    def tap_data(self, tap: str, fingerprint: str | None = None) -> Labelled:
        """``tap`` of ``fingerprint`` (default: the advised one), in the baseline's row order."""
        fp = fingerprint or self.fingerprint
        if tap == self.base.tap and fp == self.fingerprint:
            return self.base
        return align(self.base, load_labelled(self.cache, fp, tap, "keep"))


@dataclass
class Candidate:
    """One strategy: how to measure it on the shared split, what that costs, how to reproduce it."""

    name: str
    strategy: str
    cell: str
    command: str | None  # how to reproduce it (a fine-tune's is known once measured: its ``details``)
    estimate: Callable[[Context], float]  # expected seconds; skipped when more than what is left
    measure: Callable[[Context], Outcome]
    note: str = ""
    config: object = None  # a fine-tune's ``Cut``, to measure it in full outside the budget (benchmarks)
    recommendable: bool = True  # False: measured for information; no featcache command trains it yet
    optional: bool = False  # True: skipped first when the budget is short (the time kept for the fine-tunes)


def head_candidate(ctx: Context, name: str, strategy: str, cell: str, tap: str, kind: str, cost: float,
                   fingerprint: str | None = None, optional: bool = False) -> Candidate:
    """A head of ``kind`` on frozen ``tap`` features; ``cost``: its fit time relative to the baseline's per feature."""
    dim = int((ctx.cache.group_attrs(fingerprint) if fingerprint else ctx.attrs)["taps"][tap])

    def measure(c: Context) -> Outcome:
        data = c.tap_data(tap, fingerprint)
        out = head_outcome(data.X, data.y, c.split.folds, kind, c.seed)
        if fingerprint and not np.array_equal(load_labelled(c.cache, fingerprint, tap).sha256, c.base.sha256):
            out.details["note"] = ("this backbone's labelled rows differ from the advised one's (other images or "
                                   "order): the command splits them differently, so its figure will differ a little")
        return out

    return Candidate(name, strategy, cell, ctx.train_command(tap, kind, fingerprint),
                     lambda c: cost * c.seconds_per_dim * dim, measure, optional=optional)


def concat_candidate(ctx: Context, taps: list[str]) -> Candidate:
    """A logistic head on several pooled taps side by side (information: train has no such option yet)."""
    def measure(c: Context) -> Outcome:
        return head_outcome(np.hstack([c.tap_data(t).X for t in taps]), c.base.y, c.split.folds, "logreg", c.seed)

    dim = sum(int(ctx.attrs["taps"][t]) for t in taps)
    return Candidate("logreg@" + "+".join(taps), "logistic head on all pooled taps, concatenated", CELL_EARLY, None,
                     lambda c: 1.5 * c.seconds_per_dim * dim, measure, recommendable=False, optional=True,
                     note="featcache train cannot train on concatenated taps yet: not recommendable")


def candidates(ctx: Context, finetune: bool = True) -> list[Candidate]:
    """Every strategy besides the baseline: the probes, the optional heads, then the fine-tunes (in ``advise``, the
    fine-tunes are ordered by what the probes showed, ``finetune_order``, and the optional heads leave them a share)."""
    from .finetune_probe import finetune_candidates

    taps = [t for t in pooled_taps(list(ctx.attrs["taps"])) if t != "final"]
    out = [head_candidate(ctx, f"logreg@{t}", f"logistic head on frozen {t} features", CELL_EARLY, t, "logreg", 1.5)
           for t in taps]
    for fp in ctx.cache.fingerprints():
        other = ctx.cache.group_attrs(fp)
        if fp != ctx.fingerprint and "final" in other["taps"]:
            name = other["backbone"].get("name")
            out.append(head_candidate(ctx, f"logreg@final[{name}]", f"logistic head on frozen final features of "
                                      f"{name}", CELL_FROZEN, "final", "logreg", 1.5, fingerprint=fp))
    out.append(head_candidate(ctx, "mlp@final", "MLP head on frozen final features", CELL_FROZEN, "final", "mlp", 4.0,
                              optional=True))
    if taps:
        out.append(concat_candidate(ctx, ["final", *taps]))
    return out + (finetune_candidates(ctx, CELL_FINETUNE, CELL_NEW_TOP) if finetune else [])


def finetune_order(tunes: list[Candidate], rows: list[dict], base_row: dict) -> tuple[list[Candidate], dict]:
    """The fine-tunes, the one the probes point to first (it plans with the larger share of the time left).

    An earlier tap that clearly beat the final one (the paired interval above zero) says the last layers are too
    ImageNet-specific for the data: new top layers on an earlier cut first. Otherwise the final features are as
    good as any frozen ones: the last block first.
    """
    early = [r for r in rows if r["status"] == "measured" and r["name"].startswith("logreg@stage")]
    best = max(early, key=lambda r: r["accuracy"], default=None)
    if best is not None and best["clearly_better"]:
        first = [c for c in tunes if c.config.new_top]
        why = (f"{best['name']} ({best['accuracy']:.3f}) clearly beat the final tap ({base_row['accuracy']:.3f}): "
               "new top layers on an earlier cut first")
    else:
        first = [c for c in tunes if not c.config.new_top]
        why = ("no earlier tap clearly beat the final one" if best is not None else "no earlier tap was measured") + \
            ": the last block first"
    ordered = first + [c for c in tunes if c not in first]
    return ordered, {"order": [c.name for c in ordered], "why": why}


def _row(c: Candidate, out: Outcome | None, base: Outcome, seed: int, skipped: str = "") -> dict:
    row = {"name": c.name, "strategy": c.strategy, "cell": c.cell, "command": c.command,
           "recommendable": c.recommendable, "note": c.note}
    if out is None:
        return row | {"status": "skipped", "why": skipped}
    vs = paired_difference(out.correct, base.on(out.rows), seed)
    fair = vs if out.frozen is None else paired_difference(out.correct, out.frozen, seed)
    row |= {"status": "measured", "accuracy": out.accuracy, "interval": wilson(int(out.correct.sum()), len(out.correct)),
            "test_rows": len(out.rows), "train_rows": out.train_rows, "seconds": round(out.seconds, 2),
            "vs_baseline": vs, "vs_frozen": fair, "clearly_better": fair["interval"][0] > 0,
            "measured_worse": min(vs["difference"], fair["difference"]) < 0,  # below either frozen head
            **out.details}  # a fine-tune's details: its cut, its command
    return row


def learning_curve(ctx: Context, base: Outcome) -> dict:
    """The baseline at growing fractions of each fold's training rows, on the same test rows."""
    points, prev = [], None
    for f in CURVE:
        if ctx.left() < base.seconds * f * 1.5:
            break
        folds = fraction_folds(ctx.base.y, ctx.split.folds, f, ctx.seed)
        out = head_outcome(ctx.base.X, ctx.base.y, folds, "logreg", ctx.seed)
        points.append({"fraction": f, "train_rows": out.train_rows, "accuracy": out.accuracy,
                       "interval": wilson(int(out.correct.sum()), len(out.correct))})
        prev = out
    points.append({"fraction": 1.0, "train_rows": base.train_rows, "accuracy": base.accuracy,
                   "interval": wilson(int(base.correct.sum()), len(base.correct))})
    curve: dict = {"head": "logreg", "tap": "final", "points": points}
    if prev is not None and points[-2]["fraction"] == CURVE[-1]:
        gain = paired_difference(base.correct, prev.correct, ctx.seed)
        curve["last_doubling"] = gain
        curve["still_climbing"] = gain["difference"] >= STEEP and gain["interval"][0] > 0
    return curve


def _recommend(rows: list[dict], base_row: dict, curve: dict, counts: np.ndarray) -> tuple[dict, list[str]]:
    better = [r for r in rows if r["status"] == "measured" and r["recommendable"] and r["clearly_better"]
              and not r["measured_worse"]]
    best = max(better, key=lambda r: r["vs_frozen"]["difference"], default=None)
    why = []
    if best is None:
        best = base_row
        measured = [r for r in rows if r["status"] == "measured"]
        top = max(measured, key=lambda r: r["vs_frozen"]["difference"], default=None)
        if top is None:
            why.append("nothing else could be measured within the budget")
        else:
            d = top["vs_frozen"]
            why.append(f"no strategy was clearly better than the frozen logistic head (the closest, {top['name']}, "
                       f"{d['difference']:+.3f}, 95% interval [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}] "
                       "includes 0 or lies below it)")
    else:
        d = best["vs_frozen"]
        why.append(f"{best['name']} beat the frozen logistic head by {d['difference']:+.3f} on the same "
                   f"{d['rows']} rows (95% interval [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}])"
                   + (f", both trained on the same {best['train_rows']} images" if best.get("subset") else ""))
        if best.get("subset"):
            why.append(best["subset"])
    for r in rows:
        if r["status"] == "measured" and r["recommendable"] and r["clearly_better"] and r["measured_worse"]:
            why.append(f"{r['name']} beat the frozen head trained on the same {r['train_rows']} images "
                       f"({r['vs_frozen']['difference']:+.3f}) but scored below the frozen head trained on all of "
                       f"them ({r['vs_baseline']['difference']:+.3f}): not recommended on this budget; a larger "
                       "--budget measures it on more images")
        if r["status"] == "measured" and not r["recommendable"] and r["clearly_better"]:
            why.append(f"{r['name']} also measured clearly better ({r['vs_frozen']['difference']:+.3f}) but "
                       f"{r['note'].split(':')[0]}")
    rec = {k: best.get(k) for k in ("name", "strategy", "cell", "command", "accuracy", "interval", "test_rows")}
    more = curve.get("still_climbing") and (best.get("accuracy") or 0) < LOW
    if more:
        g = curve["last_doubling"]
        why.append(f"the learning curve still climbs ({g['difference']:+.3f} from the last doubling of the data, "
                   f"95% interval [{g['interval'][0]:+.3f}, {g['interval'][1]:+.3f}]): collect more labelled images")
    if counts.min() < MIN_PER_CLASS:
        why.append(f"the smallest class has {int(counts.min())} images: figures for it are shaky; label more")
    rec["collect_more_data"] = bool(more)
    return rec, why


def prepare(cache_dir: str, fingerprint: str | None = None, budget: float = 120.0, seed: int = 0,
            test_source: str | None = None, max_rows: int = 20000) -> tuple[Context, Outcome, int | None]:
    """The shared split and the baseline measured on it (always, whatever the budget); the clock starts here.

    Returns the context, the baseline's outcome and, when the rows were subsampled, how many there were.
    """
    t0 = time.perf_counter()
    if not budget > 0:
        raise UsageError(f"--budget must be a positive number of seconds, got {budget}")
    cache = FeatureCache(cache_dir)
    fp = cache.resolve_fingerprint(fingerprint)
    attrs = cache.group_attrs(fp)
    if "final" not in attrs["taps"]:
        raise UsageError("advise needs the final tap in the cache (extract with --taps final ...)")
    base, total = labelled_rows(cache, fp, max_rows, seed)
    split = shared_split(base, seed, test_source)
    several = len(cache.fingerprints()) > 1
    ctx = Context(cache, shlex.quote(str(cache_dir)), fp, attrs, base, split, seed,
                  t0 + budget - min(END_MARGIN, 0.05 * budget),
                  fingerprint_flag=f" --fingerprint {fp[:12]}" if several else "")
    baseline = head_outcome(base.X, base.y, split.folds, "logreg", seed)
    ctx.seconds_per_dim = (baseline.steady_seconds or baseline.seconds) / base.X.shape[1]
    return ctx, baseline, total


def baseline_candidate(ctx: Context, baseline: Outcome) -> Candidate:
    return Candidate(BASELINE, "logistic head on frozen final features (the baseline)", CELL_FROZEN,
                     ctx.train_command("final", "logreg"), lambda c: 0.0, lambda c: baseline)


def advise(cache_dir: str, fingerprint: str | None = None, budget: float = 120.0, seed: int = 0,
           test_source: str | None = None, max_rows: int = 20000, finetune: bool = True,
           outcomes: dict[str, Outcome] | None = None) -> dict:
    """Measure every candidate strategy on one shared split within ``budget`` seconds; recommend from the figures.

    ``outcomes``, when given, receives each measured strategy's per-row ``Outcome`` by name (validation reuses them).
    """
    t0 = time.perf_counter()
    ctx, baseline, total = prepare(cache_dir, fingerprint, budget, seed, test_source, max_rows)
    base_row = _row(baseline_candidate(ctx, baseline), baseline, baseline, seed)
    kept = {} if outcomes is None else outcomes
    kept[BASELINE] = baseline
    curve = learning_curve(ctx, baseline)
    rows = []
    every = candidates(ctx, finetune)
    tunes = [c for c in every if c.config is not None]
    reserve = FT_SHARE * budget if tunes else 0.0

    def run(cand: Candidate, room: float, short: str = "") -> None:
        need = cand.estimate(ctx)
        if need > room:
            rows.append(_row(cand, None, baseline, seed, f"needs about {need:.0f}s, {max(0, room):.0f}s left{short}"))
            return
        try:
            kept[cand.name] = cand.measure(ctx)
            rows.append(_row(cand, kept[cand.name], baseline, seed))
        except (FeatcacheError, OutOfBudget) as e:  # a tap lagging behind, weights gone, no time: the others count
            rows.append(_row(cand, None, baseline, seed, str(e)))

    deferred = []
    for cand in every:
        if cand.config is None:
            if cand.optional and reserve and cand.estimate(ctx) > ctx.left() - reserve:
                deferred.append(cand)  # measured after the fine-tunes, if they leave the time
                continue
            run(cand, ctx.left())
    tunes, order = finetune_order(tunes, rows, base_row)
    for i, cand in enumerate(tunes):
        # the first takes everything when the rest would be too little for the second to start
        ctx.share = FIRST_FT_SHARE if i == 0 and len(tunes) > 1 and \
            ctx.left() * (1 - FIRST_FT_SHARE) >= MIN_FT_SECONDS else 1.0
        run(cand, ctx.left())
    for cand in deferred:
        run(cand, ctx.left(), f" (deferred to keep {reserve:.0f}s for the fine-tunes)")
    cache, base = ctx.cache, ctx.base
    similarity = None
    with_final = [f for f in cache.fingerprints() if "final" in cache.group_attrs(f)["taps"]]
    if ctx.left() > SIMILARITY_SECONDS * len(with_final):
        similarity = imagenet_similarity(cache, with_final, base.sha256, SIMILARITY_SAMPLE, seed)
    counts = np.unique(base.y, return_counts=True)[1]
    rec, why = _recommend(rows, base_row, curve, counts)
    if total:
        why.append(f"measured on a stratified subsample of {len(base)} of {total} rows (--max-rows): the commands "
                   "train on all of them, so their figures differ a little")
    split = ctx.split
    return {"cache": str(cache.root), "fingerprint": ctx.fingerprint, "backbone": ctx.attrs["backbone"].get("name"),
            "data": {"labelled": len(base), "subsampled_from": total, "classes": len(counts),
                     "median_per_class": float(np.median(counts)), "min_per_class": int(counts.min()),
                     "chance": float(counts.max() / counts.sum())},
            "evaluation": {"mode": split.mode, "flags": split.flags, "test_rows": int(len(split.test_rows)), **split.info},
            "baseline": base_row, "candidates": [base_row, *rows], "learning_curve": curve,
            "imagenet_similarity": similarity, "recommendation": rec, "why": why,
            "finetune_order": order,
            "budget": {"seconds": budget, "used": round(time.perf_counter() - t0, 2), "kept_for_finetunes": reserve,
                       "skipped": [r["name"] for r in rows if r["status"] == "skipped"]}}
