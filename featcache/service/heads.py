"""Named classifier heads, loaded from head bundles (``featcache.classify.bundle``), reloadable live.

A reload loads the new bundle off the event loop, checks its fingerprint and tap against
the serving backbone, then swaps one dict entry: requests already holding the old head
finish with it, new ones get the new head, none fail. A bad bundle leaves the old head
serving and the reload answers with the error.

An ensemble head reads several fingerprints: each member's must be one this server embeds
(the served one, or another of the served cache that a head loaded at start-up needed),
with the member's tap.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from ..classify.bundle import HeadBundle, load_bundle, read_manifest
from ..errors import FeatcacheError, FingerprintMismatch, NotFoundError


class HeadLoadError(FeatcacheError):
    """A head bundle on disk could not be read; the head already loaded keeps serving."""

    http_status = 409


def head_manifest(path: str | Path) -> HeadBundle:
    """A head bundle's manifest alone, as a ``HeadBundle`` without its head (``check``, ``tap``, ``labels``
    work): the service checks every head against the cache before it loads any state arrays."""
    return HeadBundle(Path(path), read_manifest(path), None)


@dataclass(frozen=True)
class LoadedHead:
    name: str
    path: Path
    bundle: HeadBundle
    loaded_at: str
    reloads: int = 0

    def describe(self) -> dict:
        m = self.bundle.manifest
        return {"name": self.name, "labels": [str(c) for c in self.bundle.labels], "tap": self.bundle.tap,
                "type": m.get("head", {}).get("type", "?"), "fingerprint": self.bundle.fingerprint,
                "loaded_at": self.loaded_at, "reloads": self.reloads, "metrics": m.get("metrics", {})}


def check_embedded(bundle: HeadBundle, name: str, embedded: dict[str, set[str]]) -> None:
    """Refuse an ensemble head one of whose members (fingerprint and tap) this server does not embed."""
    for m in bundle.members:
        if m.tap not in embedded.get(m.fingerprint, set()):
            raise FingerprintMismatch(
                f"ensemble head {name!r} needs tap {m.tap!r} of fingerprint {m.fingerprint} "
                f"({m.backbone.get('name')}), but this server embeds "
                f"{', '.join(f'{fp} {sorted(t)}' for fp, t in embedded.items())}; restart the server with that head "
                "so it loads every backbone the head needs")


class HeadRegistry:
    """Heads by name for one serving fingerprint and set of embedded taps (``members``: the taps
    embedded of the other fingerprints that ensemble heads read)."""

    def __init__(self, fingerprint: str, taps: list[str], members: dict[str, list[str]] | None = None):
        self.fingerprint = fingerprint
        self.taps = set(taps)
        self.embedded = {fingerprint: self.taps, **{fp: set(t) for fp, t in (members or {}).items()}}
        self._heads: dict[str, LoadedHead] = {}
        self._lock = asyncio.Lock()

    def _load(self, name: str, path: Path, reloads: int) -> LoadedHead:
        try:
            bundle = load_bundle(path)
        except FeatcacheError:
            raise
        except Exception as e:  # noqa: BLE001 - a half-written or corrupt bundle
            raise HeadLoadError(f"head {name!r}: the bundle could not be read ({type(e).__name__}: {e}); "
                                "the previously loaded head is still serving") from None
        if bundle.is_ensemble:
            check_embedded(bundle, name, self.embedded)
        else:
            bundle.check(self.fingerprint, "serving backbone's vectors")
            if bundle.tap not in self.taps:
                raise FingerprintMismatch(f"head {name!r} reads tap {bundle.tap!r}, but this server embeds "
                                          f"{sorted(self.taps)}; restart the server with that head so it embeds the tap")
        return LoadedHead(name, path, bundle, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), reloads)

    def add(self, name: str, path: str | Path) -> LoadedHead:
        """Load at start-up (raises FingerprintMismatch for a head of another backbone)."""
        head = self._load(name, Path(path), 0)
        self._heads[name] = head
        return head

    def names(self) -> list[str]:
        return sorted(self._heads)

    def get(self, name: str | None) -> LoadedHead:
        if name is None:
            if len(self._heads) == 1:
                return next(iter(self._heads.values()))
            if not self._heads:
                raise NotFoundError("this server has no heads; start it with --head NAME=HEAD_DIR")
            raise NotFoundError(f"name a head: this server has {self.names()}")
        head = self._heads.get(name)
        if head is None:
            raise NotFoundError(f"no head named {name!r}; this server has {self.names()}")
        return head

    async def reload(self, name: str) -> tuple[LoadedHead, LoadedHead]:
        """Re-read the bundle of a configured head; returns (new, old)."""
        async with self._lock:
            old = self.get(name)
            new = await asyncio.to_thread(self._load, name, old.path, old.reloads + 1)
            self._heads[name] = new
            return new, old
