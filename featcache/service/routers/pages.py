"""Pages for people: the web page at ``/ui`` and the API documentation at ``/docs`` and ``/redoc``.

Everything is served from files installed with the packages, so the pages work with no network:
the page from ``featcache/service/ui/``, Swagger UI's and ReDoc's scripts from ``fastapi-offline``'s
copies (ReDoc's with its one network fetch, a logo, taken out). The pages hold no data and no secret and are the same for every server, so they are open
without the API key; the data they show comes from ``/v1/*``, which needs it when one is set.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
DOCS_ASSETS = "/docs-assets"
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


def docs_assets_dir() -> Path:
    """Swagger UI's and ReDoc's files as shipped by fastapi-offline (a dependency)."""
    return Path(str(resources.files("fastapi_offline") / "static"))


@functools.cache
def redoc_js() -> bytes:
    """ReDoc's standalone script with the one file it fetches from the network at run time (the
    "API docs by Redocly" logo) replaced by an empty image, which ReDoc then leaves out."""
    js = (docs_assets_dir() / "redoc.standalone.js").read_bytes()
    return js.replace(REDOC_LOGO, b"data:,")


def add_pages(app: FastAPI) -> None:
    """Mount ``/ui`` (the page), ``/docs`` and ``/redoc`` (offline), and send ``/`` to the page."""
    title = f"{app.title} {app.version}"

    @app.get(f"{DOCS_ASSETS}/redoc.standalone.js", include_in_schema=False)  # before the mount, which would take it
    async def redoc_script() -> Response:
        return Response(redoc_js(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=3600"})

    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    app.mount(DOCS_ASSETS, StaticFiles(directory=docs_assets_dir()), name="docs-assets")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} - API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from the validator site

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{title} - API",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)
