"""What to extract: a folder (recursive) or a CSV of ``path[,label]``."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFoundError, UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
LABEL_MODES = ("folder", "none")


@dataclass(frozen=True)
class Item:
    path: Path  # absolute
    key: str  # stable name shown to users: path relative to the folder, or as written in the CSV
    label: str  # "" when unlabelled


def list_source(source: str | Path, labels: str = "folder") -> tuple[list[Item], int]:
    """Items to extract, in a stable order, and how many files were skipped for their suffix.

    Folder: every file with an image suffix, recursively, hidden entries skipped; with
    ``labels="folder"`` the first-level subfolder name is the label (files directly in
    the folder get none). CSV: ``path[,label]`` rows, an optional ``path,label`` header,
    relative paths resolved against the CSV's folder.
    """
    if labels not in LABEL_MODES:
        raise UsageError(f"--labels must be one of {LABEL_MODES}, got {labels!r}")
    src = Path(source)
    if src.is_dir():
        return _from_folder(src, labels)
    if src.is_file() and src.suffix.lower() == ".csv":
        return _from_csv(src, labels), 0
    if src.exists():
        raise UsageError(f"SOURCE {source} must be a folder or a .csv of path[,label] rows")
    raise NotFoundError(f"SOURCE {source} does not exist")


def _from_folder(root: Path, labels: str) -> tuple[list[Item], int]:
    root = root.resolve()
    items, skipped = [], 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped += 1
            continue
        label = rel.parts[0] if labels == "folder" and len(rel.parts) > 1 else ""
        items.append(Item(path, rel.as_posix(), label))
    return items, skipped


def _from_csv(csv_path: Path, labels: str) -> list[Item]:
    base = csv_path.resolve().parent
    items = []
    with open(csv_path, newline="") as f:
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
            items.append(Item(path, raw, label))
    return items
