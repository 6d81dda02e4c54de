"""POST /v1/search: nearest cached images to an uploaded image or to an indexed key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, UploadFile

from ...errors import NotFoundError, UsageError
from ..deps import get_state, require_form
from ..embedding import embed_upload
from ..models import SearchHit, SearchResponse
from ..state import K_MAX, ServiceState

router = APIRouter(prefix="/v1", tags=["search"])


@router.post("/search", response_model=SearchResponse, dependencies=[Depends(require_form)])
async def search(image: UploadFile | None = File(None, description="an image file (or give key)"),
                 key: str | None = Form(None, max_length=4096, description="an indexed image key (or give image)"),
                 k: int = Form(10, ge=1, le=K_MAX, description="how many neighbours"),
                 state: ServiceState = Depends(get_state)) -> SearchResponse:
    """Cosine nearest neighbours; a key's own entry is left out of its results."""
    index = state.index
    if index is None:
        raise NotFoundError("this server has no index; start it with --index INDEX_DIR")
    if (image is None) == (key is None):
        raise UsageError("give exactly one of: an image file, or a key")
    timings: dict[str, float] = {}
    if image is not None:
        out = await embed_upload(state, image, timings)
        vec = out[index.manifest["tap"]]
        with state.metrics.time("search", timings):
            hits = (await asyncio.to_thread(index.search, vec[None], k))[0]
    else:
        with state.metrics.time("search", timings):
            hits = await asyncio.to_thread(index.search_key, key, k)
    return SearchResponse(query_key=key, k=k, timings_ms=timings,
                          hits=[SearchHit(key=h.key, sha256=h.sha256, score=h.score) for h in hits])
