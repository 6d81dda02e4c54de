"""What the extraction speed-up targets ask of this CPU, in floating-point operations per second.

    python benchmarks/roofline.py

Counts each backbone's forward FLOPs with ``torch.utils.flop_counter`` (one 224x224 image),
measures what this machine's cores actually sustain on a large fp32 GEMM (the best case
for any convolution: no depthwise layers, no memory stalls), and, from the tutorial-loop
figures in ``benchmarks/results/extract-cpu.json``, prints the FLOP rate the 3.5x / 8x
targets would need. A target above the GEMM rate cannot be reached in fp32 on this machine.
Writes benchmarks/results/roofline.json.
"""

from __future__ import annotations

import json
import time

import torch
from record import RESULTS, save
from targets import EXTRACT_SPEEDUP
from torch.utils.flop_counter import FlopCounterMode

from featcache.extract.backbone import Backbone
from featcache.extract.registry import resolve
from featcache.runtime import available_cpus

BACKBONES = {"efficientnet_lite0": ("efficientnet_lite0", None), "resnet50": ("torchvision:resnet50", "random")}


def gemm_gflops(n: int = 2048, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def forward_gflop(name: str, weights: str | None) -> float:
    net = Backbone.load(resolve(name, weights)).network.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def main() -> None:
    torch.set_num_threads(available_cpus())
    extract = {r["backbone"]: r for r in json.loads((RESULTS / "extract-cpu.json").read_text())["results"]}
    peak = max(gemm_gflops() for _ in range(3))
    out = {"cores": available_cpus(), "fp32_gemm_gflops": round(peak, 1), "backbones": {}}
    for key, (name, weights) in BACKBONES.items():
        target = EXTRACT_SPEEDUP[key]
        flop = forward_gflop(name, weights)
        r = extract[key]
        need = r["tutorial"] * target
        out["backbones"][key] = {
            "gflop_per_image": round(flop, 3), "tutorial_img_s": r["tutorial"], "target_speedup": target,
            "target_img_s": round(need, 1), "target_gflops": round(need * flop, 1),
            "target_vs_gemm": round(need * flop / peak, 2),
            "model_only_img_s": r["M_model_only"], "model_only_gflops": round(r["M_model_only"] * flop, 1),
            "model_only_vs_gemm": round(r["M_model_only"] * flop / peak, 2)}
    save(out, RESULTS / "roofline.json")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
