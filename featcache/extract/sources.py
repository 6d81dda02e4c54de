"""What to extract: a folder (recursive) or a CSV of ``path[,label]``.

Listing never opens a file: whether an entry is a readable regular file is decided when it is
read (``stages.read_file``), the one place every engine goes through. Keys and labels are stored
text (``store.names.encode_name``), so a file name that is not UTF-8 round-trips.
"""

from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NotFoundError, UsageError
from ..store.names import encode_name

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
LABEL_MODES = ("folder", "none")


@dataclass(frozen=True)
class Item:
    path: Path  # absolute OS path
    key: str  # name shown to users (stored text): path relative to the folder, or as written in the CSV
    label: str  # stored text; "" when unlabelled
    size: int = 0  # bytes when listed (0 when unknown): bounds how much is read at once


@dataclass
class Listing:
    items: list[Item]
    failed: list[dict] = field(default_factory=list)  # {"key", "error"}: entries that could not be listed
    skipped: int = 0  # files skipped for their suffix


def list_source(source: str | Path, labels: str = "folder") -> Listing:
    """Items to extract, in a stable order (by key).

    Folder: every file with an image suffix, recursively (symlinks followed, each folder walked
    once), hidden entries skipped; with ``labels="folder"`` the first-level subfolder name is the
    label. CSV: ``path[,label]`` rows, an optional ``path,label`` header, relative paths resolved
    against the CSV's folder.
    """
    if labels not in LABEL_MODES:
        raise UsageError(f"--labels must be one of {LABEL_MODES}, got {labels!r}")
    src = Path(source)
    if src.is_dir():
        return _from_folder(src, labels)
    if src.is_file() and src.suffix.lower() == ".csv":
        return _from_csv(src, labels)
    if src.exists():
        raise UsageError(f"SOURCE {source} must be a folder or a .csv of path[,label] rows")
    raise NotFoundError(f"SOURCE {source} does not exist")


def _size(path: str | Path) -> int:
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _from_folder(root: Path, labels: str) -> Listing:
    root = root.resolve()
    out = Listing([])
    visited = {(root.stat().st_dev, root.stat().st_ino)}

    def walk(folder: Path) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            out.failed.append({"key": encode_name(folder.relative_to(root).as_posix()),
                               "error": f"unreadable folder: {e.strerror or e}"})
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            rel = path.relative_to(root)
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                st = path.stat()
                if (st.st_dev, st.st_ino) in visited:
                    out.failed.append({"key": encode_name(rel.as_posix()),
                                       "error": "symlink loop: this folder was already listed"})
                    continue
                visited.add((st.st_dev, st.st_ino))
                walk(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                label = rel.parts[0] if labels == "folder" and len(rel.parts) > 1 else ""
                out.items.append(Item(path, encode_name(rel.as_posix()), encode_name(label), _size(path)))
            else:
                out.skipped += 1

    walk(root)
    out.items.sort(key=lambda it: it.key)
    return out


def _from_csv(csv_path: Path, labels: str) -> Listing:
    base = csv_path.resolve().parent
    items = []
    # surrogateescape: bytes that are not UTF-8 in a path are kept, exactly as the OS names the file
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            if lineno == 1 and row[0].strip().lower() == "path":
                continue
            if len(row) > 2:
                raise UsageError(f"{csv_path}:{lineno}: expected path[,label], got {len(row)} fields")
            raw = row[0].strip()
            path = Path(raw) if Path(raw).is_absolute() else base / raw
            label = row[1].strip() if len(row) > 1 and labels != "none" else ""
            items.append(Item(path, encode_name(raw), encode_name(label), _size(path)))
    return Listing(items)
