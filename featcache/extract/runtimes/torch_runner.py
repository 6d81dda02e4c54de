"""The torch runtime: eager on a GPU (autocast for bf16/fp16), frozen TorchScript for fp32 on a CPU."""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Normalised(nn.Module):
    """uint8 NCHW in, taps out: scaling and mean/std live inside the (traced or converted) graph."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float() * self.scale - self.shift
        return self.model(x.contiguous(memory_format=torch.channels_last))


class TorchRunner:
    """``module`` (a ``Normalised`` tap model) on ``device``; on CPU fp32 traced and frozen at first use."""

    runtime = "torch"

    def __init__(self, module: nn.Module, device: torch.device, precision: str, optimize: bool = True):
        self.device = device
        self.precision = precision
        self.module = module.to(device, memory_format=torch.channels_last)
        self._optimised = None
        self._want_jit = optimize and device.type == "cpu" and precision == "fp32"

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

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
            log.warning("TorchScript freeze failed (%s); using eager mode", e)
            self._want_jit = False
            return None

    def run(self, batch) -> dict[str, np.ndarray]:
        x = torch.as_tensor(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self._want_jit and self._optimised is None:
            self._optimised = self._trace(x)
        fn = self._optimised or self.module
        with torch.inference_mode(), self._autocast():
            out = fn(x)
        return {k: v.float().cpu().numpy() for k, v in out.items()}
