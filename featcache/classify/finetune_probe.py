"""Short fine-tunes for ``advise``: ``featcache finetune``'s own training loop on the shared split, in bounded time.

Two cuts are tried: the last block, pretrained (fine-tune deeper layers, small learning rate),
and the last stage re-initialised (``--new-top``: reuse early layers, train new top layers). Each
trains on the first fold's training rows and is scored on its test rows, on as many of them as
the time left allows. The frozen prefix's activations come from the cache when it holds them
(``raw:`` taps, left by an earlier ``featcache finetune``), else from the images, one forward
pass each, in memory, once: every epoch reuses them (advise never writes to the cache). The cost per
image of both the prefix and a training step is timed on the first images, and the run is sized to
fit its share of the time left (``plan``): fewer epochs (down to ``MIN_EPOCHS``, the warm-up
shortened in proportion), then fewer training images (down to ``MIN_TRAIN``), then fewer test images
(down to ``TEST_MIN``); a cut that cannot fit even that is skipped, saying what it would need. The
training steps run on every CPU, or on one thread when that was timed faster (a machine other work
keeps busy). A short run's BatchNorm running
statistics lag behind its weights (a re-initialised stage starts from mean 0, variance 1), so before
each evaluation they are re-estimated on training images (``RECALIBRATE``); ``featcache finetune``
runs long enough not to need it. Trained on a subset, a fine-tune is compared with the frozen head
trained on the same subset: a strategy is judged on equal data. What it ran with (images, epochs)
is reported with its figure; its command is the full fine-tune.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
MIN_EPOCHS = 3  # a run sized to the budget trains at least this many epochs (the command: the full number)
RECALIBRATE = 64  # training images the BatchNorm statistics are re-estimated on before each evaluation of a short run


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

    recalibrate: int = 0  # > 0: re-estimate BatchNorm running statistics on this many training rows first

    def evaluate(self, prefix, suffix, acts, paths, labels_idx, idx) -> float:
        if self.recalibrate:
            train = np.flatnonzero(~self._test)
            self._recalibrate(prefix, suffix, acts, paths, train[~np.isin(train, idx)][: self.recalibrate])
        ok = self.predict(prefix, suffix, acts, paths, idx) == labels_idx[idx]
        if np.array_equal(idx, np.flatnonzero(self._test)):
            self.test_correct = ok
        return float(ok.mean()) if len(ok) else 0.0

    def save(self, net, classes, result) -> str:
        return ""

    def _recalibrate(self, prefix, suffix, acts, paths, rows: np.ndarray) -> None:
        """The unfrozen BatchNorm layers' running statistics, recomputed as plain averages over ``rows``."""
        if self.cfg.bn != "train" or not len(rows):
            return
        suffix.train()
        bns = [m for m in suffix.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momentum = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        with torch.no_grad():
            for s in range(0, len(rows), self.cfg.batch_size):
                suffix(self._inputs(prefix, acts, paths, rows[s : s + self.cfg.batch_size], False))
        for m, mom in zip(bns, momentum):
            m.momentum = mom


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


def _step_seconds(ft: Finetuner, acts: np.ndarray, y: np.ndarray, classes: int, n: int = 32) -> float:
    """Seconds per image of one training step of the unfrozen part (timed on up to ``n`` rows).

    The random state is put back afterwards, so the run that follows is the one ``featcache finetune`` makes.
    """
    state = torch.get_rng_state()
    try:
        _, prefix, suffix = ft.build(classes)
        opt = torch.optim.AdamW(suffix.parameters(), lr=ft.cfg.lr)
        n = min(n, len(acts))
        t = time.perf_counter()
        ft.train_epoch(prefix, suffix, opt, acts, np.asarray([""] * len(acts)), y, np.arange(n))
        return (time.perf_counter() - t) / n
    finally:
        torch.set_rng_state(state)


def _threads_and_step(ft: Finetuner, acts: np.ndarray, y: np.ndarray, classes: int) -> tuple[int, float]:
    """(torch threads, seconds per training step and image) for the run: every CPU, or one thread when that is
    faster (on a machine other work keeps busy, threads that wait for each other cost more than they bring)."""
    threads = torch.get_num_threads()
    _step_seconds(ft, acts, y, classes, 4)  # the first step allocates and picks kernels: not counted
    best = (_step_seconds(ft, acts, y, classes, 16), threads)
    if threads > 1:
        torch.set_num_threads(1)
        best = min(best, (_step_seconds(ft, acts, y, classes, 16), 1))
        torch.set_num_threads(best[1])
    return best[1], best[0]


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


def plan(left: float, per_prefix: float, per_step: float, per_test: float, n_tr: int, n_te: int, floor: int,
         epochs: int) -> tuple[int, int, int] | None:
    """(training images, test images, epochs) that fit ``left`` seconds, or None when even the minimum does not.

    Images before epochs: as many training images as fit ``MIN_EPOCHS`` (at least ``floor``), and when all of
    them fit, as many epochs as fit (up to ``epochs``): a short run with its BatchNorm statistics re-estimated
    fits its images in a few epochs, while a few images are too few to learn from. About 30 % of the time goes
    to test images (``TEST_MIN`` or more, as many as given when there is time).
    """
    lo = min(epochs, MIN_EPOCHS)
    for tests in (int(min(n_te, max(TEST_MIN, (left * 0.3) // max(per_test, 1e-9)))), min(n_te, TEST_MIN)):
        room = left - tests * per_test

        def fits(e: int, room: float = room) -> int:
            return int(min(n_tr, room // max(per_prefix + e * per_step * 1.1, 1e-9)))  # + the validation passes

        if fits(lo) < floor:
            continue
        if fits(lo) < n_tr:
            return fits(lo), tests, lo
        return n_tr, tests, max(e for e in range(lo, epochs + 1) if fits(e) >= n_tr)
    return None


def measure_within_budget(ctx, cut: Cut) -> Outcome:
    """The first fold, sized to the fine-tune's share of the time left (``ctx.share``): its epochs, its rows.

    Trained on a subset, it carries the frozen head trained on the same subset (``Outcome.frozen``).
    """
    t0 = time.perf_counter()
    y = ctx.base.y
    classes = np.unique(y)
    tr, te = ctx.split.folds[0]
    left = max(0.0, ctx.left()) * ctx.share  # this fine-tune's part, counted from its start
    ft, prefix = _start(ctx, cut)
    te_sel = _take(y, te, TEST_MAX, ctx.seed)
    prefix.compute(te_sel[: 2 * BATCH])  # the first batch traces; the second is timed
    first = prefix.known(te_sel[: 2 * BATCH])
    if len(first) == 0:
        raise UsageError(f"none of the first images of the test rows could be read for the {prefix.tap} prefix")
    y_first = np.searchsorted(classes, y[first])
    threads = torch.get_num_threads()
    try:
        used, per_step = _threads_and_step(ft, np.stack([prefix.acts[int(r)] for r in first]), y_first, len(classes))
        return _sized(ctx, cut, ft, prefix, te_sel, t0, left, per_step, used)
    finally:
        torch.set_num_threads(threads)


def _sized(ctx, cut: Cut, ft: SubsetFinetuner, prefix: _Prefix, te_sel: np.ndarray, t0: float, left: float,
           per_step: float, threads: int) -> Outcome:
    """The run ``measure_within_budget`` timed, planned into ``left`` seconds (``te_sel``: its test rows at most)."""
    y = ctx.base.y
    classes = np.unique(y)
    tr, te = ctx.split.folds[0]
    left = (left - (time.perf_counter() - t0)) * SLACK
    per_test = prefix.per_image + per_step / 3
    floor = min(len(tr), max(MIN_TRAIN_PER_CLASS * len(classes), MIN_TRAIN))
    sized = plan(left, prefix.per_image, per_step, per_test, len(tr), len(te_sel), floor, cut.epochs)
    if sized is None:
        e = min(cut.epochs, MIN_EPOCHS)
        need = floor * (prefix.per_image + e * per_step * 1.1) + min(len(te_sel), TEST_MIN) * per_test
        raise OutOfBudget(f"needs about {need:.0f}s for {e} epochs on {floor} training and {TEST_MIN} test images "
                          f"({prefix.per_image:.3f}s per image for the {prefix.tap} prefix, computed once; "
                          f"{per_step:.3f}s per training step and image); {max(0.0, left):.0f}s of the "
                          f"{max(0.0, ctx.left()):.0f}s left were planned for it")
    n_tr, n_te, epochs = sized
    te_sel = _take(y, te_sel, n_te, ctx.seed)
    tr_sel = _take(y, tr, n_tr, ctx.seed)
    prefix.compute(np.concatenate([te_sel, tr_sel]))  # once: every epoch reuses these activations
    te_sel, tr_sel = prefix.known(te_sel), prefix.known(tr_sel)
    short = epochs < cut.epochs or len(tr_sel) < len(tr)
    full = ft.cfg
    # the full run's schedule, compressed: the same share of warm-up
    ft.cfg = replace(full, epochs=epochs, warmup_epochs=full.warmup_epochs * epochs / cut.epochs)
    ft.recalibrate = RECALIBRATE if short else 0
    correct, details = _score(ctx, ft, prefix, tr_sel, te_sel)
    warmup, ft.cfg = ft.cfg.warmup_epochs, full  # the command: the full fine-tune
    details |= _details(ctx, ft, prefix)
    details["measured_with"] = {"train_images": int(len(tr_sel)), "of_train_images": int(len(tr)),
                                "test_images": int(len(te_sel)), "of_test_images": int(len(te)), "epochs": epochs,
                                "full_epochs": cut.epochs, "warmup_epochs": round(warmup, 3),
                                "batchnorm_recalibrated": bool(ft.recalibrate),
                                "torch_threads": threads,
                                "planned_seconds": round(left / SLACK, 1)}
    ran = f"{epochs} epoch{'s' if epochs != 1 else ''} at most" + (f" (the command: {cut.epochs})"
                                                                   if epochs < cut.epochs else "")
    frozen = None
    if len(tr_sel) < len(tr):  # compare with the frozen head trained on the same rows, not on more
        frozen = head_outcome(ctx.base.X, y, [(tr_sel, te_sel)], "logreg", ctx.seed).correct
        details["subset"] = (f"trained {ran} on {len(tr_sel)} of {len(tr)} training images and tested on "
                             f"{len(te_sel)} of {len(te)} (to fit the budget); compared with the frozen logistic "
                             f"head trained on the same {len(tr_sel)}: {frozen.mean():.3f}; `featcache finetune` "
                             f"trains on all of them")
    elif len(te_sel) < len(te) or epochs < cut.epochs:
        details["subset"] = f"trained {ran} and tested on {len(te_sel)} of the {len(te)} test images (to fit the budget)"
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
    from .advise import MIN_FT_SECONDS, Candidate

    out = []
    for name, cut, cell, strategy in (  # advise orders them by what the probes showed (``advise.finetune_order``)
            ("finetune@last-block", Cut(False), cell_late, "fine-tune the last block (pretrained, lr x0.1)"),
            ("new-top@last-stage", Cut(True), cell_new_top, "new top layers: the last stage re-initialised")):
        out.append(Candidate(name, strategy, cell, None, lambda c: MIN_FT_SECONDS,
                             lambda c, cut=cut: measure_within_budget(c, cut), config=cut))
    return out
