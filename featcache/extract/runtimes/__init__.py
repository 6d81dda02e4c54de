"""How the forward pass runs: one small interface, a torch and an OpenVINO implementation.

A runner is prepared once (traced and frozen; or converted, quantised and compiled, with the
result kept on disk under the model cache) and then maps uint8 image batches to pooled taps.
``Embedder`` picks the runner, so extract, predict, the service and finetune's prefix share
it and their vectors agree by construction. Nothing here imports torch or OpenVINO at module
level: ``featcache backbones`` reads the recorded choices without either.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ...errors import UsageError
from ..spec import PRECISIONS

if TYPE_CHECKING:
    import numpy as np

RUNTIMES = ("torch", "openvino")
OPENVINO_HINT = "pip install 'featcache[openvino]' (the openvino and nncf packages)"


class Runner(Protocol):
    """A prepared forward pass: uint8 (N, 3, H, W) images in, {tap: float32 (N, dim)} out."""

    runtime: str
    precision: str

    def run(self, batch) -> dict[str, np.ndarray]: ...


def available(runtime: str) -> bool:
    """Whether ``runtime`` can run here (OpenVINO is an optional extra); imports nothing."""
    if runtime == "torch":
        return True
    if runtime == "openvino":
        return importlib.util.find_spec("openvino") is not None
    return False


def quantiser_available() -> bool:
    return available("openvino") and importlib.util.find_spec("nncf") is not None


def check_device(device: str) -> None:
    """A clear UsageError for a --device that is none of auto, cpu, cuda[:N] (checked before torch is imported)."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")


def check_precision(precision: str, device_type: str) -> None:
    """A clear UsageError for a --precision that cannot run on this kind of device (torch-free)."""
    if precision != "auto" and precision not in PRECISIONS:
        raise UsageError(f"--precision must be auto or one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device_type == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device; on CPU use fp32, bf16 or int8")
    if precision == "int8" and device_type != "cpu":
        raise UsageError("--precision int8 runs on the CPU (OpenVINO); on a GPU use bf16 or fp16")


def check_runtime(runtime: str, precision: str, device_type: str) -> None:
    """A clear UsageError for a runtime/precision pair that cannot run here."""
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be auto or one of {RUNTIMES}, got {runtime!r}")
    if runtime == "openvino":
        if device_type != "cpu":
            raise UsageError("--runtime openvino runs on the CPU; use --device cpu (or --runtime torch on a GPU)")
        if not available("openvino"):
            raise UsageError(f"--runtime openvino asked for, but OpenVINO is not installed: {OPENVINO_HINT}")
        if precision == "fp16":
            raise UsageError("--precision fp16 needs a CUDA device; on CPU use fp32, bf16 or int8")
        if precision == "int8" and not quantiser_available():
            raise UsageError(f"--precision int8 needs NNCF to quantise: {OPENVINO_HINT}")
    elif precision == "int8":
        raise UsageError(f"--precision int8 runs on OpenVINO (--runtime openvino or auto): {OPENVINO_HINT}")


def model_cache() -> Path:
    """Where prepared models and the recorded runtime choices live (``FEATCACHE_MODEL_CACHE``)."""
    env = os.environ.get("FEATCACHE_MODEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "featcache" / "models"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), which the runtime choice is recorded under."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide which precisions have fast kernels."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = re.compile(r"^(avx\w*|amx\w*|fma|f16c|sse4_2|vnni|avx512\w*)$")
                return sorted(f for f in line.split(":", 1)[1].split() if wanted.match(f))
    except OSError:
        pass
    return []


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def same_backbone(canon: dict, other: dict) -> bool:
    """Whether two fingerprint descriptions are the same network and preprocessing (any runtime/precision)."""
    keys = ("arch", "weights_sha256", "preprocess", "decoder", "pooling")
    return all(canon.get(k) == other.get(k) for k in keys)


def resolve(runtime: str = "auto", precision: str = "auto", existing: dict | None = None) -> tuple[str, str]:
    """(runtime, precision) a run over a cache asks for, decided without loading a model (torch-free).

    ``existing``: the fingerprint description of this backbone's feature group already in
    the cache (``same_backbone``), if any. A cache keeps the precision it was built with, and
    the runtime where that one made the numbers, so ``auto`` on another machine does not fork
    it; an explicit ``precision`` other than the stored one starts a new fingerprint beside it.
    Rebuild the kept one with ``embedder_for(description, existing, ..., runtime=..., cache=...)``;
    anything else with ``Embedder(..., runtime=..., precision=...)`` (``auto`` resolved there).
    """
    if existing is None or precision not in ("auto", existing["precision"]):
        return runtime, precision
    stored = existing.get("runtime")
    if stored and runtime not in ("auto", stored):
        raise UsageError(f"this cache's {existing['precision']} vectors were made by {stored}; --runtime {runtime} "
                         f"would not match them (leave it auto, or use another --precision for a new fingerprint)")
    if stored:
        return stored, existing["precision"]
    return (runtime if existing["precision"] == "fp32" else "torch"), existing["precision"]
