"""One .npy file per tap and per column, and meta.json: readable with numpy alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import Table

TARGET = "dir"
FILES = {"key": "keys", "label": "labels", "path": "paths", "error": "errors"}  # sha256, status: as named


def write(table: Table, out: Path) -> None:
    for tap, vectors in table.taps.items():
        np.save(out / f"{tap}.npy", vectors)
    for name, values in table.columns.items():
        np.save(out / f"{FILES.get(name, name)}.npy", values)
    meta = {"fingerprint": table.fingerprint, "taps": list(table.taps), "rows": len(table),
            "columns": {name: f"{FILES.get(name, name)}.npy" for name in table.columns}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
