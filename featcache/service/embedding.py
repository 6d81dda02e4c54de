"""The request pipeline shared by embed, classify and search: bytes -> decode -> model."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import UploadFile

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
