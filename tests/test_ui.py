"""The web page in a real browser (Debian's Chromium via Playwright) against a real server on loopback.

Real cache (240 Tux Paint stamps through EfficientNet-Lite0), a head trained on it, a faiss index,
real photos uploaded. What the page shows is checked against what the API answers for the same
request. Screenshots of every view go to tests/artifacts/ (not committed).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from featcache.classify.bundle import save_bundle
from featcache.classify.heads import make_head
from featcache.datasets import imagenet20
from featcache.service.app import create_app
from featcache.service.config import ServiceConfig
from featcache.store.cache import FeatureCache
from featcache.store.index import build_from_cache

from .browser import chromium, open_page, screenshot
from .live import LiveServer

KEY = "ui-test-key-0123456789"
WAIT = 120_000  # ms: the first check-view request cross-validates the head


@pytest.fixture(scope="module")
def served_dirs(tux_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ui")
    c = FeatureCache(tux_cache)
    fp = c.resolve_fingerprint()
    attrs = c.group_attrs(fp)
    f = c.read(fp)
    head = make_head("knn", n_neighbors=5).fit(f.vectors, f.labels.tolist())
    save_bundle(root / "head", head, fingerprint=fp, canon=attrs["fingerprint"], backbone=attrs["backbone"], tap="final")
    build_from_cache(tux_cache, root / "index")
    return {"cache": str(tux_cache), "heads": {"stamps": str(root / "head")}, "index": str(root / "index")}


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def open_server(served_dirs):
    with LiveServer(create_app(ServiceConfig(**served_dirs, device="cpu"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def photo() -> Path:
    return next(p for p, label in imagenet20() if label == 22)  # a bald eagle: a real photo, not in the cache


def _cards(page, grid: str) -> list[dict]:
    return page.eval_on_selector_all(f"{grid} .card", """cs => cs.map(c => ({sha: c.dataset.sha, key: c.dataset.key,
        label: c.querySelector('.label').textContent, loaded: c.querySelector('img').naturalWidth > 0}))""")


def _wait_grid(page, grid: str, **attrs) -> None:
    cond = " && ".join(f"g.dataset.{k} === {v!r}" for k, v in attrs.items()) or "true"
    page.wait_for_function(f"() => {{ const g = document.querySelector('{grid}'); "
                           f"return g && g.dataset.state === 'ready' && {cond}; }}", timeout=WAIT)


def _search_keys(client: httpx.Client, **form) -> list[str]:
    r = client.post("/v1/search", data={k: str(v) for k, v in form.items()})
    assert r.status_code == 200, r.text
    return [h["sha256"] for h in r.json()["hits"]]


def test_search_click_browse_and_check_in_a_real_browser(browser, open_server, photo):
    """Upload a real photo: the grid is the API's top-k with labels; click: that image's neighbours; browse a
    label; the check view lists the head's cross-validated mistakes and near-duplicate groups. No console errors,
    no request off loopback."""
    page, watch = open_page(browser)
    api = httpx.Client(base_url=open_server.url, timeout=120)
    page.goto(open_server.url + "/")  # / sends people to the page
    page.wait_for_selector("body[data-ready=true]")
    assert page.url.endswith("/ui/")

    # upload a real photo: k=24 thumbnails, exactly the API's top-24, labels as the API gives them
    page.set_input_files("#file", str(photo))
    _wait_grid(page, "#results", query=photo.name)
    cards = _cards(page, "#results")
    r = api.post("/v1/search", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")}, data={"k": "24"})
    hits = r.json()["hits"]
    assert [c["sha"] for c in cards] == [h["sha256"] for h in hits] and len(cards) == 24
    assert [c["label"] for c in cards] == [h["label"] for h in hits]
    assert all(c["loaded"] for c in cards)
    page.wait_for_selector("#classes li .bar")
    shown = page.eval_on_selector_all("#classes li b", "bs => bs.map(b => b.textContent)")
    r = api.post("/v1/classify", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")}, data={"top_k": "5"})
    assert shown == [t["label"] for t in r.json()["top"]]
    screenshot(page, "search-upload")

    # change k: the grid follows
    page.fill("#k", "5")
    page.dispatch_event("#k", "change")
    page.wait_for_function("document.querySelectorAll('#results .card').length === 5 && "
                           "document.querySelector('#results').dataset.state === 'ready'", timeout=WAIT)
    assert [c["sha"] for c in _cards(page, "#results")] == [h["sha256"] for h in hits[:5]]

    # click a thumbnail: its own neighbours (by key), and the head's classes for its cached vector
    target = cards[2]
    page.click(f"#results .card[data-sha='{target['sha']}']")
    _wait_grid(page, "#results", query=target["key"])
    assert [c["sha"] for c in _cards(page, "#results")] == _search_keys(api, key=target["key"], k=5)
    page.wait_for_function("!document.querySelector('#classes').textContent.includes('…')")
    screenshot(page, "search-click")

    # browse a label: the API's page of that label, counts in the label list
    page.click("nav a[data-view=browse]")
    _wait_grid(page, "#browse-grid")
    labels = api.get("/v1/labels").json()["labels"]
    listed = page.eval_on_selector_all("#labels a[data-label]", "as => as.map(a => [a.dataset.label, a.lastChild.textContent])")
    assert listed == [[lb["label"], str(lb["count"])] for lb in labels]
    page.click("#labels a[data-label=fish]")
    page.wait_for_function("document.querySelector('#browse-title').textContent.includes('fish')")
    _wait_grid(page, "#browse-grid")
    want = api.get("/v1/images", params={"label": "fish", "limit": 48}).json()["images"]
    got = _cards(page, "#browse-grid")
    assert [c["sha"] for c in got] == [i["sha256"] for i in want] and {c["label"] for c in got} == {"fish"}
    assert all(c["loaded"] for c in got)
    screenshot(page, "browse-label")

    # check: the head's most confident out-of-fold mistakes, and near-duplicate groups linking to a search
    page.click("nav a[data-view=check]")
    _wait_grid(page, "#check-grid")
    review = api.get("/v1/heads/stamps/review", params={"which": "wrong", "limit": 24}).json()
    assert review["total"] > 0 and review["folds"] == 5
    assert [c["sha"] for c in _cards(page, "#check-grid")] == [i["sha256"] for i in review["items"]]
    page.wait_for_selector("#dup-groups .group .card")
    dup = api.get("/v1/duplicates", params={"threshold": 0.97}).json()
    assert page.locator("#dup-groups .group").count() == min(dup["total"], 10) > 0
    screenshot(page, "check", full_page=True)
    first = dup["groups"][0]["images"][0]
    page.click(f"#dup-groups .card[data-sha='{first['sha256']}']")
    _wait_grid(page, "#results", query=first["key"])
    assert page.url.split("#")[1].startswith("search?")

    assert watch.errors == [], watch.errors
    assert watch.offsite == [], watch.offsite


def test_page_with_an_api_key(browser, served_dirs):
    """A server with a key: the page asks once, shows a wrong key's refusal as a readable message, then works
    (thumbnails fetched with the key), and keeps the key for the session (a reload does not ask again)."""
    with LiveServer(create_app(ServiceConfig(**served_dirs, device="cpu", api_key=KEY))) as srv:
        page, watch = open_page(browser)
        page.goto(srv.url + "/ui/#browse")
        page.wait_for_selector("#key-form:not([hidden])")
        screenshot(page, "key-asked")
        page.fill("#key-input", "wrong-key")
        page.click("#key-form button")
        page.wait_for_function("document.querySelector('#server-info').textContent.includes('missing or wrong')")
        assert page.text_content("#server-info") == "missing or wrong API key: send it in the X-API-Key header"
        assert page.text_content("#error") == ("Unauthorized (HTTP 401): missing or wrong API key: "
                                               "send it in the X-API-Key header")
        assert page.is_visible("#key-form")
        screenshot(page, "key-wrong")
        page.fill("#key-input", KEY)
        page.click("#key-form button")
        page.wait_for_selector("body[data-ready=true]")
        _wait_grid(page, "#browse-grid")
        assert page.is_hidden("#error")
        cards = _cards(page, "#browse-grid")
        assert len(cards) == 48 and all(c["loaded"] for c in cards)
        page.click(f"#browse-grid .card[data-sha='{cards[0]['sha']}']")
        _wait_grid(page, "#results", query=cards[0]["key"])
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}) as api:
            assert [c["sha"] for c in _cards(page, "#results")] == _search_keys(api, key=cards[0]["key"], k=24)
        screenshot(page, "key-search")
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert page.is_hidden("#key-form")
        # the only console errors: the browser's own log of the wrong key's 401
        assert [e for e in watch.errors if "401" not in e] == [], watch.errors
        assert watch.offsite == []


def test_api_errors_are_readable_messages(browser, served_dirs, photo):
    """A server without index and heads: the page says what is missing and shows the API's error message."""
    with LiveServer(create_app(ServiceConfig(cache=served_dirs["cache"], device="cpu"))) as srv:
        page, watch = open_page(browser)
        page.goto(srv.url + "/ui/")
        page.wait_for_selector("body[data-ready=true]")
        assert "--index" in page.text_content("#results-note")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#error:not([hidden])")
        assert page.text_content("#error") == ("NotFoundError (HTTP 404): this server has no index; "
                                               "start it with --index INDEX_DIR")
        screenshot(page, "error-no-index")
        page.goto(srv.url + "/ui/#check")
        page.wait_for_function("document.querySelector('#check-summary').textContent.includes('--head')")
        assert [e for e in watch.errors if "404" not in e] == [], watch.errors


def test_docs_and_redoc_work_offline(browser, open_server):
    """Swagger UI and ReDoc render the schema from local files: no request leaves loopback."""
    page, watch = open_page(browser)
    page.goto(open_server.url + "/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=WAIT)
    paths = httpx.get(open_server.url + "/openapi.json").json()["paths"]
    assert page.locator(".swagger-ui .opblock").count() == sum(len(ops) for ops in paths.values())
    screenshot(page, "docs")
    page.goto(open_server.url + "/redoc")
    page.wait_for_function("document.body.innerText.includes('A JPEG of a cached image, by content hash')", timeout=WAIT)
    screenshot(page, "redoc")
    assert watch.errors == [], watch.errors
    assert watch.offsite == [], watch.offsite
