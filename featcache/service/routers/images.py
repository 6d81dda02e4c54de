"""The served images: labels with counts, paged listings, thumbnails by content hash."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from ..catalogue import CachedImage
from ..deps import get_state
from ..models import ImageItem, ImagesResponse, LabelCount, LabelsResponse
from ..state import ServiceState
from ..thumbnails import SIZE_DEFAULT, SIZE_MAX, SIZE_MIN, render

router = APIRouter(prefix="/v1", tags=["images"])
PAGE_MAX = 200  # most images (or labels: LABELS_MAX) one listing returns
LABELS_MAX = 1000
SHA256 = Path(pattern="^[0-9a-f]{64}$", description="the image's content hash (lower-case hex sha256)")
# Thumbnails of a content hash never change: browsers may keep them, but only for this user (they sit behind the key).
CACHE_CONTROL = "private, max-age=31536000, immutable"


def item(img: CachedImage) -> ImageItem:
    return ImageItem(sha256=img.sha256, key=img.key, label=img.label)


@router.get("/labels", response_model=LabelsResponse)
async def labels(offset: int = Query(0, ge=0, le=10**9), limit: int = Query(LABELS_MAX, ge=1, le=LABELS_MAX),
                 state: ServiceState = Depends(get_state)) -> LabelsResponse:
    """Every label of the served images with its image count ("" counts the unlabelled ones), by label."""
    counts = state.catalogue.label_counts()
    return LabelsResponse(images=len(state.catalogue), total=len(counts), offset=offset, limit=limit,
                          labels=[LabelCount(label=name, count=n) for name, n in counts[offset : offset + limit]])


@router.get("/images", response_model=ImagesResponse)
async def images(label: str | None = Query(None, max_length=4096,
                                           description='only this label ("" for the unlabelled; omit for all)'),
                 offset: int = Query(0, ge=0, le=10**9), limit: int = Query(48, ge=1, le=PAGE_MAX),
                 state: ServiceState = Depends(get_state)) -> ImagesResponse:
    """One page of the served images, sorted by label then key."""
    total, page = state.catalogue.page(label, offset, limit)
    return ImagesResponse(label=label, total=total, offset=offset, limit=limit, images=[item(i) for i in page])


@router.get("/images/{sha256}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG at most size x size pixels"},
                       304: {"description": "the If-None-Match ETag is current: use the copy you hold"},
                       410: {"description": "the image's file changed or went away since it was cached"}})
async def thumbnail(request: Request, sha256: str = SHA256,
                    size: int = Query(SIZE_DEFAULT, ge=SIZE_MIN, le=SIZE_MAX,
                                      description="longest side in pixels (the image is never enlarged)"),
                    state: ServiceState = Depends(get_state)) -> Response:
    """A JPEG of a cached image, by content hash; strong ETag, kept by browsers and in server memory.

    The file is re-hashed before it is shown: bytes that no longer match the hash are a 410.
    """
    t0 = time.perf_counter()
    img = state.catalogue.get(sha256)  # 404 for a hash the cache does not serve
    etag = f'"{sha256}-{size}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=_timed(headers, "etag", t0))
    key = (sha256, size)
    data = state.thumbnails.get(key)
    source = "memory"
    if data is None:
        with state.metrics.time("thumbnail", {}):
            data = await asyncio.get_running_loop().run_in_executor(state.decoders, render, img.path, sha256, size,
                                                                    state.config.max_pixels)
        state.thumbnails.put(key, data)
        source = "render"
    return Response(data, media_type="image/jpeg", headers=_timed(headers, source, t0))


def _timed(headers: dict[str, str], source: str, t0: float) -> dict[str, str]:
    """Server-Timing says where the thumbnail came from and how long the handler took (browsers show it)."""
    return {**headers, "Server-Timing": f'thumb;desc="{source}";dur={(time.perf_counter() - t0) * 1000:.3f}'}
