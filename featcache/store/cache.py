"""The Zarr feature cache: an image table plus one feature group per fingerprint.

Layout (zarr v3, readable with zarr + numpy alone; see README "Cache layout"):

    CACHE/zarr.json                       attrs: {"featcache": {"format": 1}}
    CACHE/images/                         one row per distinct image content
        sha256, key, path, label          string arrays; attrs["rows"] = committed rows
    CACHE/features/<fingerprint>/         attrs: rows, tap_rows, fingerprint, backbone, taps
        image                             int64 row into images/
        status                            int8: 0 ok, 1 failed to decode
        error                             string: why it failed ("" when ok)
        taps/<tap>                        float32 (rows, dim); NaN for failed rows

Arrays may be longer than their committed row count (capacity grows in whole chunks);
only rows below ``attrs["rows"]`` (``attrs["tap_rows"][tap]`` for a tap) are valid. A
writer fills rows past the ledger, then moves the ledger in one atomic metadata write,
so a reader or a killed writer never sees partial rows. This module does not import torch.

For array tools that read shapes rather than the ledger (xarray, dask), dimensions are named
(``image``; ``row``; ``row, <tap>_dim``) and a writer that lets go of the cache ``seal``s it:
every array cut to its committed rows, then the metadata consolidated into the root's
``zarr.json``. That consolidated copy is a snapshot of the last finished write, never ahead of
the ledger; featcache itself always reads the live metadata (``use_consolidated=False``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from ..errors import CacheError, FingerprintMismatch, NotFoundError, UsageError
from .append import Batch, Column, round_up, settle
from .names import decode_name, encode_name, printable
from .outputs import writable_dir

if TYPE_CHECKING:
    import xarray

FORMAT = 1
log = logging.getLogger(__name__)
STATUS_OK, STATUS_FAILED = 0, 1
_ROWS_1D = 4096
_TAP_CHUNK_BYTES = 4 << 20  # per chunk file of a tap: a file costs ~1 ms to write whatever its size
IMAGE_DIMS, ROW_DIMS = ("image",), ("row",)


def tap_dim_names(tap: str) -> tuple[str, str]:
    """Dimension names of a tap array: its own feature dimension, so taps of any width share a group."""
    return ("row", f"{tap}_dim")


@dataclass
class Features:
    """Committed rows of one fingerprint and tap (failed rows dropped unless asked for)."""

    fingerprint: str
    tap: str
    vectors: np.ndarray  # (n, dim) float32
    sha256: np.ndarray  # (n,) str, the image identity
    keys: np.ndarray  # (n,) str
    labels: np.ndarray  # (n,) str, "" where unlabelled
    status: np.ndarray  # (n,) int8
    errors: np.ndarray  # (n,) str
    conflicts: np.ndarray  # (n,) str: "" or a JSON list of the labels these bytes were found under

    def __len__(self) -> int:
        return len(self.keys)


IMAGE_COLUMNS = ("sha256", "key", "path", "label", "conflict")


def rows_of(sha256: np.ndarray, wanted) -> np.ndarray:
    """Row in ``sha256`` of each hash in ``wanted``, -1 where absent: the one sha256 -> row lookup."""
    row = {s: i for i, s in enumerate(np.asarray(sha256).tolist())}
    return np.fromiter((row.get(s, -1) for s in np.asarray(wanted).tolist()), np.int64, count=len(wanted))


@dataclass
class ImageTable:
    """One row per distinct content. ``key`` is "" once another content took the file's key (orphaned);
    ``conflict`` is "" or a JSON list of the different labels the same bytes were found under."""

    sha256: np.ndarray
    key: np.ndarray
    path: np.ndarray
    label: np.ndarray
    conflict: np.ndarray


    def __len__(self) -> int:
        return len(self.sha256)


class FeatureCache:
    """Open a cache directory for reading, or (``create=True``) for writing, creating it if needed.

    A reader opens every Zarr node read-only and never creates anything: a cache still being
    created reads as empty. Each cache gets a random ``uid`` when it is created, so an index
    or head can tell two caches of the same fingerprint apart.
    """

    def __init__(self, root: str | os.PathLike, create: bool = False):
        self.root = Path(root)
        self.writable = create
        if not create and not (self.root / "zarr.json").is_file():
            raise NotFoundError(f"no featcache cache at {self.root} (run `featcache extract SOURCE --cache {self.root}`)")
        try:
            self.group = zarr.open_group(str(self.root), mode="a" if create else "r", zarr_format=3,
                                         use_consolidated=False)  # the live ledger, never the last seal's snapshot
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"{self.root} is not a readable Zarr v3 group: {e}") from e
        meta = dict(self.group.attrs).get("featcache")
        if meta is None:
            if not create or len(list(self.group.keys())):
                raise CacheError(f"{self.root} is a Zarr group but not a featcache cache")
            meta = {"format": FORMAT}
        elif meta.get("format") != FORMAT:
            raise CacheError(f"{self.root} has cache format {meta.get('format')}, this featcache reads {FORMAT}")
        if create:
            if "id" not in meta:  # caches made before ids existed get theirs from their next writer
                meta = {**meta, "id": uuid.uuid4().hex}
                self.group.attrs.update({"featcache": meta})
            if "images" not in self.group:
                self.group.create_group("images", attributes={"rows": 0})
            imgs = self._open("images")
            for name in IMAGE_COLUMNS:  # columns added by later versions appear on the next write
                if name not in imgs:
                    imgs.create_array(name, shape=(imgs["sha256"].shape[0] if "sha256" in imgs else 0,),
                                      chunks=(_ROWS_1D,), dtype=str, fill_value="", dimension_names=IMAGE_DIMS)
        self.uid: str | None = meta.get("id")
        self._appender: _ImageAppender | None = None  # a writer's image columns, opened at its first append

    def _open(self, *path: str) -> zarr.Group:
        """A subgroup, read-only for readers."""
        return zarr.open_group(str(self.root.joinpath(*path)), mode="r+" if self.writable else "r", zarr_format=3,
                               use_consolidated=False)

    # -- image table -------------------------------------------------------------
    def _images(self) -> zarr.Group:
        return self._open("images")

    def images(self) -> ImageTable:
        """Committed image rows. Keys and labels are stored text; paths are OS paths again (``decode_name``)."""
        if not self.writable and "images" not in self.group:  # being created right now: nothing committed
            return ImageTable(*(np.array([], dtype=str) for _ in IMAGE_COLUMNS))
        g = self._images()
        n = int(g.attrs["rows"])
        cols = {name: _unicode(g[name][:n]) if name in g else np.full(n, "", dtype=str) for name in IMAGE_COLUMNS}
        cols["path"] = np.array([decode_name(p) for p in cols["path"].tolist()], dtype=object if n else str)
        return ImageTable(**cols)

    def append_images(self, sha256: list[str], keys: list[str], paths: list[str], labels: list[str],
                      conflicts: list[str] | None = None, batch: Batch | None = None) -> None:
        """Append new image rows and commit them (``paths`` are OS paths; the rest stored text).

        With ``batch``, the rows and the ledger's move are queued there (the caller runs it) instead.
        The rows go after the ledger this writer last read or moved: one writer per cache (``writer_lock``).
        """
        if not sha256:
            return
        if self._appender is None:
            self._appender = _ImageAppender(self._images())
        with _batch(batch) as b:
            self._appender.append(b, {"sha256": sha256, "key": keys, "path": [encode_name(p) for p in paths],
                                      "label": labels, "conflict": conflicts or [""] * len(sha256)})

    def update_images(self, rows: np.ndarray, **columns: list[str]) -> None:
        """Rewrite columns of committed rows, e.g. ``key=, path=, label=`` for a moved or relabelled file."""
        if len(rows) == 0:
            return
        settle()  # a chunk read, changed and written back: not while a batch writes it
        g = self._images()
        order = np.argsort(rows)
        rows = np.asarray(rows)[order]
        for name, values in columns.items():
            if name == "path":
                values = [encode_name(p) for p in values]
            g[name].set_coordinate_selection(rows, strings(values)[order])
            if self._appender is not None:
                self._appender.cols[name].forget()

    # -- feature groups ----------------------------------------------------------
    def fingerprints(self) -> list[str]:
        if "features" not in self.group:
            return []
        return sorted(self.group["features"].group_keys())

    def group_attrs(self, fingerprint: str) -> dict:
        return dict(self._feature_group(fingerprint).attrs)

    def resolve_fingerprint(self, fingerprint: str | None = None) -> str:
        """A full fingerprint from a prefix, or the only one when None."""
        fps = self.fingerprints()
        if not fps:
            raise NotFoundError(f"cache {self.root} holds no features yet")
        if fingerprint is None:
            if len(fps) > 1:
                raise UsageError(f"cache {self.root} holds {len(fps)} fingerprints ({', '.join(fps)}); choose one with --fingerprint")
            return fps[0]
        hits = [f for f in fps if f.startswith(fingerprint)]
        if len(hits) != 1:
            raise NotFoundError(f"fingerprint {fingerprint!r} matches {len(hits)} of {fps} in {self.root}")
        return hits[0]

    def _feature_group(self, fingerprint: str) -> zarr.Group:
        try:
            return self._open("features", fingerprint)
        except FileNotFoundError:
            raise NotFoundError(f"fingerprint {fingerprint} not in cache {self.root}") from None

    def feature_group(self, fingerprint: str, canon: dict, backbone: dict, tap_dims: dict[str, int]) -> FeatureGroup:
        """Open the group for ``fingerprint``, creating it or adding taps as needed."""
        feats = self.group.require_group("features")
        if fingerprint in feats:
            g = self._feature_group(fingerprint)
            if g.attrs["fingerprint"] != canon:
                raise FingerprintMismatch(f"cache group {fingerprint} was written for {g.attrs['fingerprint']}, not {canon}")
        else:
            g = feats.create_group(fingerprint, attributes={
                "fingerprint": canon, "backbone": backbone, "rows": 0, "tap_rows": {}, "taps": {}})
            g.create_array("image", shape=(0,), chunks=(_ROWS_1D,), dtype="int64", fill_value=-1, dimension_names=ROW_DIMS)
            g.create_array("status", shape=(0,), chunks=(_ROWS_1D,), dtype="int8", fill_value=-1, dimension_names=ROW_DIMS)
            g.create_array("error", shape=(0,), chunks=(_ROWS_1D,), dtype=str, dimension_names=ROW_DIMS)
            g.create_group("taps")
        taps, tap_rows = dict(g.attrs["taps"]), dict(g.attrs["tap_rows"])
        for tap, dim in tap_dims.items():
            if tap in taps:
                if taps[tap] != dim:
                    raise CacheError(f"tap {tap} in {fingerprint} has dim {taps[tap]}, backbone gives {dim}")
                continue
            chunk = max(16, _TAP_CHUNK_BYTES // (4 * dim))
            rows = int(g.attrs["rows"])
            g["taps"].create_array(tap, shape=(round_up(rows, chunk), dim), chunks=(chunk, dim),
                                       dtype="float32", fill_value=float("nan"), compressors=None,
                                       dimension_names=tap_dim_names(tap))
            taps[tap], tap_rows[tap] = dim, 0
        g.attrs.update({"taps": taps, "tap_rows": tap_rows})
        return FeatureGroup(self._feature_group(fingerprint))

    def read(self, fingerprint: str | None = None, tap: str = "final", include_failed: bool = False) -> Features:
        """Features of one fingerprint and tap, joined with the image table.

        Left out unless ``include_failed``: rows that failed to decode, rows whose content no file
        holds any more (its key went to other bytes), and rows this tap could not be computed for
        when it was added later (NaN; the row stays ok for the other taps).
        """
        fp, g, n = self._committed(fingerprint, tap)
        image = g["image"][:n]
        status = g["status"][:n]
        errors = _unicode(g["error"][:n])
        vectors = g["taps"][tap][:n]
        imgs = self.images()
        if include_failed:
            keep = np.ones(n, bool)
        else:
            keep = _kept(status, imgs.key[image], vectors)
        idx = image[keep]
        if not keep.all():  # a raw-activation tap can be gigabytes: copy only when rows are dropped
            vectors = vectors[keep]
        return Features(fp, tap, np.ascontiguousarray(vectors), imgs.sha256[idx], imgs.key[idx],
                        imgs.label[idx], status[keep], errors[keep], imgs.conflict[idx])

    def sha256s(self) -> np.ndarray:
        """The committed image rows' sha256: the one column a lookup by content reads, not the whole table."""
        ig = self._images()
        return _unicode(ig["sha256"][: int(ig.attrs["rows"])])

    def vectors_of(self, sha256: list[str], fingerprint: str | None = None, tap: str = "final") -> dict[str, np.ndarray]:
        """{sha256: vector} of the given contents, for those ``read`` would return, reading only their vectors.

        A lookup of a few images (``predict``) reads the image table's sha256 column and the row -> image
        column, not the whole vector column: ``read`` of a million-row tap is gigabytes.
        """
        _, g, n = self._committed(fingerprint, tap)
        image = g["image"][:n]
        rows = rows_of(image, rows_of(self.sha256s(), sha256))  # -1: not here
        picked = np.unique(rows[rows >= 0])
        if not len(picked):
            return {}
        status = g["status"].get_coordinate_selection(picked)
        keys = _unicode(self._images()["key"].get_coordinate_selection(image[picked]))
        vectors = g["taps"][tap].get_orthogonal_selection((picked, slice(None)))
        kept = {int(r): v for r, v, good in zip(picked, vectors, _kept(status, keys, vectors)) if good}
        return {s: kept[int(r)] for s, r in zip(sha256, rows) if int(r) in kept}

    def _committed(self, fingerprint: str | None, tap: str) -> tuple[str, zarr.Group, int]:
        """(fingerprint, its group, committed rows of ``tap``): the one place the ledger of a tap is read."""
        fp = self.resolve_fingerprint(fingerprint)
        g = self._feature_group(fp)
        attrs = dict(g.attrs)
        if tap not in attrs["taps"]:
            raise NotFoundError(f"tap {tap!r} not in fingerprint {fp} (has {sorted(attrs['taps'])})")
        return fp, g, min(int(attrs["rows"]), int(attrs["tap_rows"][tap]))

    def to_xarray(self, fingerprint: str | None = None, tap: str = "final") -> xarray.Dataset:
        """Every committed row of one fingerprint and tap as a lazy ``xarray.Dataset`` (dask arrays).

        Dimensions ``row`` (the cache's feature row, as index ids use it) and ``dim``; ``vectors``,
        ``status``, ``error`` and the image columns as coordinates. No row past the ledger, whatever
        the arrays' capacity or a writer running now. Failed rows (status 1, NaN vectors) and
        orphans (key "") are included, to filter: ``ds.isel(row=(ds.status == 0).values)``;
        ``read()`` is the filtered in-memory view. Needs ``pip install 'featcache[array]'``.
        """
        try:
            import dask.array as da
            import xarray as xr
        except ImportError as e:
            raise UsageError(f"to_xarray needs xarray and dask: pip install 'featcache[array]' ({e})") from None
        fp, g, n = self._committed(fingerprint, tap)
        image = g["image"][:n]
        imgs = self.images()
        arr = g["taps"][tap]
        vectors = da.from_zarr(arr, chunks=arr.chunks)[:n]
        attrs = {"fingerprint": fp, "tap": tap, "backbone": g.attrs["backbone"].get("name"), "cache": str(self.root)}
        if self.uid:
            attrs["cache_id"] = self.uid
        return xr.Dataset(
            {"vectors": (("row", "dim"), vectors), "status": ("row", g["status"][:n]),
             "error": ("row", _unicode(g["error"][:n]))},
            coords={"row": np.arange(n), "image": ("row", image), "sha256": ("row", imgs.sha256[image]),
                    "key": ("row", imgs.key[image]), "path": ("row", imgs.path[image]),
                    "label": ("row", imgs.label[image])},
            attrs=attrs)

    def info(self) -> dict:
        imgs = self.images()
        out = {"cache": str(self.root), "id": self.uid, "images": len(imgs),
               "orphaned": int((imgs.key == "").sum()), "label_conflicts": int((imgs.conflict != "").sum()),
               "fingerprints": []}
        for fp in self.fingerprints():
            g = self._feature_group(fp)
            a = dict(g.attrs)
            rows = int(a["rows"])
            status = g["status"][:rows]
            out["fingerprints"].append({
                "fingerprint": fp, "backbone": a["backbone"].get("name"), "rows": rows,
                "ok": int((status == STATUS_OK).sum()), "failed": int((status == STATUS_FAILED).sum()),
                "taps": a["taps"], "tap_rows": a["tap_rows"], "precision": a["fingerprint"]["precision"],
                "description": a["fingerprint"],
            })
        return out


