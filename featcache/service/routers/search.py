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
INLINE_EXACT_MAX = 5_000  # exact search over more vectors than this runs in a worker thread


@router.post("/search", response_model=SearchResponse, dependencies=[Depends(require_form)])
async def search(image: UploadFile | None = File(None, description="an image file (or give key)"),
                 key: str | None = Form(None, max_length=4096, description="an indexed image key (or give image)"),
                 k: int = Form(10, ge=1, le=K_MAX, description="how many neighbours"),
                 state: ServiceState = Depends(get_state)) -> SearchResponse:
    """Cosine nearest neighbours, with their labels; a key's own entry is left out of its results."""
    index = state.index
    if index is None:
        raise NotFoundError("this server has no index; start it with --index INDEX_DIR")
    if (image is None) == (key is None):
        raise UsageError("give exactly one of: an image file, or a key")
    timings: dict[str, float] = {}
    # approximate searches take well under a millisecond: a thread hop would cost more than it saves
    inline = index.kind != "flat" or len(index) <= INLINE_EXACT_MAX

    async def run(fn, *args):
        return fn(*args) if inline else await asyncio.to_thread(fn, *args)

    if image is not None:
        out = await embed_upload(state, image, timings)
        vec = out[index.manifest["tap"]]
        with state.metrics.time("search", timings):
            hits = (await run(index.search, vec[None], k))[0]
    else:
        with state.metrics.time("search", timings):
            hits = await run(index.search_key, key, k)
    label = state.catalogue.label_of
    return SearchResponse(query_key=key, k=k, timings_ms=timings,
                          hits=[SearchHit(key=h.key, sha256=h.sha256, score=h.score, label=label(h.sha256)) for h in hits])
