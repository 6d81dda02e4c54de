"""``auto``: the fastest runtime x precision that passes the accuracy gate, measured once per CPU.

The gate runs every combination available here on the 20 real ImageNet photos and keeps
those whose final embeddings have minimum cosine >= 0.995 to torch fp32 and whose ImageNet
top-1 is not lower than fp32's. The figures and the choice are recorded per CPU model in a
small JSON file beside the prepared models, keyed by the backbone's fp32 fingerprint and the
library versions, so later runs read the choice instead of measuring again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from ...errors import FeatcacheError, UsageError
from ...runtime import available_cpus
from . import available, check_runtime, cpu_flags, cpu_model, model_cache, native_bf16, slug

log = logging.getLogger(__name__)

RUNTIME_ENV, PRECISION_ENV = "FEATCACHE_RUNTIME", "FEATCACHE_PRECISION"
GATE_MIN_COSINE = 0.995
GATE_VERSION = 1  # bump when the gate's rules change: recorded choices are then measured again
CANDIDATES = (("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))
GATE_BATCH = 8  # extract's CPU batch size: the choice is made for the batch it will run


def record_path() -> Path:
    return model_cache() / f"auto-{slug(cpu_model())}-{available_cpus()}cpu.json"


def versions() -> dict:
    """Library versions a recorded choice holds for (another version is measured again)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"gate": GATE_VERSION}
    for pkg in ("torch", "openvino", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def read_records() -> dict:
    """{fp32 fingerprint: entry} recorded on this CPU (empty when none); imports no torch."""
    try:
        return json.loads(record_path().read_text()).get("backbones", {})
    except (OSError, ValueError):
        return {}


def _write_record(key: str, entry: dict) -> None:
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    records = read_records()
    records[key] = entry
    doc = {"cpu": cpu_model(), "flags": cpu_flags(), "cpus": available_cpus(), "backbones": records}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def backbone_key(backbone) -> str:
    from ..spec import fingerprint

    return fingerprint(backbone.spec, backbone.weights_sha256, "fp32")[0]


def recorded(backbone) -> dict | None:
    """This backbone's recorded gate on this CPU, if it was measured with today's library versions."""
    entry = read_records().get(backbone_key(backbone))
    if entry and entry.get("versions") == versions():
        return entry
    return None


def photos(pre):
    """The 20 real ImageNet photos as extract decodes them (uint8 N,3,H,W) and their class indices."""
    import numpy as np
    import torch

    from ...datasets import imagenet20
    from ..decode import load_image

    items = imagenet20()
    x = torch.stack([load_image(p.read_bytes(), pre) for p, _ in items])
    return x, np.array([label for _, label in items])


def gate_calibration():
    """Calibration images for the gate's own int8 model: the Tux Paint photos (disjoint from the 20 it is judged on)."""
    from ...datasets import tuxpaint_items
    from .calibration import CALIBRATION_IMAGES, Calibration

    items = tuxpaint_items()
    if not items:
        return None
    return Calibration.from_files([p for p, _ in items], [str(p) for p, _ in items], CALIBRATION_IMAGES,
                                  "tuxpaint-stamps (gate)")


def model_only(emb, batch: int, seconds: float) -> float:
    """Images per second of ``emb.embed`` alone on a fixed random uint8 batch."""
    import torch

    size = emb.spec.preprocess.crop
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    emb.embed(x)
    emb.embed(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        emb.embed(x)
        n += batch
    return n / (time.perf_counter() - t)


def judge(emb, x, labels, ref, ref_top1: int | None) -> dict:
    """Gate figures of one embedder on the photos (no timing)."""
    import numpy as np

    out = emb.embed(x)["final"]
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    top1 = _top1(emb, out, labels)
    passes = bool(cos.min() >= GATE_MIN_COSINE and (ref_top1 is None or (top1 is not None and top1 >= ref_top1)))
    return {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6), "top1": top1,
            "passes": passes}


def _top1(emb, final, labels) -> int | None:
    clf = emb.backbone.classifier
    if clf is None or getattr(clf, "out_features", None) != 1000:
        return None  # no ImageNet classifier (fine-tuned or headless): the cosine alone decides
    return int((emb.classify_imagenet(final).argmax(1) == labels).sum())


def measure(backbone, candidates=CANDIDATES, batch: int = GATE_BATCH, seconds: float = 2.0, rounds: int = 2,
            calibration=None) -> dict:
    """Gate every available runtime x precision for ``backbone`` on this CPU, record and return the entry."""
    from ..embedder import Embedder

    t0 = time.perf_counter()
    log.warning("measuring runtimes and precisions for %s on %s (once per CPU; recorded in %s)",
                backbone.spec.name, cpu_model(), record_path())
    x, labels = photos(backbone.spec.preprocess)
    reference = Embedder(backbone, ["final"], "cpu", "fp32", runtime="torch")
    ref = reference.embed(x)["final"]
    ref_top1 = _top1(reference, ref, labels)
    rows, embedders = [], []
    for runtime, precision in candidates:
        row = {"runtime": runtime, "precision": precision}
        try:
            check_runtime(runtime, precision, "cpu")
            if precision == "bf16" and not native_bf16():
                raise UsageError("no bf16 instructions on this CPU (avx512_bf16, amx_bf16): emulated, never the fastest")
            calib = None
            if precision == "int8":
                calib = calibration or gate_calibration()
                if calib is None:
                    raise UsageError("no calibration photos for the gate (apt-get install tuxpaint-stamps-default)")
                row["calibration"] = {"source": calib.source, "images": len(calib), "sha256": calib.digest}
            emb = reference if (runtime, precision) == ("torch", "fp32") else Embedder(
                backbone, ["final"], "cpu", precision, runtime=runtime, calibration=calib)
            row.update(judge(emb, x, labels, ref, ref_top1))
        except FeatcacheError as e:
            rows.append({**row, "available": False, "note": str(e), "passes": False})
            continue
        row["available"] = True
        rows.append(row)
        embedders.append((row, emb))
    for _ in range(rounds):  # interleaved rounds, best of each: less at the mercy of a noisy neighbour
        for row, emb in embedders:
            row["images_per_second"] = round(max(row.get("images_per_second", 0.0), model_only(emb, batch, seconds)), 2)
    fp32 = next((r["images_per_second"] for r in rows if (r["runtime"], r["precision"]) == ("torch", "fp32")), None)
    for r in rows:
        if r.get("images_per_second") and fp32:
            r["speedup_vs_torch_fp32"] = round(r["images_per_second"] / fp32, 3)
    passing = [r for r in rows if r["passes"]]
    best = max(passing, key=lambda r: r["images_per_second"], default=None)
    entry = {
        "backbone": backbone.spec.name, "weights_sha256": backbone.weights_sha256, "cpu": cpu_model(),
        "flags": cpu_flags(), "cpus": available_cpus(), "versions": versions(), "batch": batch,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "gate": {"min_cosine": GATE_MIN_COSINE, "photos": len(labels), "fp32_top1": ref_top1},
        "rows": rows, "choice": None if best is None else {"runtime": best["runtime"], "precision": best["precision"]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_record(backbone_key(backbone), entry)
    return entry


def _fastest(entry: dict, runtime: str = "auto", precision: str = "auto", int8: bool = True) -> dict | None:
    rows = [r for r in entry["rows"] if r["passes"] and r.get("images_per_second")
            and runtime in ("auto", r["runtime"]) and precision in ("auto", r["precision"])
            and (int8 or r["precision"] != "int8")]
    return max(rows, key=lambda r: r["images_per_second"], default=None)


def default_runtime(precision: str) -> str:
    """The runtime for a precision when nothing was measured: OpenVINO only where torch has no kernels."""
    return "openvino" if precision == "int8" else "torch"


def choose(backbone, runtime: str = "auto", precision: str = "auto", int8: bool = True) -> tuple[str, str]:
    """(runtime, precision) on this CPU. ``int8=False`` leaves int8 out of ``auto`` (no calibration images).

    ``auto`` is first replaced by ``FEATCACHE_RUNTIME`` / ``FEATCACHE_PRECISION`` where set.
    Both given: checked and used. Only the precision given: the recorded fastest runtime for
    it that passed the gate (nothing is measured), else torch (OpenVINO for int8). The
    precision ``auto``: the fastest combination that passed the gate, measured now if this
    CPU has no record for the backbone yet.
    """
    if runtime == "auto":  # a machine-wide default where the measured choice is not wanted (e.g. a test suite)
        runtime = os.environ.get(RUNTIME_ENV, "auto")
    if precision == "auto":
        precision = os.environ.get(PRECISION_ENV, "auto")
    if runtime != "auto" and precision != "auto":
        check_runtime(runtime, precision, "cpu")
        return runtime, precision
    if precision != "auto":
        entry = recorded(backbone)
        row = entry and _fastest(entry, precision=precision)
        chosen = row["runtime"] if row else default_runtime(precision)
        if not available(chosen):
            chosen = "torch"
        check_runtime(chosen, precision, "cpu")
        return chosen, precision
    if runtime != "auto":
        check_runtime(runtime, "fp32", "cpu")
    entry = recorded(backbone)
    if entry is None:
        try:
            entry = measure(backbone)
        except FeatcacheError as e:  # no photos to judge on: fp32, which needs no gate
            log.warning("cannot run the accuracy gate (%s); using fp32", e)
            return (runtime if runtime != "auto" else "torch"), "fp32"
    row = _fastest(entry, runtime, int8=int8)
    return (row["runtime"], row["precision"]) if row else (runtime if runtime != "auto" else "torch", "fp32")
