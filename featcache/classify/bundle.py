"""Head bundles: ``manifest.json`` plus ``state.safetensors`` (plain arrays, never pickle).

A bundle names the fingerprint its head was trained on; applying it to vectors of any
other fingerprint raises ``FingerprintMismatch`` naming both. Labels are stored as JSON
values of their own type (strings stay strings, ints stay ints), so a loaded head
predicts what the trained one did.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import FingerprintMismatch, NotFoundError, UsageError
from ..store.outputs import writable_dir
from .heads import Head, head_types

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


def save_bundle(out: str | Path, head: Head, *, fingerprint: str, canon: dict, backbone: dict, tap: str,
                metrics: dict | None = None, cache: str | None = None, extra: dict | None = None) -> Path:
    """Write a head bundle directory; returns its path."""
    from safetensors.numpy import save_file

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
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return out


@dataclass
class HeadBundle:
    path: Path
    manifest: dict
    head: Head

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def tap(self) -> str:
        return self.manifest["tap"]

    @property
    def labels(self) -> list:
        """The classes in ``predict_proba`` column order, as JSON values of their training type."""
        return self.manifest["labels"]

    def check(self, fingerprint: str, what: str = "vectors") -> None:
        """Refuse vectors of another fingerprint."""
        if fingerprint != self.fingerprint:
            raise FingerprintMismatch(
                f"head {self.path} was trained on fingerprint {self.fingerprint} "
                f"({self.manifest['backbone'].get('name')}), but the {what} have fingerprint {fingerprint}; "
                "train a head on features of this backbone, or use the backbone the head was trained with")

    def predict_proba(self, vectors: np.ndarray, fingerprint: str) -> np.ndarray:
        """Class probabilities (columns in ``labels`` order) for vectors of ``fingerprint``."""
        self.check(fingerprint)
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


def load_bundle(path: str | Path) -> HeadBundle:
    """Load a head bundle written by ``save_bundle`` (in any process; no pickle involved)."""
    from safetensors.numpy import load_file

    path = Path(path)
    manifest = read_manifest(path)
    kind = manifest["head"]["type"]
    types = head_types()
    if kind not in types:
        raise UsageError(f"{path} holds a head of unknown type {kind!r} (known: {sorted(types)})")
    arrays = load_file(str(path / manifest.get("state_file", STATE)))
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["head"]["params"].items()}
    head = types[kind].from_state(params, manifest["labels"], manifest["dim"], arrays)
    return HeadBundle(path, manifest, head)
