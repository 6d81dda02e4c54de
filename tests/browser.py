"""Debian's Chromium driven by Playwright: how tests and benchmarks open the web page.

Playwright's own browser download cannot work here (no network beyond package registries), so it
is pointed at the system Chromium (Debian package ``chromium``; ``FEATCACHE_CHROMIUM`` overrides
the path). Every page is watched: console errors, uncaught exceptions, and any request that
leaves loopback (aborted and recorded: the page and the docs must work with no network).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("FEATCACHE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Chromium (Playwright ``Browser``), closed afterwards."""
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: install Debian's package `chromium` (make setup does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watch:
    """What a page did that a test must see: console errors, page errors, requests off loopback."""

    errors: list[str] = field(default_factory=list)
    offsite: list[str] = field(default_factory=list)


def open_page(browser, width: int = 1280, height: int = 900):
    """(page, Watch) in a fresh context (its own sessionStorage and cache)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    watch = Watch()

    def guard(route) -> None:
        host = urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost", "::1"):
            route.continue_()
        else:
            watch.offsite.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.on("console", lambda m: watch.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: watch.errors.append(f"page error: {e}"))
    return page, watch


def screenshot(page, name: str, full_page: bool = False) -> Path:
    """Save a screenshot under tests/artifacts/ (not committed) and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
