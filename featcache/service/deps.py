"""Dependencies: the loaded state, API-key auth, multipart checks, upload limits."""

from __future__ import annotations

import hmac

from fastapi import Request, Security, UploadFile
from fastapi.security import APIKeyHeader

from ..errors import FeatcacheError, TooLarge, UnsupportedMedia
from .config import ServiceConfig
from .state import ServiceState

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server has an API key")


class Unauthorized(FeatcacheError):
    """Missing or wrong API key."""

    http_status = 401


class NotReady(FeatcacheError):
    """Still loading."""

    http_status = 503


# The dependencies are ``async def`` though they never await: FastAPI runs a plain ``def``
# dependency in its thread pool, a thread hop per dependency per request.
async def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "fc", None)
    if state is None:
        raise NotReady("the service is still loading its model; retry in a moment")
    return state


async def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    """401 unless the X-API-Key header equals the configured key (constant-time comparison).

    Reads the configuration, not the loaded state, so a wrong key is refused while the model still loads.
    """
    config: ServiceConfig = request.app.state.config
    want = config.api_key
    if want is None:
        return
    if key is None or not hmac.compare_digest(key.encode(), want.encode()):
        raise Unauthorized("missing or wrong API key: send it in the X-API-Key header")


async def require_form(request: Request) -> None:
    """415 for a body that is not a form (multipart/form-data for uploads; urlencoded for fields only)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise UnsupportedMedia(f"send multipart/form-data (a file field 'image' and form fields), not {ctype or 'no content type'!r}")


_OK_TYPES = ("image/", "application/octet-stream")


async def upload_bytes(upload: UploadFile, state: ServiceState) -> bytes:
    """The uploaded file's bytes, after content-type and size checks."""
    ctype = (upload.content_type or "application/octet-stream").lower()
    if not ctype.startswith(_OK_TYPES):
        raise UnsupportedMedia(f"uploaded part has content type {ctype!r}; send an image (image/jpeg, image/png, ...)")
    limit = state.config.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"upload is larger than the limit of {limit:,} bytes")
    return data
