"""Build a backbone from its spec: load weights, expose pooled taps from one forward pass."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError, WeightsError
from .registry import RANDOM_WEIGHTS, sha256_file, weights_file, weights_present  # noqa: F401 - re-exported, torch-free homes
from .spec import BackboneSpec

log = logging.getLogger(__name__)


def sha256_state_dict(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _construct(spec: BackboneSpec, pretrained: bool, num_classes: int | None) -> nn.Module:
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if spec.family == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=pretrained, **kw)
    import torchvision

    return torchvision.models.get_model(spec.arch, weights="DEFAULT" if pretrained else None, **kw)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return sd


def _remap_in_order(sd: dict, target: dict, path: Path) -> dict:
    """EfficientNet-Lite files name keys differently from timm but match it in order and shape."""
    if len(sd) != len(target):
        raise WeightsError(f"{path}: {len(sd)} tensors, model expects {len(target)}")
    out = {}
    for (k, v), (tk, tv) in zip(sd.items(), target.items()):
        if tuple(v.shape) != tuple(tv.shape):
            raise WeightsError(f"{path}: tensor {k} has shape {tuple(v.shape)}, model's {tk} needs {tuple(tv.shape)}")
        out[tk] = v
    return out


def load_network(spec: BackboneSpec) -> tuple[nn.Module, str]:
    """The full network (classifier included) in eval mode, and its weights sha256."""
    w = spec.weights
    num_classes = spec.extra.get("num_classes")
    if w.kind in ("timm", "torchvision"):
        try:
            model = _construct(spec, pretrained=True, num_classes=None)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"downloading weights for {spec.arch} failed (offline?): {e}") from e
        return model.eval(), sha256_state_dict(model.state_dict())
    if w.kind == "random":
        torch.manual_seed(0)
        model = _construct(spec, pretrained=False, num_classes=num_classes)
        return model.eval(), RANDOM_WEIGHTS
    path = weights_file(spec)
    if path is None or not path.is_file():
        raise WeightsError(f"weights file {path} for {spec.name} does not exist")
    digest = sha256_file(path)
    if w.sha256 and digest != w.sha256:
        raise WeightsError(f"weights file {path} has sha256 {digest}, expected {w.sha256}; the file is damaged or another version")
    sd = _read_state_dict(path)
    model = _construct(spec, pretrained=False, num_classes=num_classes)
    if w.key_map == "efficientnet_lite":
        sd = _remap_in_order(sd, model.state_dict(), path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit {spec.family}:{spec.arch}: {str(e)[:500]}") from e
    return model.eval(), digest


RAW = "raw:"  # tap prefix: the stage's unpooled activations, flattened (the input of a partial fine-tune)
RAW_BLOCK = RAW + "block"  # raw:blockI: block I's output, for a fine-tune cut inside a stage


class TapModel(nn.Module):
    """Runs ``blocks`` in sequence and returns {tap name: (N, dim) features}.

    ``taps`` maps a block index to its stage name. A wanted ``stageN`` is that block's
    output, globally average-pooled; ``raw:stageN`` is the same output flattened, unpooled;
    ``final`` is ``pre_logits`` of the last block (pooling plus whatever the architecture
    applies before its classifier); ``raw:blockI`` is block I's output, flattened. Blocks
    after the deepest wanted tap are not run.
    """

    def __init__(self, blocks: list[nn.Module], taps: dict[int, str], pre_logits: nn.Module, wanted: list[str]):
        super().__init__()
        self.outputs: dict[int, list[tuple[str, bool]]] = {}
        for i, stage in taps.items():
            for name, raw in ((stage, False), (RAW + stage, True)):
                if name in wanted:
                    self.outputs.setdefault(i, []).append((name, raw))
        for name in wanted:
            if name.startswith(RAW_BLOCK):
                self.outputs.setdefault(int(name[len(RAW_BLOCK):]), []).append((name, True))
        self.run_all = "final" in wanted
        last = max(self.outputs, default=-1)
        self.blocks = nn.ModuleList(blocks if self.run_all else blocks[: last + 1])
        self.pre_logits = pre_logits

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            for name, raw in self.outputs.get(i, ()):
                out[name] = x.float().flatten(1) if raw else x.float().mean((2, 3))
        if self.run_all:
            out["final"] = self.pre_logits(x).float()
        return out


class _TimmStem(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.parts = nn.ModuleList([getattr(model, n) for n in names if hasattr(model, n)])

    def forward(self, x):
        for p in self.parts:
            x = p(x)
        return x


class _TimmPreLogits(nn.Module):
    def __init__(self, model: nn.Module, tail: list[str]):
        super().__init__()
        self.tail = nn.ModuleList([getattr(model, n) for n in tail if hasattr(model, n)])
        self.model = model

    def forward(self, x):
        for t in self.tail:
            x = t(x)
        return self.model.forward_head(x, pre_logits=True)


class _PoolFlatten(nn.Module):
    def __init__(self, before: nn.Module | None = None, after: nn.Module | None = None):
        super().__init__()
        self.before = before or nn.Identity()
        self.after = after or nn.Identity()

    def forward(self, x):
        x = self.before(x)
        return self.after(x.mean((2, 3), keepdim=True)).flatten(1)


def _reduction_taps(blocks: list[nn.Module], size: int) -> dict[int, str]:
    """Tap the last block of each spatial resolution (the classic 'stage' boundaries)."""
    x = torch.zeros(1, 3, size, size)
    sizes = []
    with torch.no_grad():
        for b in blocks:
            x = b(x)
            sizes.append(x.shape[-1])
    taps, stage = {}, 0
    for i in range(len(blocks) - 1):
        if sizes[i + 1] != sizes[i]:
            stage += 1
            taps[i] = f"stage{stage}"
    taps[len(blocks) - 1] = f"stage{stage + 1}"
    return taps


def decompose(spec: BackboneSpec, model: nn.Module) -> tuple[list[nn.Module], dict[int, str], nn.Module, nn.Module | None]:
    """Split a network into (blocks, stage taps, pre-logits, classifier on the final tap)."""
    size = spec.preprocess.crop
    if spec.family == "timm":
        if not hasattr(model, "blocks") and not hasattr(model, "stages"):
            raise UsageError(f"timm:{spec.arch} has no blocks/stages sequence featcache can tap")
        seq = list(getattr(model, "blocks", None) or model.stages)
        # one entry per block (EfficientNet/MobileNet stages are Sequentials), so a fine-tune can cut inside a stage
        seq = [b for s in seq for b in (s if isinstance(s, nn.Sequential) else [s])]
        stem = _TimmStem(model, ["conv_stem", "bn1", "stem"])
        blocks = [stem, *seq]
        tail = ["conv_head", "bn2", "norm_pre"]
        pre = _TimmPreLogits(model, tail)
        taps = _reduction_taps(blocks, size)
        return blocks, taps, pre, model.get_classifier()
    m = model
    if hasattr(m, "layer4"):  # resnet, resnext, wide_resnet: one entry per bottleneck
        blocks = [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), *m.layer1, *m.layer2, *m.layer3, *m.layer4]
        return blocks, _reduction_taps(blocks, size), _PoolFlatten(), m.fc
    if hasattr(m, "trunk_output"):  # regnet
        blocks = [m.stem, *m.trunk_output]
        return blocks, _reduction_taps(blocks, size), _PoolFlatten(), m.fc
    if hasattr(m, "features"):
        blocks = list(m.features)
        taps = _reduction_taps(blocks, size)
        arch = spec.arch
        if arch.startswith("densenet"):
            return blocks, taps, _PoolFlatten(before=nn.ReLU()), m.classifier
        if arch.startswith("convnext"):
            return blocks, taps, _PoolFlatten(after=m.classifier[0]), m.classifier[-1]
        if arch.startswith("vgg"):
            return blocks, taps, _PoolFlatten(), None
        return blocks, taps, _PoolFlatten(), m.classifier
    raise UsageError(f"featcache does not know how to tap torchvision:{spec.arch}")


@dataclass
class Backbone:
    """A loaded backbone: the tap model, its ImageNet classifier (if any) and facts about it."""

    spec: BackboneSpec
    network: nn.Module
    weights_sha256: str
    blocks: list[nn.Module]
    stage_taps: dict[int, str]
    pre_logits: nn.Module
    classifier: nn.Module | None
    shapes: dict[str, tuple[int, ...]]  # tap -> per-image output shape (C,) or (C, H, W) for raw taps
    block_shapes: list[tuple[int, ...]]  # each block's output (C, H, W)

    @classmethod
    def load(cls, spec: BackboneSpec) -> Backbone:
        network, digest = load_network(spec)
        blocks, taps, pre, clf = decompose(spec, network)
        size = spec.preprocess.crop
        shapes: dict[str, tuple[int, ...]] = {}
        block_shapes = []
        x = torch.zeros(1, 3, size, size)
        with torch.no_grad():
            for i, block in enumerate(blocks):
                x = block(x)
                block_shapes.append(tuple(x.shape[1:]))
                if i in taps:
                    shapes[taps[i]], shapes[RAW + taps[i]] = (x.shape[1],), tuple(x.shape[1:])
            shapes["final"] = tuple(pre(x).shape[1:])
        return cls(spec, network, digest, blocks, taps, pre, clf, shapes, block_shapes)

    @property
    def tap_names(self) -> list[str]:
        return list(self.shapes)

    def tap_shape(self, tap: str) -> tuple[int, ...]:
        """Per-image output shape of a tap; raises a UsageError naming the valid taps."""
        index = tap[len(RAW_BLOCK):] if tap.startswith(RAW_BLOCK) else ""
        if index.isdigit() and int(index) < len(self.blocks):
            return self.block_shapes[int(index)]
        if tap not in self.shapes:
            raise UsageError(f"unknown tap {tap!r} for {self.spec.name}; available: {self.tap_names} "
                             f"and raw:block0..raw:block{len(self.blocks) - 1}")
        return self.shapes[tap]

    def stage_blocks(self) -> dict[str, range]:
        """Stage name -> the block indices it spans."""
        out, first = {}, 0
        for last, name in sorted(self.stage_taps.items()):
            out[name] = range(first, last + 1)
            first = last + 1
        return out

    def first_block(self, where: str) -> int:
        """Block index of ``stageN`` (its first block) or ``blockI``."""
        stages = self.stage_blocks()
        if where in stages:
            return stages[where].start
        if where.startswith("block") and where[5:].isdigit() and int(where[5:]) < len(self.blocks):
            return int(where[5:])
        spans = ", ".join(f"{k}=block{r.start}..{r.stop - 1}" for k, r in stages.items())
        raise UsageError(f"{self.spec.name} has no stage or block {where!r}: use a stage or block0..block"
                         f"{len(self.blocks) - 1} ({spans})")

    def tap_model(self, taps: list[str]) -> TapModel:
        for t in taps:
            self.tap_shape(t)
        return TapModel(self.blocks, self.stage_taps, self.pre_logits, taps).eval()

    def early_convolutions(self) -> int:
        """How many convolutions the blocks at 1/2 and 1/4 of the input size hold (int8 keeps these in fp32).

        In mobile networks they lose the most to 8-bit weights and cost little (benchmarks/int8_scan.py).
        """
        crop = self.spec.preprocess.crop
        early = [b for b, s in zip(self.blocks, self.block_shapes) if s[-1] * 4 >= crop]
        return sum(isinstance(m, nn.Conv2d) for b in early for m in b.modules())

    def tap_dims(self, taps: list[str] | None = None) -> dict[str, int]:
        return {k: math.prod(self.tap_shape(k)) for k in (taps or self.shapes)}