class _ImageAppender:
    """A writer's image columns and the images ledger, kept open between commits."""

    def __init__(self, group: zarr.Group):
        self.g = group
        self.end = int(group.attrs["rows"])  # rows queued, committed or about to be
        self.cols = {name: Column(group[name]) for name in IMAGE_COLUMNS}

    def append(self, batch: Batch, columns: dict[str, list[str]]) -> None:
        n = self.end
        m = self.end = n + len(columns["sha256"])
        for name, values in columns.items():
            self.cols[name].append(batch, n, strings(values))

        async def move() -> None:
            self.g = await self.g.update_attributes_async({**self.g.attrs.asdict(), "rows": m})

        batch.ledger(move)


class FeatureGroup:
    """Writer for one fingerprint's rows. Write past the ledger, then ``commit``.

    Each method takes an optional ``batch``: the writes (and the ledger's move) are queued there, for
    the caller to run with the rest of a commit; without one, each call writes at once.
    """

    def __init__(self, group: zarr.Group):
        self.g = group
        attrs = dict(group.attrs)
        self.rows = int(attrs["rows"])
        self.tap_rows = {k: int(v) for k, v in attrs["tap_rows"].items()}
        self.taps = dict(attrs["taps"])
        self._cols: dict[str, Column] = {}

    def _column(self, name: str) -> Column:
        """The array ``name`` (``taps/<tap>`` for a tap), opened once."""
        col = self._cols.get(name)
        if col is None:
            col = self._cols[name] = Column(self.g[name])
        return col

    def image_rows(self) -> np.ndarray:
        return self.g["image"][: self.rows]

    def status(self) -> np.ndarray:
        return self.g["status"][: self.rows]

    def write_rows(self, start: int, image: np.ndarray, status: np.ndarray, error: list[str],
                   batch: Batch | None = None) -> None:
        with _batch(batch) as b:
            for name, values in (("image", image), ("status", status), ("error", strings(error))):
                self._column(name).append(b, start, np.asarray(values))

    def write_tap(self, tap: str, start: int, vectors: np.ndarray, batch: Batch | None = None) -> None:
        with _batch(batch) as b:
            self._column(f"taps/{tap}").append(b, start, vectors)

    def commit(self, rows: int, tap_rows: dict[str, int], batch: Batch | None = None) -> None:
        """Atomically move the ledger: rows below these counts become visible."""
        moved = {**self.tap_rows, **tap_rows}

        async def move() -> None:
            self.g = await self.g.update_attributes_async({**self.g.attrs.asdict(), "rows": rows, "tap_rows": moved})
            self.rows, self.tap_rows = rows, moved

        with _batch(batch) as b:
            b.ledger(move)


