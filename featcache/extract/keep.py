"""Which feature group a run keeps, decided from what the cache stores: no model loaded, no torch.

A fingerprint hashes the architecture, the weights' sha256, the preprocessing, the decoder and
the precision (``spec.fingerprint``); all but the precision are known from the spec and a hash
of the weights file. Where the cache already holds a group of the same backbone, a run keeps
that group's precision and runtime (``runtimes.resolve``), so ``auto`` on another machine does
not fork the cache, and its fingerprint is known without the network: the embedder is built
only when an image (or a tap to catch up) needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..store.cache import FeatureCache
from . import runtimes
from .registry import RANDOM_WEIGHTS, weights_sha256
from .spec import BackboneSpec, fingerprint


@dataclass(frozen=True)
class Kept:
    """A backbone's existing group that a run keeps."""

    fingerprint: str
    canon: dict  # the stored fingerprint description
    runtime: str  # what ``embedder_for`` is asked for (auto where every runtime gives these numbers)
    taps: dict[str, int]  # the group's taps and their dims


def weights_digest(spec: BackboneSpec) -> str | None:
    """The weights digest a fingerprint holds, without torch; None where only the loaded network tells
    (downloaded weights) or where loading must report a damaged file."""
    w = spec.weights
    if w.kind == "random":
        return RANDOM_WEIGHTS
    if w.kind not in ("package", "file"):
        return None
    digest = weights_sha256(spec)
    if digest is None or (w.sha256 and digest != w.sha256):
        return None
    return digest


def kept_group(cache: FeatureCache, spec: BackboneSpec, runtime: str = "auto", precision: str = "auto") -> Kept | None:
    """The group of this backbone that a run asking ``runtime``/``precision`` keeps, or None (a new
    fingerprint, or one only the model can tell: it is then built as on a first run).

    Several groups of the backbone (other precisions): an explicit precision picks its own; ``auto``
    keeps the one with the most rows, preferring one made by an explicitly asked runtime.
    """
    digest = weights_digest(spec)
    if digest is None:
        return None
    probe = fingerprint(spec, digest, "fp32")[1]
    same = []
    for fp in cache.fingerprints():
        attrs = cache.group_attrs(fp)
        canon = attrs["fingerprint"]
        if runtimes.same_backbone(probe, canon) and precision in ("auto", canon["precision"]):
            made_by = canon.get("runtime", "torch" if canon["precision"] != "fp32" else runtime)
            same.append((runtime in ("auto", made_by), int(attrs["rows"]), fp, attrs))
    if not same:
        return None
    _, _, fp, attrs = max(same, key=lambda g: g[:3])
    canon = attrs["fingerprint"]
    rt, prec = runtimes.resolve(runtime, precision, canon)
    if prec != canon["precision"]:
        return None
    return Kept(fp, canon, rt, {t: int(d) for t, d in attrs["taps"].items()})
