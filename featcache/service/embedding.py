"""The request pipeline shared by embed, classify and search: bytes -> decode -> model."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from fastapi import UploadFile

from ..classify.bundle import Member
from ..extract.decode import load_image
from .deps import upload_bytes
from .state import ServiceState


async def embed_upload(state: ServiceState, upload: UploadFile, timings: dict[str, float]) -> dict[str, np.ndarray]:
    """Decode exactly as the batch extractor does (``load_image``), then embed via the micro-batcher."""
    data = await upload_bytes(upload, state)
    pre = state.embedder.spec.preprocess
    with state.metrics.time("decode", timings):
        x = await asyncio.get_running_loop().run_in_executor(state.decoders, load_image, data, pre,
                                                             state.config.max_pixels)
    with state.metrics.time("model", timings):
        return await state.batcher.submit(x)


async def embed_members(state: ServiceState, upload: UploadFile, members: Sequence[Member],
                        timings: dict[str, float]) -> list[np.ndarray]:
    """An ensemble head's input: each member's vector of the upload, in member order.

    The bytes are read once and decoded once per distinct preprocessing (as ``extract --backbone
    A B`` does); the member backbones then embed side by side, each in its own model threads.
    """
    data = await upload_bytes(upload, state)
    fps = list(dict.fromkeys(m.fingerprint for m in members))
    pre = {fp: state.embedders[fp].spec.preprocess for fp in fps}
    loop = asyncio.get_running_loop()
    distinct = list(dict.fromkeys(pre.values()))
    with state.metrics.time("decode", timings):
        pixels = dict(zip(distinct, await asyncio.gather(*(
            loop.run_in_executor(state.decoders, load_image, data, p, state.config.max_pixels) for p in distinct))))
    with state.metrics.time("model", timings):
        out = dict(zip(fps, await asyncio.gather(*(state.batchers[fp].submit(pixels[pre[fp]]) for fp in fps))))
    return [out[m.fingerprint][m.tap] for m in members]
