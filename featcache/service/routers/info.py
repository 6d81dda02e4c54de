"""GET /v1/info: what this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import get_state
from ..models import InfoResponse
from ..state import ServiceState

router = APIRouter(prefix="/v1", tags=["info"])


@router.get("/info", response_model=InfoResponse)
async def info(state: ServiceState = Depends(get_state)) -> InfoResponse:
    """Fingerprint, backbone, heads, index statistics, batching and limits."""
    return InfoResponse(**state.describe())
