"""The OpenVINO runtime: the tap model converted once (and for int8 quantised with NNCF), kept on disk.

The converted graph takes the same uint8 batch as the torch one (scaling and mean/std are
inside it) and returns the same named taps. The OpenVINO IR is saved under the model cache,
keyed by the fingerprint and the taps, so a later process only compiles it (and OpenVINO's
own ``CACHE_DIR`` keeps the compiled kernels, keyed by its version).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...errors import UsageError
from . import model_cache

log = logging.getLogger(__name__)

# int8 (NNCF post-training quantisation), set up to stay within cosine 0.995 of fp32 on mobile networks
# (benchmarks/int8_scan.py has the measurements behind each choice):
# - the convolutions of the blocks at 1/2 and 1/4 of the input size stay fp32: they lose the most, cost little;
# - activation ranges from histograms (outliers in the residual stream would waste most levels);
# - no int16 saturation on CPUs without VNNI (there u8 x s8 pairs are summed in 16 bits, and signed inputs
#   are shifted to u8 inside the kernel): every quantised activation is unsigned with a 7-bit step (values
#   <= 127), so weights keep 8 bits. A signed input of a 1x1 convolution (the residual stream) is shifted
#   to unsigned by a constant, undone in the convolution's bias; other signed inputs get 7-bit weights;
# - the residual stream itself (adds, pooled taps) stays fp32.
# The same model runs on every CPU, so an int8 cache reproduces anywhere.
INT8_SCHEME = "histogram-ranges,u7-activations,w8,signed-1x1-inputs-shifted,w7-after-other-signed,fp32-residual"


def version() -> str:
    import openvino as ov

    return ov.get_version().split("-")[0]


def supports(precision: str) -> bool:
    """Whether this CPU has fast OpenVINO kernels for ``precision`` (bf16 needs AVX512-BF16 or AMX)."""
    if precision in ("fp32", "int8"):
        return True
    if precision != "bf16":
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def convert(module, crop: int):
    """The torch tap model (uint8 in) as an OpenVINO model with a dynamic batch and outputs named by tap."""
    import openvino as ov
    import torch

    example = torch.zeros((1, 3, crop, crop), dtype=torch.uint8)
    with torch.no_grad():
        model = ov.convert_model(module, example_input=example)
    model.reshape([-1, 3, crop, crop])
    return model


def quantise(model, images: np.ndarray, fp32_convolutions: int):
    """NNCF post-training int8 quantisation (``INT8_SCHEME``), ranges measured on ``images`` (uint8 N,3,H,W)."""
    import nncf
    from nncf.common.logging import nncf_logger
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    nncf_logger.setLevel(logging.ERROR)  # per-layer notes on fallbacks are not for users
    data = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    params = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.DISABLE,  # handled below, per convolution
        activations_range_estimator_params=RangeEstimatorParametersSet.HISTOGRAM)
    skip = conv_names(model)[:fp32_convolutions]
    scope = nncf.IgnoredScope(names=skip, validate=False) if skip else None
    quantised = nncf.quantize(model, data, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(images),
                              advanced_parameters=params, ignored_scope=scope)
    _no_saturation(quantised)
    return quantised


def _const(value) -> object:
    import openvino.opset13 as ops

    return ops.constant(np.asarray(value, dtype=np.float32))


def _feeding_quantiser(node) -> tuple[object | None, bool]:
    """(the FakeQuantize feeding a convolution's data input, whether a Pad sits between), or (None, False)."""
    padded = False
    for _ in range(4):
        if node.get_type_name() == "FakeQuantize":
            return node, padded
        if node.get_input_size() == 0:
            return None, False
        padded = padded or node.get_type_name() == "Pad"
        node = node.input_value(0).get_node()
    return None, False


def _range(fq) -> tuple[np.ndarray, np.ndarray]:
    return fq.input_value(1).get_node().get_data(), fq.input_value(2).get_node().get_data()


def _unsigned(fq) -> bool:
    return bool((_range(fq)[0] >= 0).all())


def _u7(source, lo, hi):
    """A 256-level quantiser over [lo, ...] with the 7-bit step of [lo, hi]: its codes stay <= 127."""
    import openvino.opset13 as ops

    top = _const(lo + (hi - lo) * 255.0 / 127.0)
    return ops.fake_quantize(source, _const(lo), top, _const(lo), top, 256)


def _weights(conv) -> tuple[object, np.ndarray, np.ndarray]:
    """(the scaling node, int8 codes, per-channel scale) of a quantised convolution's weights."""
    scaled = conv.input_value(1).get_node()
    codes = scaled.input_value(0).get_node().input_value(0).get_node().get_data()
    return scaled, codes, scaled.input_value(1).get_node().get_data()


def _pointwise(conv) -> bool:
    attrs = conv.get_attributes()
    return (conv.get_type_name() == "Convolution" and tuple(conv.input_value(1).get_shape()[2:]) == (1, 1)
            and not any(attrs.get("pads_begin", [])) and not any(attrs.get("pads_end", [])))


def _no_saturation(model) -> None:
    """Rewrite NNCF's quantisers so no u8 x s8 pair overflows 16 bits (see ``INT8_SCHEME``)."""
    import openvino.opset13 as ops

    signed = []  # (convolution, the signed quantiser feeding it, a Pad between)
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution") and \
                op.input_value(1).get_node().get_type_name() == "Multiply":
            fq, padded = _feeding_quantiser(op.input_value(0).get_node())
            if fq is not None and not _unsigned(fq):
                signed.append((op, fq, padded))
    for fq in [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
               and op.get_attributes()["levels"] == 256 and _unsigned(op)]:
        fq.output(0).replace(_u7(fq.input_value(0), *_range(fq)).output(0))
    for conv, fq, padded in signed:
        lo, hi = _range(fq)
        if padded or not _pointwise(conv) or lo.size != 1:  # 7-bit weights: pairs stay within 16 bits
            scaled, codes, scale = _weights(conv)
            q7 = np.clip(np.round(codes.astype(np.int32) / 2.0), -64, 63).astype(np.int8)
            scaled.output(0).replace(ops.multiply(ops.convert(ops.constant(q7), "f32"), _const(scale * 2.0)).output(0))
            continue
        shift = float(-lo.reshape(-1)[0])  # x + shift >= 0 over the quantiser's range
        _, codes, scale = _weights(conv)
        bias = -(codes.astype(np.float32) * scale).sum(axis=(1, 2, 3)) * shift  # W (x + shift) - W shift = W x
        consumers = list(conv.output(0).get_target_inputs())
        conv.input(0).replace_source_output(_u7(ops.add(fq.input_value(0), _const(shift)).output(0), lo + shift, hi + shift)
                                            .output(0))
        fixed = ops.add(conv.output(0), _const(bias.reshape(1, -1, 1, 1)))
        for target in consumers:
            target.replace_source_output(fixed.output(0))
    for fq in {id(fq): fq for _, fq, _ in signed}.values():  # adds and pooled taps read the fp32 residual stream
        for target in list(fq.output(0).get_target_inputs()):
            if target.get_node().get_type_name() not in ("Convolution", "GroupConvolution", "Pad"):
                target.replace_source_output(fq.input_value(0))


def conv_names(model) -> list[str]:
    """The convolutions in execution order (what the int8 ``ignored`` list names)."""
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in ("Convolution", "GroupConvolution")]


