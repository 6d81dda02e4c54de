"""Pages for people: the web page at ``/ui`` and the API documentation at ``/docs`` and ``/redoc``.

Everything is served from files installed with the packages, so the pages work with no network:
the page from ``featcache/service/ui/``, Swagger UI's and ReDoc's scripts from ``fastapi-offline``'s
copies. The pages hold no data and no secret and are the same for every server, so they are open
without the API key; the data they show comes from ``/v1/*``, which needs it when one is set.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
DOCS_ASSETS = "/docs-assets"


def docs_assets_dir() -> Path:
    """Swagger UI's and ReDoc's files as shipped by fastapi-offline (a dependency)."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def add_pages(app: FastAPI) -> None:
    """Mount ``/ui`` (the page), ``/docs`` and ``/redoc`` (offline), and send ``/`` to the page."""
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    app.mount(DOCS_ASSETS, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    title = f"{app.title} {app.version}"

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
