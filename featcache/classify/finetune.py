"""Partial unfreeze: fine-tune the deeper stages while the early ones stay frozen.

The frozen prefix (every block before ``unfreeze_from``, a stage or a single block) runs
once per image: its output is stored in the Zarr cache as the tap ``raw:stageK`` (or
``raw:blockI`` for a cut inside a stage) under the backbone's own
fingerprint, so each epoch runs only the unfrozen stages and the new head. With
``augment`` the prefix is recomputed on augmented images every epoch instead; ``mixup``
(and ``label_smoothing``) regularise the cached path itself, mixing activations at the cut. With
``new_top`` the stages after the cut are re-initialised (the "reuse early layers, train
new top layers" cell of the transfer-learning matrix).

BatchNorm policy: frozen layers are never in the training graph (cached) or run in eval
mode under ``no_grad`` (augment), so their running statistics cannot change. Unfrozen
layers follow ``bn``: ``train`` (batch statistics, running stats updated) or ``frozen``
(eval mode, pretrained statistics kept).

The result is a backbone directory (``backbone.json`` + ``weights.safetensors``) that
``featcache extract --backbone DIR`` and everything after it accept like any other.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..extract.backbone import RAW, RAW_BLOCK, Backbone, decompose
from ..extract.decode import DEFAULT_MAX_PIXELS, load_image
from ..extract.embedder import Embedder
from ..extract.pipeline import ExtractConfig, Extraction, cached_images
from ..extract.registry import DEFAULT_BACKBONE, resolve
from ..hashing import sha256_file
from ..runtime import available_cpus
from ..store.cache import FeatureCache, rows_of
from .data import Labelled, load_labelled, source_split
from .schedule import warmup_cosine
from .splits import stratified_holdout


@dataclass
class FinetuneConfig:
    cache: str
    out: str
    unfreeze_from: str = "stage5"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    epochs: int = 10
    lr: float = 3e-3  # the new head's learning rate
    backbone_lr_mult: float = 0.1  # pretrained unfrozen layers get lr * this
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    batch_size: int = 64
    val_fraction: float = 0.1
    patience: int = 3
    seed: int = 0
    augment: bool = False
    mixup: float = 0.0  # Beta(a, a) mixup of the activations at the cut (and of the labels); 0: off
    label_smoothing: float = 0.0
    new_top: bool = False
    bn: str = "train"
    recompute_prefix: bool = False  # run the frozen prefix every step (the slow baseline) instead of the cache
    test_source: str | None = None
    max_train: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS  # as for extract: a per-run limit skips work, never marks stored rows failed
    progress: bool = True


class Suffix(nn.Module):
    """The trainable part: unfrozen stages -> pre-logits -> new classifier."""

    def __init__(self, blocks: list[nn.Module], pre_logits: nn.Module, head: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pre_logits = pre_logits
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(self.blocks(x)))


def _replace_classifier(backbone: Backbone, net: nn.Module, classes: int) -> None:
    if backbone.spec.family == "timm":
        net.reset_classifier(classes)
    elif hasattr(net, "fc"):
        net.fc = nn.Linear(net.fc.in_features, classes)
    elif isinstance(getattr(net, "classifier", None), nn.Sequential) and isinstance(net.classifier[-1], nn.Linear):
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, classes)
    else:
        raise UsageError(f"featcache cannot replace the classifier of {backbone.spec.arch}")


def _reinit(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class Finetuner:
    def __init__(self, cfg: FinetuneConfig):
        if cfg.bn not in ("train", "frozen"):
            raise UsageError(f"--bn must be train or frozen, got {cfg.bn!r}")
        if cfg.mixup < 0 or not 0 <= cfg.label_smoothing < 1:
            raise UsageError(f"--mixup must be >= 0 and --label-smoothing in [0, 1), got {cfg.mixup}, {cfg.label_smoothing}")
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(available_cpus())
        self.base = Backbone.load(resolve(cfg.backbone, cfg.weights))
        start = self.base.first_block(cfg.unfreeze_from)
        if start == 0:
            raise UsageError(f"--unfreeze-from {cfg.unfreeze_from}: nothing would stay frozen; choose a later stage")
        self.cut = start - 1  # last frozen block
        stage = self.base.stage_taps.get(self.cut)
        self.raw_tap = RAW + stage if stage else f"{RAW_BLOCK}{self.cut}"
        self.raw_shape = self.base.tap_shape(self.raw_tap)
        self._mix_rng = np.random.default_rng(cfg.seed)

    # -- data ------------------------------------------------------------------
    def prefix_embedder(self) -> Embedder:
        return Embedder(self.base, [self.raw_tap], "cpu", "fp32")

    def cached_prefix(self, emb: Embedder) -> tuple[Labelled, np.ndarray]:
        """The cache's labelled images with X = prefix activations (n, C*H*W), computed once; and their paths."""
        cfg = ExtractConfig(None, self.cfg.cache, taps=[self.raw_tap], progress=self.cfg.progress,
                            max_pixels=self.cfg.max_pixels)
        Extraction(cfg, emb).run(cached_images(FeatureCache(self.cfg.cache)))
        cache = FeatureCache(self.cfg.cache)
        data = load_labelled(cache, emb.fingerprint, self.raw_tap)
        table = cache.images()
        return data, table.path[rows_of(table.sha256, data.sha256)]

    def test_mask(self, data: Labelled) -> np.ndarray:
        """Rows in ``--test-source`` (matched as ``featcache train`` matches them)."""
        test = np.zeros(len(data), bool)
        if self.cfg.test_source:
            test[source_split(data, self.cfg.test_source)[1]] = True
        return test

    # -- training --------------------------------------------------------------
    def build(self, classes: int) -> tuple[nn.Module, nn.Module, Suffix]:
        """(whole network copy, frozen prefix, trainable suffix sharing the network's modules)."""
        net = copy.deepcopy(self.base.network)
        _replace_classifier(self.base, net, classes)
        blocks, _, pre, clf = decompose(self.base.spec, net)
        prefix = nn.Sequential(*blocks[: self.cut + 1]).eval()
        for p in prefix.parameters():
            p.requires_grad_(False)
        suffix = Suffix(blocks[self.cut + 1 :], pre, clf)
        if self.cfg.new_top:
            _reinit(suffix.blocks)
        # channels-last runs MobileNet/EfficientNet-style convolutions ~1.4x faster on CPU (training too)
        prefix.to(memory_format=torch.channels_last)
        suffix.to(memory_format=torch.channels_last)
        return net, prefix, suffix

    def _train_mode(self, suffix: Suffix, prefix: nn.Module) -> None:
        suffix.train()
        prefix.eval()  # a timm pre-logits module can reach the whole network: frozen layers stay in eval
        if self.cfg.bn == "frozen":
            for m in suffix.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _inputs(self, prefix: nn.Module, acts: np.ndarray, paths: np.ndarray, idx: np.ndarray, train: bool) -> torch.Tensor:
        if not (self.cfg.augment and train) and not self.cfg.recompute_prefix:
            x = torch.from_numpy(acts[idx]).view(len(idx), *self.raw_shape)
            return x.contiguous(memory_format=torch.channels_last)
        pre = self.base.spec.preprocess
        imgs = torch.stack([load_image(Path(p).read_bytes(), pre, self.cfg.max_pixels) for p in paths[idx]])
        if self.cfg.augment and train:
            flip = torch.rand(len(imgs)) < 0.5
            imgs[flip] = imgs[flip].flip(-1)
            shift = np.random.randint(-8, 9, size=2)
            imgs = torch.roll(imgs, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        x = (imgs.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return prefix(x)

    def train_epoch(self, prefix: nn.Module, suffix: Suffix, opt: torch.optim.Optimizer, acts: np.ndarray,
                    paths: np.ndarray, y: np.ndarray, order: np.ndarray, sched=None) -> float:
        """One pass over ``order`` in mini-batches; returns the mean training loss."""
        self._train_mode(suffix, prefix)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        total, t0, report = 0.0, time.perf_counter(), max(1, len(order) // 10)
        for s in range(0, len(order), self.cfg.batch_size):
            part = order[s : s + self.cfg.batch_size]
            x, target = self._inputs(prefix, acts, paths, part, True), torch.from_numpy(y[part])
            if self.cfg.mixup > 0:  # mixup at the cut: works on cached activations, unlike image augmentation
                lam, perm = float(self._mix_rng.beta(self.cfg.mixup, self.cfg.mixup)), torch.randperm(len(part))
                out = suffix(lam * x + (1 - lam) * x[perm])
                loss = lam * loss_fn(out, target) + (1 - lam) * loss_fn(out, target[perm])
            else:
                loss = loss_fn(suffix(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(part)
            done = s + len(part)
            if self.cfg.progress and done // report != s // report and done < len(order):
                rate = done / (time.perf_counter() - t0)
                print(f"  {done}/{len(order)} images  loss {total / done:.4f}  {rate:.0f} img/s  "
                      f"ETA {(len(order) - done) / rate:.0f}s", flush=True)
        return total / len(order)

    def predict(self, prefix, suffix, acts, paths, idx) -> np.ndarray:
        """Predicted class index of each row in ``idx`` (eval mode, no gradients)."""
        suffix.eval()
        out = [np.zeros(0, np.int64)]
        with torch.no_grad():
            for s in range(0, len(idx), 256):
                out.append(suffix(self._inputs(prefix, acts, paths, idx[s : s + 256], False)).argmax(1).numpy())
        return np.concatenate(out)

    def evaluate(self, prefix, suffix, acts, paths, labels_idx, idx) -> float:
        return float((self.predict(prefix, suffix, acts, paths, idx) == labels_idx[idx]).sum()) / max(1, len(idx))

    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        emb = self.prefix_embedder()
        data, paths = self.cached_prefix(emb)
        acts, labels = data.X, data.y
        prefix_seconds = time.perf_counter() - t0
        classes = sorted(set(labels.tolist()))
        if len(classes) < 2:
            raise UsageError("fine-tuning needs at least two labelled classes in the cache")
        y = np.searchsorted(classes, labels)
        test = self.test_mask(data)
        rows = np.flatnonzero(~test)  # train and validation rows come from outside the test set
        keep, held = stratified_holdout(labels[rows], cfg.val_fraction, cfg.seed)
        train_idx, val_idx = rows[keep], rows[held]
        if cfg.max_train:
            train_idx = np.random.default_rng(cfg.seed).permutation(train_idx)[: cfg.max_train]
        net, prefix, suffix = self.build(len(classes))
        head_ids = {id(p) for p in suffix.head.parameters()}
        pretrained = [p for p in dict.fromkeys(suffix.parameters()) if p.requires_grad and id(p) not in head_ids]
        mult = 1.0 if cfg.new_top else cfg.backbone_lr_mult
        opt = torch.optim.AdamW([{"params": pretrained, "lr": cfg.lr * mult},
                                 {"params": suffix.head.parameters(), "lr": cfg.lr}], weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
        warmup, total = int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, total))
        rng = np.random.default_rng(cfg.seed)
        history, best, best_state, stale = [], -1.0, None, 0
        for epoch in range(1, cfg.epochs + 1):
            te = time.perf_counter()
            loss = self.train_epoch(prefix, suffix, opt, acts, paths, y, rng.permutation(train_idx), sched)
            train_seconds = time.perf_counter() - te
            val_acc = self.evaluate(prefix, suffix, acts, paths, y, val_idx) if len(val_idx) else float("nan")
            row = {"epoch": epoch, "loss": loss, "val_accuracy": val_acc,
                   "epoch_seconds": round(train_seconds, 2)}
            history.append(row)
            if cfg.progress:
                print(f"epoch {epoch}/{cfg.epochs}  loss {row['loss']:.4f}  val acc {val_acc:.4f}  "
                      f"{train_seconds:.1f}s", flush=True)
            if val_acc > best:
                best, best_state, stale = val_acc, copy.deepcopy(suffix.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        if best_state is not None:
            suffix.load_state_dict(best_state)
        test_acc = self.evaluate(prefix, suffix, acts, paths, y, np.flatnonzero(test)) if test.any() else None
        result = {"classes": classes, "train": len(train_idx), "val": len(val_idx), "test": int(test.sum()),
                  "best_val_accuracy": best, "test_accuracy": test_acc, "history": history,
                  "prefix_tap": self.raw_tap, "prefix_seconds": round(prefix_seconds, 2),
                  "train_seconds": round(sum(h["epoch_seconds"] for h in history), 2),
                  "wall_seconds": round(time.perf_counter() - t0, 1)}  # prefix, epochs, validation and test
        result["backbone_dir"] = self.save(net.eval(), classes, result)
        return result

    def save(self, net: nn.Module, classes: list[str], result: dict) -> str:
        from safetensors.torch import save_file

        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        weights = out / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        spec = self.base.spec
        meta = {
            "featcache_backbone": {"format": 1},
            "family": spec.family, "arch": spec.arch, "preprocess": asdict(spec.preprocess),
            "weights_file": weights.name, "weights_sha256": sha256_file(weights),
            "num_classes": len(classes), "labels": classes,
            "description": f"{spec.name} fine-tuned from {self.cfg.unfreeze_from}"
                           f"{' (new top)' if self.cfg.new_top else ''} on {self.cfg.cache}",
            "base_backbone": spec.describe(), "config": {k: v for k, v in asdict(self.cfg).items() if k != "progress"},
            "metrics": {k: result[k] for k in ("best_val_accuracy", "test_accuracy", "train_seconds")},
        }
        (out / "backbone.json").write_text(json.dumps(meta, indent=2))
        return str(out)


def finetune(cfg: FinetuneConfig) -> dict:
    return Finetuner(cfg).run()
