"""Classifier heads on cached features: one module per head family, one registry.

- ``base``: the ``Head`` contract (scikit-learn estimator, labels keep their type, state as arrays).
- ``linear``: ``LogRegHead`` and ``LinearSVMHead`` (L-BFGS in torch); ``knn``: ``KNNHead`` (faiss);
  ``mlp``: ``MLPHead`` (a small torch MLP).
- ``ensemble``: ``EnsembleHead``, member heads over several backbones' features side by side.
- ``numpy_predict``: the prediction arithmetic in plain numpy; saved linear heads are applied
  with it alone (no scikit-learn), which is what keeps ``featcache predict`` quick to start.

Adding a head is one new module here defining a ``Head`` subclass with a ``kind``:
``head_types()`` imports every module of this package, so ``make_head``, ``featcache
train --head``, the trainer and bundles find it with no other edit.

Importing this package is cheap (no torch, no scikit-learn): head classes load on first
use, so the CLI can offer ``HEAD_KINDS`` as choices without slowing every command.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Head
    from .ensemble import EnsembleHead
    from .knn import KNNHead
    from .linear import LinearSVMHead, LogRegHead
    from .mlp import MLPHead
    from .numpy_predict import HeadInputError

__all__ = ["HEAD_KINDS", "EnsembleHead", "Head", "HeadInputError", "KNNHead", "LinearSVMHead", "LogRegHead", "MLPHead",
           "head_types", "make_head"]


@functools.cache
def _import_modules() -> None:
    """Import every module of this package: defining a ``Head`` subclass with a ``kind`` registers it."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def head_types() -> dict[str, type[Head]]:
    """Every head class by kind, sorted by kind."""
    _import_modules()
    from .base import REGISTRY

    return dict(sorted(REGISTRY.items()))


def make_head(kind: str, **params) -> Head:
    """A new, unfitted head of ``kind`` with ``params``; unknown kinds and parameters are usage errors."""
    from ...errors import UsageError

    types = head_types()
    if kind not in types:
        raise UsageError(f"unknown head {kind!r}; choose one of {sorted(types)}")
    cls = types[kind]
    unknown = set(params) - set(cls._get_param_names())
    if unknown:
        raise UsageError(f"head {kind} has no parameter {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(cls._get_param_names())}")
    return cls(**params)


class _Kinds:
    """The registered head kinds, looked up only when asked (argparse ``choices``)."""

    def __contains__(self, kind: object) -> bool:
        return kind in head_types()

    def __iter__(self) -> Iterator[str]:
        return iter(head_types())

    def __len__(self) -> int:
        return len(head_types())


HEAD_KINDS = _Kinds()


def __getattr__(name: str):
    """``Head``, ``HeadInputError`` and head classes by class name, imported on first use."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name == "HeadInputError":  # no scikit-learn: the plain-numpy predict path raises it too
        return getattr(importlib.import_module(f"{__name__}.numpy_predict"), name)
    if name == "Head":
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    for cls in head_types().values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
