"""Backbone specs: architecture + weights source + preprocessing + taps, and the fingerprint.

Preprocessing travels with the weights: a spec is the only place that says how images
must be prepared for its network, so no caller can pair weights with the wrong transform.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

# Bumped whenever decode.py changes what pixels come out for the same bytes.
DECODER = "featcache-decode-v1:torchvision-jpeg+pillow,torch-resize-aa"
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, center-crop ``crop``, scale to [0,1], normalise."""

    resize: int
    crop: int
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels composite onto this

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Inverse of ``dataclasses.asdict`` (as stored in JSON manifests)."""
        return cls(d["resize"], d["crop"], d["interpolation"], tuple(d["mean"]), tuple(d["std"]),
                   tuple(d.get("background", (255, 255, 255))))

    @classmethod
    def from_crop_pct(cls, size: int, crop_pct: float, interpolation: str, mean, std) -> Preprocess:
        return cls(int(size / crop_pct), size, interpolation, tuple(mean), tuple(std))


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from. ``kind``: package | file | torchvision | timm | random."""

    kind: str
    ref: str = ""
    sha256: str | None = None  # expected digest; checked when the file is loaded
    key_map: str | None = None  # name of a state-dict remapping (see weights.py)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "timm" | "torchvision"
    arch: str
    weights: WeightsSource
    preprocess: Preprocess
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def with_weights(self, weights: WeightsSource) -> BackboneSpec:
        return replace(self, weights=weights)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "arch": self.arch,
            "weights": asdict(self.weights),
            "preprocess": asdict(self.preprocess),
            "description": self.description,
            "extra": self.extra,
        }


def fingerprint(spec: BackboneSpec, weights_sha256: str, precision: str, runtime: str = "torch",
                quantization: dict | None = None) -> tuple[str, dict]:
    """Hash of everything that changes the numbers; returns (short hex, canonical description).

    The backbone's *name* is left out on purpose: the same architecture, weights and
    preprocessing under two names give the same vectors and share a cache. So is the runtime
    where it gives the same numbers: OpenVINO fp32 matches torch fp32 to cosine 1 - 1e-7
    (tests/test_runtimes.py), so both share a fingerprint; its bf16 and int8 do not (the
    torch descriptions stay as they always were). int8 adds how it was quantised and on which
    calibration images.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if (precision == "int8") != (quantization is not None):
        raise ValueError("int8, and only int8, needs the quantisation record (method and calibration set)")
    canon = {
        "arch": f"{spec.family}:{spec.arch}",
        "weights_sha256": weights_sha256,
        "preprocess": asdict(spec.preprocess),
        "decoder": DECODER,
        "precision": precision,
        "pooling": "avg",
    }
    if runtime != "torch" and precision != "fp32":
        canon["runtime"] = runtime
    if quantization is not None:
        canon["quantization"] = quantization
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20], json.loads(blob)