@contextlib.contextmanager
def _batch(batch: Batch | None) -> Iterator[Batch]:
    """The caller's batch, or one of its own that is run on leaving."""
    if batch is not None:
        yield batch
        return
    own = Batch()
    yield own
    own.run()


def writer_lock(root: str | os.PathLike) -> _Lock:
    """Exclusive writer lock on a cache directory (created if missing); the OS drops it if the process dies.

    The directory must be writable: that is checked here, before any work, so a read-only cache or a
    ``--cache`` below a regular file is one clear ``CacheError`` instead of a failure halfway.
    """
    root = Path(root)
    try:
        writable_dir(root)
    except (NotADirectoryError, FileExistsError):
        raise CacheError(f"cannot use {root} as a cache: it or a folder above it is a file, not a folder") from None
    except OSError as e:
        raise CacheError(f"cache {root} is not writable ({e.strerror or e}); writing needs write access") from None
    return _Lock(root)


class _Lock:
    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDONLY)  # flock on the directory: no stray file in the group
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CacheError(f"another featcache process is writing to {self.path}; wait for it or stop it") from None
        return self

    def __exit__(self, exc_type, *exc) -> None:
        assert self.fd is not None
        try:
            seal(self.path)
        except Exception as e:  # noqa: BLE001 - the ledger is still the truth; don't hide the error that got us here
            if exc_type is None:
                raise
            log.warning("cache %s not sealed (%s); readers still see every committed row", self.path, e)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def seal(root: str | os.PathLike) -> None:
    """Leave a cache as array tools expect it: each array cut to its committed rows, dimensions named, metadata
    consolidated. Run by the writer as it lets go of the cache (once per run, never per commit); anything else
    that writes must hold the writer lock. A cache that is not a featcache cache (or none yet) is left alone."""
    root = Path(root)
    settle()
    if not (root / "zarr.json").is_file():
        return
    group = zarr.open_group(str(root), mode="r+", zarr_format=3, use_consolidated=False)
    if "featcache" not in group.attrs:
        return
    if "images" in group:
        rows = int(group["images"].attrs["rows"])
        for name in group["images"].array_keys():
            _fit(root / "images" / name, rows, IMAGE_DIMS)
    if "features" in group:
        for fp in group["features"].group_keys():
            g = group["features"][fp]
            rows, tap_rows = int(g.attrs["rows"]), g.attrs["tap_rows"]
            for name in g.array_keys():
                _fit(root / "features" / fp / name, rows, ROW_DIMS)
            for tap in g["taps"].array_keys():
                if tap in tap_rows:  # a tap array not in the ledger yet (creation interrupted) is left as it is
                    _fit(root / "features" / fp / "taps" / tap, int(tap_rows[tap]), tap_dim_names(tap))
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": xarray reads it all the same
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(str(root), zarr_format=3)


