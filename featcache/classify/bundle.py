"""Head bundles: ``manifest.json`` plus ``state.safetensors`` (plain arrays, never pickle).

A bundle names the fingerprint its head was trained on; applying it to vectors of any
other fingerprint raises ``FingerprintMismatch`` naming both. Labels are stored as JSON
values of their own type (strings stay strings, ints stay ints), so a loaded head
predicts what the trained one did.

An ensemble bundle (a head over several backbones) also lists its ``members``: for each,
the fingerprint, its description and backbone (to rebuild the embedder), the tap and the
width of its block of the input. Its ``fingerprint`` is the members' joined by ``+``. A
caller embeds an image with every member (``HeadBundle.members``), and passes the vectors
in member order to ``predict_proba``; a single-backbone bundle is the one-member case.

Loading a linear head (the kinds of ``heads.numpy_predict.ARRAYS``) imports no scikit-learn:
``predict_proba`` applies its state arrays in plain numpy, the code the estimator itself runs;
``HeadBundle.head``, the estimator, is built on first use. Other kinds build it at load.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import FingerprintMismatch, NotFoundError, UsageError
from ..store.outputs import writable_dir
from .heads.numpy_predict import ARRAYS, check_state, plain_predict_proba

if TYPE_CHECKING:
    from .heads import Head

FORMAT = 1
MANIFEST = "manifest.json"
STATE = "state.safetensors"


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("featcache", "numpy", "torch", "scikit-learn", "faiss-cpu", "safetensors", "zarr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


SEP = "+"  # joins the member fingerprints of an ensemble (fingerprints are hex)


def joined_fingerprint(fingerprints: Sequence[str]) -> str:
    """An ensemble's fingerprint: its members', in block order."""
    return SEP.join(fingerprints)


@dataclass(frozen=True)
class Member:
    """One backbone a head reads: what to embed an image with, which tap, and its width in the input."""

    fingerprint: str
    canon: dict  # the fingerprint description (``embedder_for``'s ``canon``)
    backbone: dict  # the backbone description (``embedder_for``'s ``description``)
    tap: str
    dim: int

    def manifest(self) -> dict:
        return {"fingerprint": self.fingerprint, "fingerprint_description": self.canon, "backbone": self.backbone,
                "tap": self.tap, "dim": self.dim}


def ensemble_fields(members: Sequence[Member]) -> dict:
    """``save_bundle``'s ``fingerprint``, ``canon``, ``backbone`` and ``tap`` for a head over ``members``."""
    taps = {m.tap for m in members}
    if len(taps) != 1:
        raise UsageError(f"ensemble members must read one tap, got {sorted(taps)}")
    return {"fingerprint": joined_fingerprint([m.fingerprint for m in members]), "canon": {},
            "backbone": {"name": SEP.join(str(m.backbone.get("name")) for m in members)}, "tap": taps.pop()}


