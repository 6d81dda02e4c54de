"""Export formats: one module per format, named as ``featcache export --format`` names it.

A format module defines ``TARGET`` ("dir": ``--out`` is a folder it fills; "file": ``--out`` is
the file it writes) and ``write(table: Table, out: Path) -> None``; its docstring's first line is
its description. Adding a format is one new module here and nothing else: ``names()`` lists this
package's modules without importing them (the CLI's choices cost nothing), ``load(name)`` imports
the one asked for, and ``store.export`` builds the ``Table`` every format writes.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from ...errors import UsageError

if TYPE_CHECKING:
    import numpy as np

TARGETS = ("dir", "file")


@dataclass
class Table:
    """What an export writes: one row per cache row, the same columns in every format.

    ``columns``: key, label, sha256 (text), path (stored text: a name that is not UTF-8 is kept as
    ``featcache.store.names.encode_name`` writes it), status (int8: 0 ok, 1 failed), error (text).
    ``taps``: tap name -> (rows, dim) float32 vectors.
    """

    fingerprint: str
    columns: dict[str, np.ndarray]
    taps: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["sha256"])


def names() -> list[str]:
    """Every export format, from the modules of this package (none imported)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> ModuleType:
    """The format module ``name``, checked against the contract above."""
    if name not in names():
        raise UsageError(f"unknown export format {name!r}; choose one of {', '.join(names())}")
    module = importlib.import_module(f"{__name__}.{name}")
    if getattr(module, "TARGET", None) not in TARGETS or not callable(getattr(module, "write", None)):
        raise UsageError(f"export format module {module.__name__} needs TARGET in {TARGETS} and a write(table, out)")
    return module