def prepare(where: Path, build: Callable[[], object], crop: int, quantisation: dict | None = None,
            images: Callable[[], np.ndarray] | None = None) -> Path:
    """The IR at ``where``/model.xml, converted (and quantised) now unless an earlier run did.

    ``build`` returns the torch tap model; ``images`` the calibration images (int8 only).
    Written to a temporary folder and renamed, so a killed or concurrent run leaves no half model.
    """
    xml = where / "model.xml"
    if xml.is_file():
        return xml
    import openvino as ov

    t = time.perf_counter()
    model = convert(build(), crop)
    if quantisation is not None:
        log.warning("quantising to int8 on %d calibration images (once; kept in %s)",
                    quantisation["calibration"]["images"], where)
        model = quantise(model, images(), quantisation["fp32_convolutions"])
    tmp = where.with_name(f"{where.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
    (tmp / "prepared.json").write_text(json.dumps({
        "openvino": version(), "quantisation": quantisation, "seconds": round(time.perf_counter() - t, 2)}, indent=2))
    try:
        os.replace(tmp, where)
    except OSError:  # another process prepared it first: theirs is the same model
        shutil.rmtree(tmp, ignore_errors=True)
    return xml


class OpenVINORunner:
    """A compiled OpenVINO model on the CPU; one infer request per calling thread."""

    runtime = "openvino"

    def __init__(self, xml: Path, taps: list[str], precision: str, threads: int, streams: int = 1):
        import openvino as ov

        if precision == "bf16" and not supports("bf16"):
            raise UsageError("OpenVINO has no bf16 kernels on this CPU (it needs AVX512-BF16 or AMX); use fp32 or int8")
        self.precision = precision
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(model_cache() / f"compiled-openvino-{version()}")})
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",  # int8 layers' neighbours stay f32
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": streams,
            "INFERENCE_NUM_THREADS": threads * streams,
        }
        self.compiled = core.compile_model(str(xml), "CPU", config)
        self.ports: dict[str, int] = {}
        for i, out in enumerate(self.compiled.outputs):
            for tap in taps:
                if tap in out.get_names():
                    self.ports[tap] = i
        missing = sorted(set(taps) - set(self.ports))
        if missing:
            raise RuntimeError(f"prepared OpenVINO model {xml} has no output for taps {missing}")
        self._local = threading.local()

    def run(self, batch) -> dict[str, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        x = np.ascontiguousarray(np.asarray(batch), dtype=np.uint8)
        request.infer({0: x}, share_inputs=True)
        return {tap: request.get_output_tensor(i).data.astype(np.float32, copy=True) for tap, i in self.ports.items()}
