"""POST /v1/classify with a named head; POST /v1/heads/{name}/reload swaps a retrained head live."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Path, UploadFile

from ...errors import UsageError
from ..deps import get_state, require_form
from ..embedding import embed_members, embed_upload
from ..models import ClassifyResponse, LabelScore, ReloadResponse
from ..state import ServiceState

router = APIRouter(prefix="/v1", tags=["classify"])


@router.post("/classify", response_model=ClassifyResponse, dependencies=[Depends(require_form)])
async def classify(image: UploadFile | None = File(None, description="the image file (or give sha256)"),
                   sha256: str | None = Form(None, pattern="^[0-9a-f]{64}$",
                                             description="a cached image's content hash (or give image): "
                                                         "its cached vector is classified, with no model work"),
                   head: str | None = Form(None, max_length=128, description="head name (optional with one head)"),
                   top_k: int = Form(5, ge=1, le=100, description="how many labels to return"),
                   state: ServiceState = Depends(get_state)) -> ClassifyResponse:
    """Class probabilities from a named head over an uploaded image's embedding or a cached image's vector."""
    if (image is None) == (sha256 is None):
        raise UsageError("give exactly one of: an image file, or a sha256")
    loaded = state.heads.get(head)  # hold this head for the whole request, even if it is reloaded meanwhile
    bundle = loaded.bundle
    timings: dict[str, float] = {}
    if bundle.is_ensemble:  # each member backbone's vector, in member order
        members = bundle.members
        if image is not None:
            vecs = await embed_members(state, image, members, timings)
        else:
            vecs = await asyncio.to_thread(lambda: [state.catalogues[m.fingerprint].vector(sha256, m.tap)
                                                    for m in members])
        x, fp = [v[None] for v in vecs], [m.fingerprint for m in members]
    else:
        if image is not None:
            vec = (await embed_upload(state, image, timings))[bundle.tap]
        else:
            vec = await asyncio.to_thread(state.catalogue.vector, sha256, bundle.tap)
        x, fp = vec[None], state.fingerprint
    with state.metrics.time("head", timings):  # off the event loop: a kNN head searches its references
        proba = (await asyncio.to_thread(bundle.predict_proba, x, fp))[0]
    order = np.argsort(-proba)[:top_k]
    labels = bundle.labels
    return ClassifyResponse(head=loaded.name, fingerprint=bundle.fingerprint, label=str(labels[int(order[0])]),
                            top=[LabelScore(label=str(labels[int(i)]), probability=float(proba[i])) for i in order],
                            timings_ms=timings)


@router.post("/heads/{name}/reload", response_model=ReloadResponse)
async def reload_head(name: str = Path(max_length=128), state: ServiceState = Depends(get_state)) -> ReloadResponse:
    """Re-read a configured head's bundle from its directory; requests in flight are not disturbed."""
    try:
        new, old = await state.heads.reload(name)
    except Exception:
        state.metrics.reloads.labels(name if name in state.heads.names() else "other", "failed").inc()
        raise
    state.metrics.reloads.labels(name, "ok").inc()
    return ReloadResponse(head=new.describe(), previous_loaded_at=old.loaded_at)
