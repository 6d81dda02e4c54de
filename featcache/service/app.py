"""The FastAPI application: routers per concern, auth and limits as dependencies, models in ``lifespan``.

Every error body, FastAPI's own validation and routing errors included, is an ``ErrorResponse``
(``{"error", "message"}``), and the OpenAPI schema says so.

What is open without the API key: what holds no data and no secret and is the same for every
server: ``/healthz``, ``/readyz`` (probes), ``/openapi.json``, ``/docs``, ``/redoc`` and their
assets, and the page's files (``/``, ``/ui/``). Behind the key when one is set: everything that
answers with the served data or the server's traffic, ``/v1/*`` (thumbnails included) and
``/metrics``. The page asks for the key and sends it on its own ``/v1`` calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from http import HTTPStatus

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import FeatcacheError
from .config import ServiceConfig
from .deps import require_api_key
from .metrics import Metrics
from .middleware import RequestLimits, RequestMetrics
from .models import ErrorResponse
from .routers import classify, embed, health, images, info, metrics, review, search
from .routers.pages import add_pages
from .state import Plan, ServiceState, preflight

log = logging.getLogger(__name__)
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 409, 410, 413, 415, 422, 503)}
_AUTH = {401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key (when the server has a key)"}}
_ANY = {431: {"model": ErrorResponse, "description": "request headers over the size limit"}}


def create_app(config: ServiceConfig, plan: Plan | None = None) -> FastAPI:
    """An app serving ``config``; the model, heads and index load in ``lifespan`` (refusing mismatches).

    ``plan`` is what ``preflight`` already read (``serve`` passes it, so nothing is read twice).
    """
    metrics_ = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServiceState(config, metrics_, plan)  # raises FingerprintMismatch for a foreign head or index
        for batcher in state.batchers.values():  # the served backbone's and each ensemble member's
            await batcher.start()
        app.state.fc = state
        log.info("featcache service ready: fingerprint %s", state.fingerprint)
        try:
            yield
        finally:
            app.state.fc = None
            for batcher in state.batchers.values():
                await batcher.stop()
            state.decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="featcache", version=__version__, lifespan=lifespan, responses=_ANY,
                  docs_url=None, redoc_url=None,  # served from local files by add_pages
                  description="Embeddings, classification and similarity search over a featcache cache. "
                              "A web page for people is at /ui/.")
    app.state.config = config
    app.state.metrics = metrics_
    app.state.fc = None
    secured = [Depends(require_api_key)]
    app.include_router(health.router)
    app.include_router(metrics.router, dependencies=secured, responses=_AUTH)
    for r in (embed.router, classify.router, search.router, info.router, images.router, review.router):
        app.include_router(r, dependencies=secured, responses=_ERRORS | _AUTH)
    add_pages(app)
    if config.api_key is None:
        _drop_security_from_schema(app)

    @app.exception_handler(FeatcacheError)
    async def featcache_error(request: Request, exc: FeatcacheError) -> JSONResponse:
        return _error(type(exc).__name__, str(exc), exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error("ValidationError", _validation_message(exc), 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404 no route, 405 wrong method
        try:
            name = HTTPStatus(exc.status_code).phrase.replace(" ", "")
        except ValueError:
            name = "HTTPError"
        return _error(name, str(exc.detail), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(type(exc).__name__, "internal error (logged on the server)", 500)

    app.add_middleware(RequestLimits, max_body_bytes=config.max_upload_bytes + 64 * 1024,  # room for multipart framing
                       max_header_bytes=config.max_header_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics_)  # outermost: counts the limits' refusals too
    return app


def _error(error: str, message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error, message=message).model_dump(), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """One line naming each invalid field: ``k: Input should be less than or equal to 100; ...``."""
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ())]
        field = ".".join(loc[1:] if len(loc) > 1 else loc) or "request"
        parts.append(f"{field}: {' '.join(str(e.get('msg', 'invalid')).split())}")
    return "invalid request: " + "; ".join(parts)


def _drop_security_from_schema(app: FastAPI) -> None:
    """A server without an API key documents no security scheme: its schema says what it enforces."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.pop("security", None)
        schema.get("components", {}).pop("securitySchemes", None)
        return schema

    app.openapi = openapi


def _say(line: str) -> None:
    print(line, flush=True)


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          access_log: bool = False, out: Callable[[str], None] = _say) -> None:
    """Run the app under uvicorn (one process; the model thread and micro-batcher live in it).

    Says on ``out`` what it loaded and where it listens once it does (the real port, also for
    ``port=0``). ``log_level`` applies to uvicorn's and featcache's loggers; ``access_log`` logs
    one line per request (at any level).
    """
    plan = preflight(config)  # a foreign head or index fails here, with the CLI's exit code, not inside uvicorn
    app = create_app(config, plan)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log)
    logging.getLogger("featcache").setLevel(log_level.upper())
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    _AnnouncingServer(uv_config, app, out).run()


def describe_start(state: ServiceState, url: str) -> list[str]:
    """What ``serve`` prints once it listens: where, and what it loaded."""
    info = state.describe()
    heads = ", ".join(f"{h['name']} ({h['type']}, {len(h['labels'])} labels, tap {h['tap']})" for h in info["heads"])
    index = info["index"]
    lines = [
        f"featcache serve: listening on {url}",
        f"  page     {url}/ui/",
        f"  API      {url}/docs  (schema {url}/openapi.json)",
        f"  cache    {state.catalogue.cache.root}  ({info['images']:,} images, fingerprint {info['fingerprint']}, "
        f"{info['backbone']}, {info['device']}/{info['precision']})",
        f"  heads    {heads or 'none (classify and check need --head NAME=HEAD_DIR)'}",
        "  index    " + (f"{index['kind']}, {index['count']:,} vectors, tap {index['tap']}" if index
                        else "none (search needs --index INDEX_DIR)"),
        "  API key  " + ("required on /v1/* and /metrics (X-API-Key)" if state.config.api_key
                         else "none: everything is open (bind to loopback, or set --api-key-file)"),
    ]
    return lines


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints ``describe_start`` once its sockets are bound (so the port is the real one)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, out: Callable[[str], None]):
        super().__init__(config)
        self.app, self.out = app, out

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        for line in describe_start(self.app.state.fc, f"http://{shown}:{port}"):
            self.out(line)
