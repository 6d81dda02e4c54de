"""Liveness and readiness: open without the API key, so probes need no secret."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..models import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is up."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def readyz(request: Request):
    """The model, heads and index are loaded."""
    if getattr(request.app.state, "fc", None) is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return HealthResponse(status="ready")
