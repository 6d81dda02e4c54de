"""GPU path check (run on a CUDA machine): device auto-selection, autocast, parity, speed.

    python benchmarks/gpu_check.py [--out DIR]

Embeds the 20 real ImageNet photos on the CPU in fp32 and on the GPU in fp32 and in the
auto precision (bf16 autocast), through the same Extraction pipeline (pinned memory,
non-blocking copies, decode overlapped with the forward pass), and reports cosine
similarity to the CPU vectors and ImageNet top-1 for each. Then runs bench_extract.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from record import RESULTS, save

from featcache.datasets import imagenet20
from featcache.extract.backbone import Backbone
from featcache.extract.embedder import Embedder
from featcache.extract.pipeline import ExtractConfig, Extraction
from featcache.extract.registry import resolve
from featcache.store.cache import FeatureCache


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--images", type=int, default=4000)
    a = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    work = Path(tempfile.mkdtemp())
    src = work / "imagenet20"
    for path, label in imagenet20():
        (src / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / str(label) / path.name)
    backbone = Backbone.load(resolve("efficientnet_lite0"))
    runs = {}
    for tag, device, precision in (("cpu-fp32", "cpu", "fp32"), ("cuda-fp32", "cuda", "fp32"), ("cuda-auto", "auto", "auto")):
        emb = Embedder(backbone, ["final"], device, precision)
        summary = Extraction(ExtractConfig(str(src), str(work / tag), progress=False), emb).run()
        feats = FeatureCache(work / tag).read()
        top1 = int((emb.classify_imagenet(feats.vectors).argmax(1) == feats.labels.astype(int)).sum())
        runs[tag] = {"device": summary["device"], "precision": summary["precision"], "fingerprint": summary["fingerprint"],
                     "top1_of_20": top1, "vectors": feats.vectors, "sha": feats.sha256}
    ref = runs["cpu-fp32"]
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for tag, r in runs.items():
        order = {s: i for i, s in enumerate(r["sha"])}
        v = r["vectors"][[order[s] for s in ref["sha"]]]
        cos = (v * ref["vectors"]).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref["vectors"], axis=1)
        report["runs"][tag] = {k: r[k] for k in ("device", "precision", "fingerprint", "top1_of_20")} | {
            "min_cosine_to_cpu_fp32": float(cos.min())}
    out = Path(a.out)
    save(report, out / "gpu-parity.json")
    print(json.dumps(report, indent=2), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run([sys.executable, str(Path(__file__).parent / "bench_extract.py"), "--images", str(a.images),
                    "--device", "auto", "--out", str(out)], check=True)


if __name__ == "__main__":
    main()
