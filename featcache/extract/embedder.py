"""Device, runtime and precision selection, and the forward pass shared by every caller.

The batch extractor, ``predict``, the HTTP service and finetune's prefix all embed through
``Embedder``, so an image gets the same vector whichever path it takes (the fingerprint says
how). The forward pass itself is a runner from ``extract/runtimes`` (torch or OpenVINO).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from ..errors import FingerprintMismatch, UsageError
from ..runtime import available_cpus, tune_malloc
from . import runtimes
from .backbone import RAW, Backbone
from .runtimes.calibration import MIN_CALIBRATION_IMAGES, Calibration
from .runtimes.torch_runner import Normalised, TorchRunner
from .spec import BackboneSpec, fingerprint

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    runtimes.check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """On CUDA, ``auto`` is bf16 (fp16 on pre-Ampere); the CPU's ``auto`` is the gate's choice (runtimes.choice)."""
    if precision == "auto" and device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    runtimes.check_precision(precision, device.type)
    return precision


def quantisation_record(calibration: Calibration, fp32_convolutions: int) -> dict:
    """What an int8 fingerprint records: the quantiser, its settings and the calibration set."""
    from importlib.metadata import version

    from .runtimes.openvino_runner import INT8_SCHEME

    return {"method": "nncf.quantize", "nncf": version("nncf"), "preset": "performance", "scheme": INT8_SCHEME,
            "fp32_convolutions": fp32_convolutions, "calibration": calibration.record()}


class Embedder:
    """Embeds uint8 image batches into pooled taps with one backbone, device, runtime and precision.

    ``runtime``/``precision`` ``auto`` follow ``runtimes.choice.choose``. int8 needs
    ``calibration`` (images of the collection, or a function giving them, called only when
    int8 is possible); ``auto`` considers int8 only with at least 64 images, and keeps it only
    if the model quantised on them passes the gate too.
    The forward pass is prepared at the first ``embed`` (int8 chosen by ``auto``: at once).
    """

    def __init__(self, backbone: Backbone, taps: list[str] | None = None, device: str = "auto",
                 precision: str = "auto", threads: int | None = None, optimize: bool = True,
                 runtime: str = "auto", calibration: Calibration | Callable[[], Calibration] | None = None,
                 streams: int = 1):
        self.backbone = backbone
        self.spec = backbone.spec
        self.taps = list(dict.fromkeys(taps or ["final"]))
        self.device = resolve_device(device)
        self.threads = threads or available_cpus()
        self.streams = streams
        self.optimize = optimize
        precision = resolve_precision(precision, self.device)
        if self.device.type == "cpu":
            tune_malloc()
            torch.set_num_threads(self.threads)
            self._choose(runtime, precision, calibration)
        else:
            if runtime not in ("auto", "torch"):
                raise UsageError(f"--runtime {runtime} runs on the CPU; on a GPU use --runtime torch (or auto)")
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
            torch.backends.cudnn.allow_tf32 = False
            self._set("torch", precision, None)

    def _set(self, runtime: str, precision: str, calibration: Calibration | None) -> None:
        if precision == "int8":
            if calibration is None:
                raise UsageError("--precision int8 needs images to calibrate on: extract calibrates on the collection "
                                 "(Embedder(calibration=Calibration.from_source(...)) in Python)")
            if raw := [t for t in self.taps if t.startswith(RAW)]:
                raise UsageError(f"int8 embeds pooled taps only; {raw} need fp32 or bf16")
            if len(calibration) < MIN_CALIBRATION_IMAGES:
                log.warning("int8 calibrated on only %d images; %d or more give steadier ranges",
                            len(calibration), MIN_CALIBRATION_IMAGES)
        self.runtime, self.precision = runtime, precision
        self.calibration = calibration if precision == "int8" else None
        quant = quantisation_record(calibration, self.backbone.early_convolutions()) if precision == "int8" else None
        self.fingerprint, self.canon = fingerprint(self.spec, self.backbone.weights_sha256, precision, runtime, quant)
        self._runner = None

    def _choose(self, runtime: str, precision: str, calibration) -> None:
        from .runtimes.choice import choose

        rt, prec = choose(self.backbone, runtime, precision)
        if prec == "int8" and callable(calibration):
            calibration = calibration()
        if precision == "auto" and prec == "int8":
            if calibration is None or len(calibration) < MIN_CALIBRATION_IMAGES or not self._int8_passes(calibration):
                rt, prec = choose(self.backbone, runtime, precision, int8=False)
        self._set(rt, prec, calibration if prec == "int8" else None)

    def _int8_passes(self, calibration: Calibration) -> bool:
        """The gate judged a model calibrated on other photos: judge the one calibrated on this collection."""
        from .runtimes.choice import judge, photos, recorded

        x, labels = photos(self.spec.preprocess)
        ref = Embedder(self.backbone, ["final"], "cpu", "fp32", self.threads, runtime="torch").embed(x)["final"]
        int8 = Embedder(self.backbone, ["final"], "cpu", "int8", self.threads, runtime="openvino", calibration=calibration)
        verdict = judge(int8, x, labels, ref, ((recorded(self.backbone) or {}).get("gate") or {}).get("fp32_top1"))
        if not verdict["passes"]:
            log.warning("int8 calibrated on this collection fails the accuracy gate (%s); using the next best", verdict)
        return verdict["passes"]

    # -- the forward pass --------------------------------------------------------
    def _module(self, taps: list[str]) -> torch.nn.Module:
        pre = self.spec.preprocess
        net = Normalised(self.backbone.tap_model(taps), pre.mean, pre.std).eval()
        return copy.deepcopy(net) if self.device.type != "cpu" else net  # the Backbone stays on the CPU

    def _model_taps(self) -> list[str]:
        """int8: every pooled tap, so the quantised numbers do not depend on which taps were asked."""
        if self.precision != "int8":
            return self.taps
        return sorted(set(self.taps) | {t for t in self.backbone.tap_names if not t.startswith(RAW)})

    def prepared_dir(self):
        """Where this runtime keeps its prepared model on disk (None: prepared in memory each run).

        Keyed by fingerprint and taps, not by the OpenVINO version: the IR reads in later versions,
        and an int8 model must stay the one its fingerprint was made with (compiled kernels are
        cached per version by OpenVINO itself).
        """
        if self.runtime != "openvino":
            return None
        taps = hashlib.sha256(",".join(self._model_taps()).encode()).hexdigest()[:12]
        return runtimes.model_cache() / self.fingerprint / f"openvino-{self.precision}-{taps}"

    @property
    def runner(self) -> runtimes.Runner:
        if self._runner is None:
            if self.runtime == "torch":
                self._runner = TorchRunner(self._module(self.taps), self.device, self.precision, self.optimize)
            else:
                from .runtimes import openvino_runner as ovr

                model_taps = self._model_taps()
                xml = ovr.prepare(self.prepared_dir(), lambda: self._module(model_taps), self.spec.preprocess.crop,
                                  self.canon.get("quantization"),
                                  lambda: self.calibration.images(self.spec.preprocess))
                self._runner = ovr.OpenVINORunner(xml, self.taps, self.precision, self.threads, self.streams)
        return self._runner

    def embed(self, batch, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """uint8 (N, 3, H, W) (torch or numpy) on the CPU to {tap: float32 (N, dim)} numpy arrays.

        ``pad_to``: run the forward pass on the batch padded with zero images to this size and
        return only the N real rows. Callers keep to a few fixed sizes this way, because the
        frozen TorchScript graph re-optimises (for seconds) for every new batch shape.
        """
        n = len(batch)
        if pad_to is not None and pad_to > n:
            batch = torch.as_tensor(batch)
            batch = torch.cat([batch, batch.new_zeros((pad_to - n, *batch.shape[1:]))])
        out = self.runner.run(batch)
        return {k: v[:n] for k, v in out.items()}

    def classify_imagenet(self, final: np.ndarray) -> np.ndarray:
        """Logits of the backbone's original classifier over the final tap (N, classes)."""
        clf = self.backbone.classifier
        if clf is None:
            raise UsageError(f"{self.spec.name} has no classifier layer to apply")
        with torch.inference_mode():
            return clf.eval()(torch.from_numpy(np.ascontiguousarray(final, dtype=np.float32))).numpy()

    def describe(self) -> dict:
        return {"fingerprint": self.fingerprint, "backbone": self.spec.name, "device": str(self.device),
                "runtime": self.runtime, "precision": self.precision, "taps": self.taps}


