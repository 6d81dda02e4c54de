"""POST /v1/embed: an uploaded image to its embedding."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, UploadFile

from ...errors import UsageError
from ..deps import get_state, require_form
from ..embedding import embed_upload
from ..models import EmbedResponse
from ..state import ServiceState

router = APIRouter(prefix="/v1", tags=["embed"])


@router.post("/embed", response_model=EmbedResponse, dependencies=[Depends(require_form)])
async def embed(image: UploadFile = File(description="the image file"),
                tap: str = Form("final", max_length=32, description="which tap to return"),
                state: ServiceState = Depends(get_state)) -> EmbedResponse:
    """Embed an image exactly as the batch extractor did for the served cache (same fingerprint)."""
    if tap not in state.embedder.taps:
        raise UsageError(f"tap {tap!r} is not embedded by this server (has {state.embedder.taps})")
    timings: dict[str, float] = {}
    out = await embed_upload(state, image, timings)
    vec = out[tap]
    return EmbedResponse(fingerprint=state.fingerprint, tap=tap, dim=len(vec), vector=vec.tolist(), timings_ms=timings)
