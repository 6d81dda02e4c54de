"""The one learning-rate schedule: linear warm-up, then cosine decay to zero."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier at ``step`` (0-based): ramps to 1 over ``warmup`` steps, then cosine to 0 at ``total``.

    Stateless, so a caller may move ``total`` mid-run (the MLP plans its epochs after the first).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
