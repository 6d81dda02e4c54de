"""Device and precision selection, and the optimised forward pass shared by every caller.

The batch extractor, ``predict`` and the HTTP service all embed through ``Embedder``, so
an image gets the same vector whichever path it takes (the fingerprint says how).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..runtime import available_cpus, tune_malloc
from .backbone import Backbone
from .spec import PRECISIONS, fingerprint

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 (fp16 on pre-Ampere) on CUDA; fp32 on CPU, where half types rarely pay."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be auto or one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device; on CPU use fp32 or bf16")
    return precision


class _Normalised(nn.Module):
    """uint8 NCHW in, taps out: scaling and mean/std live inside the (traced) graph."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float() * self.scale - self.shift
        return self.model(x.contiguous(memory_format=torch.channels_last))


class Embedder:
    """Embeds uint8 image batches into pooled taps with one backbone, device and precision."""

    def __init__(self, backbone: Backbone, taps: list[str] | None = None, device: str = "auto",
                 precision: str = "auto", threads: int | None = None, optimize: bool = True):
        self.backbone = backbone
        self.spec = backbone.spec
        self.taps = list(dict.fromkeys(taps or ["final"]))
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.fingerprint, self.canon = fingerprint(self.spec, backbone.weights_sha256, self.precision)
        self.threads = threads or available_cpus()
        if self.device.type == "cpu":
            tune_malloc()
            torch.set_num_threads(self.threads)
        else:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
            torch.backends.cudnn.allow_tf32 = False
        pre = self.spec.preprocess
        net = _Normalised(backbone.tap_model(self.taps), pre.mean, pre.std).eval()
        if self.device.type != "cpu":
            net = copy.deepcopy(net)  # the Backbone's own modules stay on the CPU for other users
        net = net.to(self.device, memory_format=torch.channels_last)
        self.module = net
        self._optimised = None
        self._want_jit = optimize and self.device.type == "cpu" and self.precision == "fp32"

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._want_jit and self._optimised is None:
            self._optimised = self._trace(x)
        fn = self._optimised or self.module
        with torch.inference_mode(), self._autocast():
            return fn(x)

    def _trace(self, x: torch.Tensor):
        """On CPU fp32: trace + freeze (folds BatchNorm into convs, fuses activations)."""
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(self.module, x[:1].clone(), strict=False, check_trace=False)
                frozen = torch.jit.freeze(traced)
                frozen(x[:1].clone())  # first call runs the optimisation passes
            return frozen
        except Exception as e:  # noqa: BLE001 - any failure just means eager mode
            log.warning("TorchScript freeze failed for %s (%s); using eager mode", self.spec.arch, e)
            self._want_jit = False
            return None

    def embed(self, batch: torch.Tensor, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """uint8 (N, 3, H, W) on the CPU to {tap: float32 (N, dim)} numpy arrays.

        ``pad_to``: run the forward pass on the batch padded with zero images to this size and
        return only the N real rows. Callers keep to a few fixed sizes this way, because the
        frozen TorchScript graph re-optimises (for seconds) for every new batch shape.
        """
        n = len(batch)
        if pad_to is not None and pad_to > n:
            batch = torch.cat([batch, batch.new_zeros((pad_to - n, *batch.shape[1:]))])
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        out = self._forward(batch)
        return {k: v[:n].float().cpu().numpy() for k, v in out.items()}

    def classify_imagenet(self, final: np.ndarray) -> np.ndarray:
        """Logits of the backbone's original classifier over the final tap (N, classes)."""
        clf = self.backbone.classifier
        if clf is None:
            raise UsageError(f"{self.spec.name} has no classifier layer to apply")
        with torch.inference_mode():
            return clf.eval()(torch.from_numpy(final)).numpy()

    def describe(self) -> dict:
        return {"fingerprint": self.fingerprint, "backbone": self.spec.name, "device": str(self.device),
                "precision": self.precision, "taps": self.taps}


def embedder_for(description: dict, canon: dict, taps: list[str] | None = None, device: str = "auto",
                 threads: int | None = None) -> Embedder:
    """The embedder that reproduces a stored fingerprint (cache group, head or index manifest).

    ``description`` is the stored ``BackboneSpec.describe()``, ``canon`` the stored
    fingerprint description; the rebuilt embedder must hash to the same fingerprint.
    """
    from ..errors import FingerprintMismatch
    from .registry import spec_from_description

    emb = Embedder(Backbone.load(spec_from_description(description)), taps, device, canon["precision"], threads)
    if emb.canon != canon:
        diff = sorted(k for k in canon if canon.get(k) != emb.canon.get(k))
        raise FingerprintMismatch(
            f"backbone {description['name']} now gives fingerprint {emb.fingerprint}, which differs from the "
            f"stored one in {diff}; re-extract with the current weights or restore the original ones")
    return emb