def _fit(path: Path, rows: int, dims: tuple[str, ...]) -> None:
    """Name an array's dimensions (arrays made before names existed) and cut its capacity to ``rows``."""
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    if meta.get("dimension_names") != list(dims):
        meta["dimension_names"] = list(dims)
        tmp = meta_file.with_name(".zarr.json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_file)
    arr = zarr.open_array(str(path), mode="r+", zarr_format=3)
    if arr.shape[0] > rows:  # never grown here: rows past the capacity would be fill values posing as data
        arr.resize((rows, *arr.shape[1:]))


def strings(values) -> np.ndarray:
    """A numpy variable-width string array (what zarr's string dtype stores and returns).

    Text that is not valid Unicode (an error message quoting a non-UTF-8 file name) is made
    printable: names themselves arrive here already through ``names.encode_name``.
    """
    return np.array([v if v.isascii() else printable(v) for v in values], dtype=np.dtypes.StringDType())


def _kept(status: np.ndarray, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Which rows ``read`` returns: decoded (status ok), still some file's content (a key), this tap computed (not NaN)."""
    keep = (status == STATUS_OK) & (keys != "")
    if len(keep):
        keep &= ~np.isnan(vectors[:, 0])
    return keep


def _unicode(values: np.ndarray) -> np.ndarray:
    """Plain fixed-width numpy strings, which every numpy/sklearn API accepts."""
    return np.array(values.tolist(), dtype=str)