def save_bundle(out: str | Path, head: Head, *, fingerprint: str, canon: dict, backbone: dict, tap: str,
                metrics: dict | None = None, cache: str | None = None, extra: dict | None = None,
                members: Sequence[Member] | None = None) -> Path:
    """Write a head bundle directory; returns its path.

    ``members``: the backbones of a head over several (with ``ensemble_fields(members)`` as
    ``fingerprint``, ``canon``, ``backbone`` and ``tap``); their widths must sum to the head's input.
    """
    from safetensors.numpy import save_file

    if members is not None:
        if fingerprint != joined_fingerprint([m.fingerprint for m in members]):
            raise UsageError(f"bundle fingerprint {fingerprint} is not its members' joined by {SEP!r}")
        if sum(m.dim for m in members) != head.n_features_in_:
            raise UsageError(f"members' widths {[m.dim for m in members]} do not sum to the head's "
                             f"{head.n_features_in_} input features")
    out = writable_dir(out)
    state = {k: np.ascontiguousarray(v) for k, v in head.state().items()}
    save_file(state, str(out / STATE))
    manifest = {
        "featcache_head": {"format": FORMAT},
        "fingerprint": fingerprint,
        "fingerprint_description": canon,
        "backbone": backbone,
        "tap": tap,
        "labels": head.classes_.tolist(),  # heads take str, int, float or bool labels: all JSON values
        "head": {"type": head.kind, "params": {k: _jsonable(v) for k, v in head.get_params().items()}},
        "dim": int(head.n_features_in_),
        "metrics": metrics or {},
        "cache": str(Path(cache).resolve()) if cache else None,
        "versions": library_versions(),
        "state_file": STATE,
        **({"members": [m.manifest() for m in members]} if members is not None else {}),
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return out


class HeadBundle:
    """A head bundle's manifest and its head; ``arrays``: the state the head is (or will be) built from."""

    def __init__(self, path: Path, manifest: dict, head: Head | None = None,
                 arrays: dict[str, np.ndarray] | None = None):
        self.path = path
        self.manifest = manifest
        self._head = head
        self._arrays = arrays

    @property
    def head(self) -> Head | None:
        """The scikit-learn estimator, built from the state arrays on first use (None: a manifest read alone)."""
        if self._head is None and self._arrays is not None:
            self._head = _build_head(self.path, self.manifest, self._arrays)
        return self._head

    @property
    def kind(self) -> str:
        return self.manifest["head"]["type"]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the vectors the head reads (an ensemble's: its members', joined by ``+``)."""
        return self.manifest["fingerprint"]

    @property
    def tap(self) -> str:
        return self.manifest["tap"]

    @property
    def labels(self) -> list:
        """The classes in ``predict_proba`` column order, as JSON values of their training type."""
        return self.manifest["labels"]

    @property
    def members(self) -> list[Member]:
        """The backbones to embed with, in input order: one for a single-backbone head."""
        m = self.manifest
        if "members" not in m:
            return [Member(m["fingerprint"], m["fingerprint_description"], m["backbone"], m["tap"], int(m["dim"]))]
        return [Member(x["fingerprint"], x["fingerprint_description"], x["backbone"], x["tap"], int(x["dim"]))
                for x in m["members"]]

    @property
    def is_ensemble(self) -> bool:
        return "members" in self.manifest

    def _names(self, fingerprints: Sequence[str]) -> str:
        names = {m.fingerprint: m.backbone.get("name") for m in self.members}
        return ", ".join(f"{fp} ({names[fp]})" if fp in names else fp for fp in fingerprints)

    def check(self, fingerprint: str | Sequence[str], what: str = "vectors") -> None:
        """Refuse vectors of another fingerprint (an ensemble: other fingerprints, or its members' in another order).

        ``fingerprint``: one fingerprint, an ensemble's joined one, or the members' as a list.
        """
        given = fingerprint.split(SEP) if isinstance(fingerprint, str) else list(fingerprint)
        want = [m.fingerprint for m in self.members]
        if given == want:
            return
        if not self.is_ensemble:
            raise FingerprintMismatch(
                f"head {self.path} was trained on fingerprint {self.fingerprint} "
                f"({self.manifest['backbone'].get('name')}), but the {what} have fingerprint "
                f"{joined_fingerprint(given)}; train a head on features of this backbone, or use the backbone the "
                "head was trained with")
        missing = [fp for fp in want if fp not in given]
        foreign = [fp for fp in given if fp not in want]
        problems = ([f"missing {self._names(missing)}"] if missing else []) + (
            [f"not members: {', '.join(foreign)}"] if foreign else [])
        raise FingerprintMismatch(
            f"ensemble head {self.path} reads the fingerprints {self._names(want)}, in this order, but the {what} "
            f"have {', '.join(given) or 'none'} ({'; '.join(problems) or 'in another order'}); embed every image "
            "with each member backbone, in member order")

    def predict_proba(self, vectors: np.ndarray | Sequence[np.ndarray], fingerprint: str | Sequence[str]) -> np.ndarray:
        """Class probabilities (columns in ``labels`` order) for vectors of ``fingerprint``.

        An ensemble takes its members' vectors as a list in member order (with the list of their
        fingerprints), or already side by side as one array (with the joined fingerprint).
        """
        self.check(fingerprint)
        if not isinstance(vectors, np.ndarray):
            parts = [np.asarray(v, np.float32) for v in vectors]
            widths = [p.shape[1] if p.ndim == 2 else None for p in parts]
            if widths != [m.dim for m in self.members]:
                raise UsageError(f"head {self.path} takes one 2-D array per member, of widths "
                                 f"{[m.dim for m in self.members]}; got widths {widths}")
            vectors = np.concatenate(parts, axis=1)
        if self.kind in ARRAYS and self._arrays is not None:  # the estimator's own arithmetic, no scikit-learn
            return plain_predict_proba(self.kind, self._arrays, int(self.manifest["dim"]), vectors)
        return self.head.predict_proba(vectors)


def read_manifest(path: str | Path) -> dict:
    """A head bundle's manifest, checked for its format (no state arrays are read)."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise NotFoundError(f"no head bundle at {path} (missing {MANIFEST}); train one with `featcache train`")
    manifest = json.loads(mf.read_text())
    fmt = manifest.get("featcache_head", {}).get("format")
    if fmt != FORMAT:
        raise UsageError(f"{path} is head bundle format {fmt}, this featcache reads {FORMAT}")
    return manifest


def _head_type(path: Path, kind: str) -> type[Head]:
    from .heads import head_types

    types = head_types()
    if kind not in types:
        raise UsageError(f"{path} holds a head of unknown type {kind!r} (known: {sorted(types)})")
    return types[kind]


def _build_head(path: Path, manifest: dict, arrays: dict[str, np.ndarray]) -> Head:
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["head"]["params"].items()}
    return _head_type(path, manifest["head"]["type"]).from_state(params, manifest["labels"], manifest["dim"], arrays)


def load_bundle(path: str | Path) -> HeadBundle:
    """Load a head bundle written by ``save_bundle`` (in any process; no pickle involved).

    A bad state is refused here, not at the first prediction: a linear head's arrays are
    checked against its labels and width, any other head is built.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    manifest = read_manifest(path)
    kind = manifest["head"]["type"]
    if kind not in ARRAYS:
        _head_type(path, kind)  # an unknown kind is named before the state file is opened
    arrays = load_file(str(path / manifest.get("state_file", STATE)))
    if kind in ARRAYS:
        check_state(kind, arrays, len(manifest["labels"]), int(manifest["dim"]))
        return HeadBundle(path, manifest, arrays=arrays)
    return HeadBundle(path, manifest, _build_head(path, manifest, arrays), arrays)
