"""Materialise the offline datasets (Debian/PyPI packages) as labelled image folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import NotFoundError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_CLASSES = {
    "mammal": "animals/mammals", "bird": "animals/birds", "fish": "animals/fish", "insect": "animals/insects",
    "fruit": "food/fruit", "flower": "plants/flowers", "vehicle": "vehicles",
}
_APT = "apt-get install -y --no-install-recommends"


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,)) for split ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not img.is_file():
        raise NotFoundError(f"Fashion-MNIST not found at {FASHION_DIR}: {_APT} dataset-fashion-mnist")
    return _idx(img), _idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")


def write_fashion_mnist(out: Path, split: str, limit: int | None = None) -> Path:
    """Write ``out/<split>/<class>/<split>-NNNNN.png``; returns the split folder. Idempotent."""
    images, labels = fashion_mnist(split)
    n = len(images) if limit is None else min(limit, len(images))
    root = Path(out) / split
    for i in range(n):
        path = root / FASHION_CLASSES[labels[i]] / f"{split}-{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(path)
    return root


def tuxpaint_items() -> list[tuple[Path, str]]:
    """(png path, class) for the 7 Tux Paint stamp classes (RGBA cut-outs)."""
    if not TUXPAINT_DIR.is_dir():
        raise NotFoundError(f"Tux Paint stamps not found at {TUXPAINT_DIR}: {_APT} tuxpaint-stamps-default")
    out = []
    for label, sub in TUXPAINT_CLASSES.items():
        out += [(p, label) for p in sorted((TUXPAINT_DIR / sub).rglob("*.png"))]
    return out


def write_tuxpaint_csv(out: Path) -> Path:
    """A ``path,label`` CSV of the Tux Paint classes, usable as an extract SOURCE."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in tuxpaint_items()))
    return out


def imagenet20() -> list[tuple[Path, int]]:
    """The 20 ImageNet validation JPEGs shipped in foolbox, with their class index."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("foolbox is not installed: pip install --no-deps foolbox==3.3.4")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    out = []
    for p in sorted(data.glob("imagenet_*.jpg")):
        out.append((p, int(p.stem.rsplit("_", 1)[1])))
    return out
