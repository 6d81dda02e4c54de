"""The FastAPI application: routers per concern, auth and limits as dependencies, models in ``lifespan``."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from .. import __version__
from ..errors import FeatcacheError
from .config import ServiceConfig
from .deps import require_api_key
from .metrics import Metrics
from .middleware import BodyLimit, RequestMetrics
from .models import ErrorResponse
from .routers import classify, embed, health, info, search
from .state import ServiceState

log = logging.getLogger(__name__)
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 409, 413, 415, 422, 503)}


def create_app(config: ServiceConfig) -> FastAPI:
    """An app serving ``config``; the model, heads and index load in ``lifespan`` (refusing mismatches)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServiceState(config, metrics)  # raises FingerprintMismatch for a foreign head or index
        await state.batcher.start()
        app.state.fc = state
        log.info("featcache service ready: fingerprint %s", state.fingerprint)
        try:
            yield
        finally:
            app.state.fc = None
            await state.batcher.stop()

    app = FastAPI(title="featcache", version=__version__, lifespan=lifespan,
                  description="Embeddings, classification and similarity search over a featcache cache.")
    app.state.metrics = metrics
    app.state.fc = None
    secured = [Depends(require_api_key)]
    app.include_router(health.router)
    for r in (embed.router, classify.router, search.router, info.router):
        app.include_router(r, dependencies=secured, responses=_ERRORS)

    @app.exception_handler(FeatcacheError)
    async def featcache_error(request: Request, exc: FeatcacheError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=exc.http_status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": type(exc).__name__, "message": "internal error (logged on the server)"},
                            status_code=500)

    routes = ("/healthz", "/readyz", "/metrics", "/v1/embed", "/v1/classify", "/v1/search", "/v1/info",
              "/docs", "/openapi.json")
    app.add_middleware(RequestMetrics, metrics=metrics, routes=routes)
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes + 64 * 1024)  # room for multipart framing
    return app


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app under uvicorn (one process; the model thread and micro-batcher live in it)."""
    import uvicorn

    from .state import preflight

    preflight(config)  # a foreign head or index fails here, with the CLI's exit code, not inside uvicorn
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)
