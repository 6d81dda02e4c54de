"""Shared fixtures on real data: the foolbox ImageNet-20 JPEGs, Tux Paint stamps, real weights."""

from __future__ import annotations

import os

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # read when scipy is imported: sklearn's array-API checks run, not skip
# The CPU's measured runtime choice (and int8 quantisation) is tested in test_runtimes.py with its own
# model cache; everywhere else ``auto`` means torch fp32, so results do not depend on which CPU CI drew.
os.environ.setdefault("FEATCACHE_RUNTIME", "torch")
os.environ.setdefault("FEATCACHE_PRECISION", "fp32")

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from featcache.datasets import imagenet20, write_tuxpaint_csv
from featcache.extract.backbone import Backbone
from featcache.extract.embedder import Embedder
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.extract.registry import resolve


@pytest.fixture(scope="session")
def lite0() -> Backbone:
    return Backbone.load(resolve("efficientnet_lite0"))


@pytest.fixture(scope="session")
def lite0_embedder(lite0) -> Embedder:
    return Embedder(lite0, ["final"], "cpu", "fp32")


@pytest.fixture(scope="session")
def mnv2_embedder() -> Embedder:
    """MobileNetV2 fp32 (the suite's second backbone), loaded and traced once for every test that needs it."""
    return Embedder(Backbone.load(resolve("mobilenet_v2")), ["final"], "cpu", "fp32")


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory) -> Path:
    """The 20 ImageNet JPEGs as a labelled folder: <class index>/<file>.jpg."""
    root = tmp_path_factory.mktemp("imagenet20")
    for path, label in imagenet20():
        (root / str(label)).mkdir(exist_ok=True)
        shutil.copy(path, root / str(label) / path.name)
    return root


@pytest.fixture(scope="session")
def tux_csv(tmp_path_factory) -> Path:
    return write_tuxpaint_csv(tmp_path_factory.mktemp("tux") / "tuxpaint.csv")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


@contextmanager
def read_only(cache: Path) -> Iterator[Path]:
    """Hand a shared cache to the tests; at the end of the session, fail if any of them wrote to it."""
    before = _files(cache)
    yield cache
    assert _files(cache) == before, f"a test wrote to the shared read-only cache {cache}: copy it first"


@pytest.fixture(scope="session")
def tux_cache(tmp_path_factory, tux_csv, lite0_embedder) -> Iterator[Path]:
    """A real cache: 240 Tux Paint stamps (7 classes) through EfficientNet-Lite0. Read-only for tests."""
    cache = tmp_path_factory.mktemp("tuxcache") / "cache"
    Extraction(ExtractConfig(str(tux_csv), str(cache), progress=False), lite0_embedder).run()
    with read_only(cache):
        yield cache


@pytest.fixture(scope="session")
def imagenet_cache(tmp_path_factory, imagenet_dir, lite0_embedder) -> Iterator[Path]:
    """A small real cache: the 20 ImageNet JPEGs through EfficientNet-Lite0 (labels: class index). Read-only."""
    cache = tmp_path_factory.mktemp("imagenetcache") / "cache"
    Extraction(ExtractConfig(str(imagenet_dir), str(cache), progress=False), lite0_embedder).run()
    with read_only(cache):
        yield cache


LONGEST_FIRST = ("test_ray_engine.py", "test_runtimes.py")  # minutes each: started first, they run beside the rest


def pytest_collection_modifyitems(items: list) -> None:
    """The longest modules first (a stable sort: everything else keeps its order), so that with two xdist workers
    they do not run last and alone."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)
