"""Short fine-tunes for ``advise``: ``featcache finetune``'s own training loop on the shared split, in bounded time.

Two cuts are tried: the last block, pretrained (fine-tune deeper layers, small learning rate),
and the last stage re-initialised (``--new-top``: reuse early layers, train new top layers). Each
trains on the first fold's training rows and is scored on its test rows, on as many of them as
the time left allows. The frozen prefix's activations come from the cache when it holds them
(``raw:`` taps, left by an earlier ``featcache finetune``), else from the images, one forward
pass each, in memory: advise never writes to the cache. The cost per image of both the prefix
and a training step is timed on the first images, and the subset is sized to fit; a cut that
cannot fit its minimum is skipped, saying so. Trained on a subset, a fine-tune is compared with
the frozen head trained on the same subset: a strategy is judged on equal data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FeatcacheError, UsageError
from ..extract.backbone import Backbone
from ..extract.decode import load_image
from ..extract.embedder import Embedder
from ..extract.registry import resolve
from ..store.cache import rows_of
from .data import Labelled, load_labelled
from .finetune import FinetuneConfig, Finetuner
from .measure import Outcome, OutOfBudget, head_outcome
from .splits import stratified_holdout

TEST_MAX = 400  # test rows a fine-tune is scored on at most
TEST_MIN = 50
MIN_TRAIN_PER_CLASS = 10  # a fine-tune on fewer images (per class, or MIN_TRAIN in all) is not worth measuring
MIN_TRAIN = 100
BATCH = 16  # images per prefix forward pass (one fixed shape: the frozen graph is optimised once)
SLACK = 0.8  # plan to use this share of the time left
MIN_SECONDS = 10.0  # below this left, a fine-tune is not even started (loading the backbone alone takes seconds)


class SubsetFinetuner(Finetuner):
    """``Finetuner.run`` on given prefix activations and test rows: records each test row's correctness, saves nothing."""

    def use(self, data: Labelled, paths: np.ndarray, test: np.ndarray) -> None:
        self._data, self._paths, self._test = data, paths, test
        self.test_correct = np.zeros(0, bool)

    def prefix_embedder(self) -> Embedder | None:
        return None  # the activations are given

    def cached_prefix(self, emb: Embedder | None) -> tuple[Labelled, np.ndarray]:
        return self._data, self._paths

    def test_mask(self, data: Labelled) -> np.ndarray:
        return self._test

    def evaluate(self, prefix, suffix, acts, paths, labels_idx, idx) -> float:
        ok = self.predict(prefix, suffix, acts, paths, idx) == labels_idx[idx]
        if np.array_equal(idx, np.flatnonzero(self._test)):
            self.test_correct = ok
        return float(ok.mean()) if len(ok) else 0.0

    def save(self, net, classes, result) -> str:
        return ""