def new_embedder(spec: BackboneSpec, taps: list[str], device: str = "auto", precision: str = "auto",
                 runtime: str = "auto", source: str | None = None, threads: int | None = None) -> Embedder:
    """A first run's embedder: runtime and precision chosen (``auto``), int8 calibrated on ``source``'s images."""
    calibration = (lambda: Calibration.from_source(source)) if source else None
    return Embedder(Backbone.load(spec), taps, device, precision, threads, runtime=runtime, calibration=calibration)


def embedder_for(description: dict, canon: dict, taps: list[str] | None = None, device: str = "auto",
                 threads: int | None = None, runtime: str = "auto", precision: str = "auto",
                 cache: str | None = None, streams: int = 1) -> Embedder:
    """The embedder that reproduces a stored fingerprint (cache group, head or index manifest).

    ``description`` is the stored ``BackboneSpec.describe()``, ``canon`` the stored
    fingerprint description; the rebuilt embedder must hash to the same fingerprint. The
    precision is the stored one; the runtime is free where it gives the same numbers (fp32).
    An int8 model comes from the model cache, or is quantised again on the recorded
    calibration images found in ``cache``.
    """
    from .registry import spec_from_description

    stored = canon["precision"]
    if precision not in ("auto", stored):
        raise FingerprintMismatch(f"these vectors were made in {stored}; --precision {precision} would not match them "
                                  f"(leave it auto)")
    if "runtime" in canon:
        if runtime not in ("auto", canon["runtime"]):
            raise FingerprintMismatch(f"these vectors were made by {canon['runtime']} {stored}; "
                                      f"--runtime {runtime} would not match them (leave it auto)")
        runtime = canon["runtime"]
    elif stored != "fp32":
        runtime = "torch"
    backbone = Backbone.load(spec_from_description(description))
    calibration = None
    if stored == "int8":
        calibration = _stored_calibration(canon, cache)
    emb = Embedder(backbone, taps, device, stored, threads, runtime=runtime, calibration=calibration, streams=streams)
    if emb.canon != canon:
        diff = sorted(k for k in canon.keys() | emb.canon.keys() if canon.get(k) != emb.canon.get(k))
        raise FingerprintMismatch(
            f"backbone {description['name']} now gives fingerprint {emb.fingerprint}, which differs from the "
            f"stored one in {diff}; re-extract with the current weights or restore the original ones")
    return emb


def _stored_calibration(canon: dict, cache: str | None) -> Calibration:
    """The calibration of a stored int8 fingerprint: no images needed while its model is on disk."""
    record = canon["quantization"]["calibration"]
    if cache is not None:
        try:
            return Calibration.from_cache(cache, record)
        except (FingerprintMismatch, OSError):
            pass
    return Calibration.from_record(record)
