"""Smaller Tux Paint sources, for tests where the number of stamps does not matter to what they check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def per_class_csv(tux_csv: Path, out: Path, n: int) -> int:
    """Write the first ``n`` stamps of each class of ``tux_csv`` (every class kept) to ``out``; return the rows."""
    header, *rows = Path(tux_csv).read_text().splitlines()
    counts: Counter[str] = Counter()
    keep = []
    for row in rows:
        label = row.rsplit(",", 1)[1]
        if counts[label] < n:
            keep.append(row)
            counts[label] += 1
    Path(out).write_text("\n".join([header, *keep]) + "\n")
    return len(keep)