def _take(y: np.ndarray, rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A stratified ``n`` of ``rows`` (all of them when n >= len(rows))."""
    if n >= len(rows):
        return rows
    return rows[stratified_holdout(y[rows], 1 - n / len(rows), seed)[0]]


def _images(paths: np.ndarray, pre, max_pixels: int) -> tuple[torch.Tensor, np.ndarray]:
    """The decoded batch and which paths decoded (a file moved or changed since extraction is left out)."""
    imgs, ok = [], np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        try:
            imgs.append(load_image(Path(p).read_bytes(), pre, max_pixels))
            ok[i] = True
        except (FeatcacheError, OSError):
            continue
    crop = pre.crop
    return (torch.stack(imgs) if imgs else torch.zeros((0, 3, crop, crop), dtype=torch.uint8)), ok


class _Prefix:
    """Prefix activations of chosen rows: read from the cache when there, else computed batch by batch."""

    def __init__(self, ft: Finetuner, ctx, emb: Embedder):
        self.ft, self.emb, self.tap = ft, emb, ft.raw_tap
        self.dim = int(np.prod(ft.raw_shape))
        table = ctx.cache.images()
        self.paths = table.path[rows_of(table.sha256, ctx.base.sha256)]
        self.cached = None
        if emb.fingerprint in ctx.cache.fingerprints() and self.tap in ctx.cache.group_attrs(emb.fingerprint)["taps"]:
            raw = load_labelled(ctx.cache, emb.fingerprint, self.tap, "keep")
            idx = rows_of(raw.sha256, ctx.base.sha256)
            if (idx >= 0).all():
                self.cached = (raw.X, idx)
        self.acts: dict[int, np.ndarray] = {}
        self.failed: set[int] = set()
        self.per_image = 0.0

    def compute(self, rows: np.ndarray) -> None:
        """Activations of ``rows`` not yet known; times the cost per image (after the first batch: tracing)."""
        todo = [int(r) for r in rows if int(r) not in self.acts and int(r) not in self.failed]
        if self.cached is not None:
            X, idx = self.cached
            for r in todo:
                self.acts[r] = np.asarray(X[idx[r]])
            return
        for s in range(0, len(todo), BATCH):
            part = np.asarray(todo[s : s + BATCH])
            t = time.perf_counter()
            batch, ok = _images(self.paths[part], self.emb.spec.preprocess, self.ft.cfg.max_pixels)
            out = self.emb.embed(batch, pad_to=BATCH)[self.tap] if len(batch) else np.zeros((0, self.dim), np.float32)
            for r, v in zip(part[ok], out):
                self.acts[int(r)] = v
            self.failed.update(int(r) for r in part[~ok])
            if self.acts and len(self.acts) > BATCH:  # the first batch also traces the graph
                self.per_image = (time.perf_counter() - t) / len(part)

    def known(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray([r for r in rows if int(r) in self.acts])


def _step_seconds(ft: Finetuner, acts: np.ndarray, y: np.ndarray, classes: int) -> float:
    """Seconds per image of one training step of the unfrozen part (timed on up to 32 rows).

    The random state is put back afterwards, so the run that follows is the one ``featcache finetune`` makes.
    """
    state = torch.get_rng_state()
    try:
        _, prefix, suffix = ft.build(classes)
        opt = torch.optim.AdamW(suffix.parameters(), lr=ft.cfg.lr)
        n = min(32, len(acts))
        t = time.perf_counter()
        ft.train_epoch(prefix, suffix, opt, acts, np.asarray([""] * len(acts)), y, np.arange(n))
        return (time.perf_counter() - t) / n
    finally:
        torch.set_rng_state(state)


def _score(ctx, ft: SubsetFinetuner, prefix: _Prefix, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, dict]:
    """``featcache finetune``'s loop trained on rows ``tr`` (10% of them for early stopping), scored on ``te``."""
    rows = np.concatenate([te, tr])
    base = ctx.base
    data = Labelled(prefix.emb.fingerprint, prefix.tap, np.stack([prefix.acts[int(r)] for r in rows]),
                    base.y[rows], base.sha256[rows], base.keys[rows])
    test = np.zeros(len(rows), bool)
    test[: len(te)] = True
    ft.use(data, prefix.paths[rows], test)
    result = ft.run()
    return ft.test_correct, {"epochs_run": len(result["history"])}


@dataclass(frozen=True)
class Cut:
    """A fine-tune advise tries: the last block, pretrained, or the last stage re-initialised (``--new-top``)."""

    new_top: bool
    share: float = 1.0  # of the time left, when measured within the budget
    epochs: int = FinetuneConfig.epochs


def config(ctx, cut: Cut) -> FinetuneConfig:
    """The ``featcache finetune`` configuration of ``cut`` for the advised backbone (loads it to find its blocks)."""
    name = ctx.attrs["backbone"].get("name")
    try:
        backbone = Backbone.load(resolve(name))
    except FeatcacheError as e:
        raise UsageError(f"cannot load backbone {name} to fine-tune it: {e}") from None
    stages = backbone.stage_blocks()
    unfreeze = max(stages, key=lambda s: stages[s].start) if cut.new_top else f"block{len(backbone.blocks) - 1}"
    return FinetuneConfig(cache=str(ctx.cache.root), out="", unfreeze_from=unfreeze, backbone=name,
                          new_top=cut.new_top, epochs=cut.epochs, seed=ctx.seed, progress=False)


def _start(ctx, cut: Cut) -> tuple[SubsetFinetuner, _Prefix]:
    ft = SubsetFinetuner(config(ctx, cut))
    return ft, _Prefix(ft, ctx, Finetuner.prefix_embedder(ft))


def _details(ctx, ft: Finetuner, prefix: _Prefix) -> dict:
    cfg = ft.cfg
    flags = (" --new-top" if cfg.new_top else "") + (f" --epochs {cfg.epochs}" if cfg.epochs != FinetuneConfig.epochs
                                                      else "") + (f" --seed {cfg.seed}" if cfg.seed else "")
    return {"unfreeze_from": cfg.unfreeze_from, "cut": ft.raw_tap, "command":
            f"featcache finetune --cache {ctx.cache_arg} --backbone {cfg.backbone} --unfreeze-from {cfg.unfreeze_from}"
            f"{flags} --out tuned-backbone  (then: featcache extract SOURCE --backbone tuned-backbone ...)",
            "prefix_source": "cache" if prefix.cached is not None else "images",
            "prefix_seconds_per_image": round(prefix.per_image, 4)}


def measure_within_budget(ctx, cut: Cut) -> Outcome:
    """The first fold, on as many of its rows as the cut's share of the time left allows.

    Trained on a subset, it carries the frozen head trained on the same subset (``Outcome.frozen``).
    """
    t0 = time.perf_counter()
    y = ctx.base.y
    classes = np.unique(y)
    tr, te = ctx.split.folds[0]
    ft, prefix = _start(ctx, cut)
    te_sel = _take(y, te, TEST_MAX, ctx.seed)
    prefix.compute(te_sel[: 2 * BATCH])  # the first batch traces; the second is timed
    first = prefix.known(te_sel[: 2 * BATCH])
    if len(first) == 0:
        raise UsageError(f"none of the first images of the test rows could be read for the {prefix.tap} prefix")
    y_first = np.searchsorted(classes, y[first])
    per_step = _step_seconds(ft, np.stack([prefix.acts[int(r)] for r in first]), y_first, len(classes))
    left = ctx.left() * cut.share * SLACK
    per_test = prefix.per_image + per_step / 3
    per_train = prefix.per_image + cut.epochs * per_step * 1.1  # + the validation passes
    floor = min(len(tr), max(MIN_TRAIN_PER_CLASS * len(classes), MIN_TRAIN))
    need = floor * per_train + min(len(te_sel), TEST_MIN) * per_test
    if need > left:
        raise OutOfBudget(f"needs about {need:.0f}s for {floor} training and {TEST_MIN} test images "
                          f"({prefix.per_image:.3f}s per image for the {prefix.tap} prefix, {per_step:.3f}s per "
                          f"training step and image); {max(0.0, left):.0f}s of the {max(0.0, ctx.left()):.0f}s "
                          "left were planned for it")
    n_te = int(min(len(te_sel), max(TEST_MIN, (left * 0.3) // max(per_test, 1e-9))))
    n_tr = int(min(len(tr), (left - n_te * per_test) // max(per_train, 1e-9)))
    if n_tr < floor:  # the minimum fits only with the fewest test images
        n_te = min(len(te_sel), TEST_MIN)
        n_tr = int(min(len(tr), (left - n_te * per_test) // max(per_train, 1e-9)))
    te_sel = _take(y, te_sel, n_te, ctx.seed)
    tr_sel = _take(y, tr, n_tr, ctx.seed)
    prefix.compute(np.concatenate([te_sel, tr_sel]))
    te_sel, tr_sel = prefix.known(te_sel), prefix.known(tr_sel)
    correct, details = _score(ctx, ft, prefix, tr_sel, te_sel)
    details |= _details(ctx, ft, prefix)
    frozen = None
    if len(tr_sel) < len(tr):  # compare with the frozen head trained on the same rows, not on more
        frozen = head_outcome(ctx.base.X, y, [(tr_sel, te_sel)], "logreg", ctx.seed).correct
        details["subset"] = (f"trained on {len(tr_sel)} of {len(tr)} training images (to fit the budget) and compared "
                             f"with the frozen logistic head trained on the same {len(tr_sel)}: {frozen.mean():.3f}; "
                             f"`featcache finetune` trains on all of them")
    elif len(te_sel) < len(te):
        details["subset"] = f"tested on {len(te_sel)} of the {len(te)} test images (to fit the budget)"
    return Outcome(te_sel, correct, time.perf_counter() - t0, len(tr_sel), details, frozen=frozen)


def measure_in_full(ctx, cut: Cut, folds: int | None = None) -> Outcome:
    """Every row of the first ``folds`` folds (all by default), no budget: what the strategy really scores."""
    t0 = time.perf_counter()
    ft, prefix = _start(ctx, cut)
    chosen = ctx.split.folds[: folds or len(ctx.split.folds)]
    prefix.compute(np.unique(np.concatenate([np.concatenate(f) for f in chosen])))
    rows, correct, epochs = [], [], []
    for tr, te in chosen:
        tr, te = prefix.known(tr), prefix.known(te)
        ok, details = _score(ctx, ft, prefix, tr, te)
        rows.append(te)
        correct.append(ok)
        epochs.append(details["epochs_run"])
    return Outcome(np.concatenate(rows), np.concatenate(correct), time.perf_counter() - t0,
                   max(len(tr) for tr, _ in chosen), _details(ctx, ft, prefix) | {"epochs_run": epochs})


def finetune_candidates(ctx, cell_late: str, cell_new_top: str) -> list:
    """The last block fine-tuned (pretrained) and the last stage re-initialised, as advise candidates.

    Their cut (which block, which stage) is found when they are measured: listing them loads nothing.
    """
    from .advise import Candidate

    out = []
    for name, cut, cell, strategy in (  # the late cut first, with most of the time left
            ("finetune@last-block", Cut(False, 0.6), cell_late, "fine-tune the last block (pretrained, lr x0.1)"),
            ("new-top@last-stage", Cut(True), cell_new_top, "new top layers: the last stage re-initialised")):
        out.append(Candidate(name, strategy, cell, None, lambda c: MIN_SECONDS,
                             lambda c, cut=cut: measure_within_budget(c, cut), config=cut))
    return out
