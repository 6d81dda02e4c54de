"""The HTTP service, run for real: uvicorn on a free loopback port, httpx clients, real images and heads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from featcache.classify.bundle import save_bundle
from featcache.classify.heads import make_head
from featcache.cli import main
from featcache.errors import FingerprintMismatch
from featcache.runtime import available_cpus
from featcache.service.app import create_app
from featcache.service.config import ServiceConfig
from featcache.service.metrics import Metrics
from featcache.service.state import ServiceState, preflight
from featcache.store.cache import FeatureCache
from featcache.store.index import CacheMismatch, VectorIndex, build_from_cache

from .live import LiveServer

KEY = "test-key-0123456789"
MAX_UPLOAD = 2 * 1024 * 1024


def _save_head(cache: Path, out: Path, kind: str = "knn", **params) -> Path:
    c = FeatureCache(cache)
    fp = c.resolve_fingerprint()
    attrs = c.group_attrs(fp)
    f = c.read(fp)
    head = make_head(kind, **params).fit(f.vectors, f.labels.tolist())
    return save_bundle(out, head, fingerprint=fp, canon=attrs["fingerprint"], backbone=attrs["backbone"], tap="final")


@pytest.fixture(scope="module")
def files(imagenet_dir) -> list[Path]:
    return sorted(Path(imagenet_dir).rglob("*.jpg"))


@pytest.fixture(scope="module")
def served(imagenet_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    heads = {"nn1": _save_head(imagenet_cache, root / "nn1", n_neighbors=1),
             "nn3": _save_head(imagenet_cache, root / "nn3", n_neighbors=3)}
    build_from_cache(imagenet_cache, root / "index")
    cfg = ServiceConfig(cache=str(imagenet_cache), heads={k: str(v) for k, v in heads.items()}, index=str(root / "index"),
                        api_key=KEY, device="cpu", max_upload_bytes=MAX_UPLOAD, batching=True, max_batch=8, max_wait_ms=5)
    with LiveServer(create_app(cfg)) as srv:
        yield srv, cfg, root


@pytest.fixture(scope="module")
def open_server(served):
    """The same heads and index on a server without an API key (CPU defaults: no batching)."""
    cfg = served[1]
    open_cfg = ServiceConfig(cache=cfg.cache, heads=cfg.heads, index=cfg.index, device="cpu", max_upload_bytes=MAX_UPLOAD)
    with LiveServer(create_app(open_cfg)) as srv:
        yield srv


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0].url, headers={"X-API-Key": KEY}, timeout=60) as c:
        yield c


def _post_image(client: httpx.Client, path: str, data: bytes, ctype: str = "image/jpeg", **form) -> httpx.Response:
    return client.post(path, files={"image": ("upload", data, ctype)}, data={k: str(v) for k, v in form.items()})


def test_health_info_docs_metrics(client, imagenet_cache):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/embed", "/v1/classify", "/v1/search", "/v1/info", "/v1/heads/{name}/reload"} <= set(spec["paths"])
    info = client.get("/v1/info").json()
    fp = FeatureCache(imagenet_cache).resolve_fingerprint()
    assert info["fingerprint"] == fp and info["backbone"] == "efficientnet_lite0"
    assert [h["name"] for h in info["heads"]] == ["nn1", "nn3"]
    assert info["index"]["count"] == 20 and info["index"]["kind"] == "flat"
    assert info["batching"]["enabled"] is True
    text = client.get("/metrics").text
    assert "featcache_stage_seconds" in text and 'featcache_requests_total{route="/v1/info",status="200"}' in text


def test_api_key_required_constant_time(served, open_server):
    """With a key: /v1/* and /metrics need it; probes and the API's own documentation stay open."""
    url = served[0].url
    assert httpx.get(url + "/v1/info").status_code == 401
    assert httpx.get(url + "/v1/info", headers={"X-API-Key": "wrong"}).status_code == 401
    r = httpx.post(url + "/v1/search", data={"key": "x"})
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
    r = httpx.get(url + "/metrics")
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
    for open_path in ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json"):
        assert httpx.get(url + open_path).status_code == 200, open_path
    assert httpx.get(url + "/v1/info", headers={"X-API-Key": KEY}).status_code == 200
    assert "featcache_requests_total" in httpx.get(url + "/metrics", headers={"X-API-Key": KEY}).text
    spec = httpx.get(url + "/openapi.json").json()
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    # without a key everything is open, and the schema documents no security scheme
    assert httpx.get(open_server.url + "/metrics").status_code == 200
    assert httpx.get(open_server.url + "/v1/info").status_code == 200
    open_spec = httpx.get(open_server.url + "/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert not any("security" in op for path in open_spec["paths"].values() for op in path.values())


def _cosines_to_cache(client: httpx.Client, cache: Path, files: list[Path], clients: int = 1) -> list[float]:
    """Cosine of each real image's ``POST /v1/embed`` vector with its batch-extracted cache vector."""
    feats = FeatureCache(cache).read()
    by_sha = {s: v for s, v in zip(feats.sha256.tolist(), feats.vectors, strict=True)}

    def one(path: Path) -> float:
        data = path.read_bytes()
        r = _post_image(client, "/v1/embed", data)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["fingerprint"] == feats.fingerprint and body["dim"] == 1280
        v, want = np.array(body["vector"], np.float32), by_sha[hashlib.sha256(data).hexdigest()]
        return float(v @ want / np.linalg.norm(v) / np.linalg.norm(want))

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, files))


def test_parity_with_the_batch_extractor(client, imagenet_cache, files):
    """The service embeds each real image as the extractor did for the cache: cosine >= 0.9999."""
    assert min(_cosines_to_cache(client, imagenet_cache, files)) >= 0.9999


def test_cpu_default_runs_one_pass_per_core_with_parity(open_server, imagenet_cache, files, capsys):
    """The CPU default: no micro-batching, one single-threaded forward pass per core, side by side."""
    with httpx.Client(base_url=open_server.url, timeout=60) as c:
        batching = c.get("/v1/info").json()["batching"]
        assert batching["enabled"] is False and batching["workers"] == available_cpus()
        assert min(_cosines_to_cache(c, imagenet_cache, files, clients=8)) >= 0.9999
    assert main(["serve", "--cache", str(imagenet_cache), "--model-workers", "0", "--port", "1"]) == 2
    assert "--model-workers must be at least 1" in capsys.readouterr().err


def test_classify_and_search(client, files, imagenet_dir, served):
    img = files[5]
    label = img.parent.name
    r = _post_image(client, "/v1/classify", img.read_bytes(), head="nn1", top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["head"] == "nn1" and body["label"] == label and len(body["top"]) == 3
    assert {"decode", "model", "head"} <= set(body["timings_ms"])

    r = _post_image(client, "/v1/search", img.read_bytes(), k=3)
    hits = r.json()["hits"]
    key = img.relative_to(imagenet_dir).as_posix()
    assert hits[0]["key"] == key and hits[0]["score"] > 0.9999

    r = client.post("/v1/search", data={"key": key, "k": "4"})
    assert r.status_code == 200, r.text
    want = VectorIndex.load(served[2] / "index").search_key(key, 4)
    assert [h["key"] for h in r.json()["hits"]] == [h.key for h in want]
    assert key not in [h["key"] for h in r.json()["hits"]]


def _photo_png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((64, 48)).save(buf, "PNG")
    return buf.getvalue()


def _bomb(png: bytes, width: int = 50_000, height: int = 50_000) -> bytes:
    """A real PNG whose IHDR is rewritten (CRC fixed) to claim width x height: a decompression bomb."""
    ihdr = bytearray(png[12:29])  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    return png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF) + png[33:]


def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(client, files):
    jpeg = files[1].read_bytes()
    png = _photo_png(files[2])
    cases = {
        "truncated jpeg": (jpeg[: len(jpeg) // 3], "image/jpeg", 422),
        "empty file": (b"", "image/jpeg", 422),
        "text file": (b"not an image at all\n" * 20, "image/png", 415),
        "random bytes": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "image/png", 415),
        "decompression bomb": (_bomb(png), "image/png", 413),
        "header only png": (png[:40], "image/png", (415, 422)),
        "wrong part content type": (jpeg, "text/plain", 415),
    }
    for name, (data, ctype, status) in cases.items():
        for path in ("/v1/embed", "/v1/classify", "/v1/search"):
            r = _post_image(client, path, data, ctype, **({"head": "nn1"} if path == "/v1/classify" else {}))
            assert r.status_code in (status if isinstance(status, tuple) else (status,)), (name, path, r.status_code, r.text)
            assert r.json()["message"], name
    assert client.post("/v1/embed", json={"image": "x"}).status_code == 415  # not multipart
    assert client.post("/v1/embed", content=b"\x00" * 10, headers={"content-type": "image/jpeg"}).status_code == 415
    big = np.random.default_rng(1).integers(0, 256, MAX_UPLOAD + 200_000, dtype=np.uint8).tobytes()
    assert _post_image(client, "/v1/embed", big).status_code == 413

    def chunks():  # no Content-Length: the limit applies while streaming
        boundary = b"--b0undary\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n" \
                   b"Content-Type: image/jpeg\r\n\r\n"
        yield boundary
        for _ in range(40):
            yield b"\xff" * 65536
        yield b"\r\n--b0undary--\r\n"

    r = client.post("/v1/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 413, r.text
    for k in ("0", "101", "ten"):  # FastAPI's validation errors come as ErrorResponse too, one line naming the field
        r = client.post("/v1/search", data={"key": "x", "k": k})
        assert r.status_code == 422 and r.json()["error"] == "ValidationError", r.text
        assert set(r.json()) == {"error", "message"} and r.json()["message"].startswith("invalid request: k: ")
    r = client.post("/v1/heads/" + "x" * 200 + "/reload")
    assert r.status_code == 422 and r.json()["error"] == "ValidationError" and "name" in r.json()["message"]
    r = client.get("/v1/search")  # wrong method: 405 with its Allow header, as an ErrorResponse
    assert (r.status_code, r.json()["error"], r.headers["allow"]) == (405, "MethodNotAllowed", "POST")
    r = client.get("/no/such/endpoint")
    assert (r.status_code, r.json()["error"]) == (404, "NotFound")
    assert _post_image(client, "/v1/classify", jpeg, head="missing").status_code == 404
    assert client.post("/v1/search", data={"key": "no/such.jpg"}).status_code == 404
    assert _post_image(client, "/v1/search", jpeg, key="x").status_code == 400  # both image and key
    assert client.post("/v1/search", data={"k": "3"}).status_code == 400  # neither
    assert client.post("/v1/heads/nope/reload").status_code == 404
    # still serving
    assert _post_image(client, "/v1/classify", jpeg, head="nn1").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_reload_under_concurrent_load_fails_no_request(client, served, imagenet_cache, files):
    srv, cfg, root = served
    images = [p.read_bytes() for p in files[:8]]
    stop = threading.Event()
    statuses: list[int] = []

    def hammer(i: int) -> None:
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}, timeout=60) as c:
            while not stop.is_set():
                r = _post_image(c, "/v1/classify", images[i % len(images)], head="nn3")
                statuses.append(r.status_code)

    with ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(hammer, i) for i in range(6)]
        time.sleep(0.5)
        for n_neighbors in (5, 2, 3):  # retrain the head in place, then reload it while requests run
            _save_head(imagenet_cache, Path(cfg.heads["nn3"]), n_neighbors=n_neighbors)
            r = client.post("/v1/heads/nn3/reload")
            assert r.status_code == 200, r.text
            time.sleep(0.3)
        stop.set()
        for f in futs:
            f.result()
    assert len(statuses) >= 12 and set(statuses) == {200}, statuses
    info = client.get("/v1/info").json()
    nn3 = next(h for h in info["heads"] if h["name"] == "nn3")
    assert nn3["reloads"] == 3
    # a broken bundle is refused; the old head keeps serving
    (Path(cfg.heads["nn1"]) / "manifest.json").write_text("{not json")
    try:
        r = client.post("/v1/heads/nn1/reload")
        assert r.status_code == 409 and "still serving" in r.json()["message"]
        assert _post_image(client, "/v1/classify", images[0], head="nn1").status_code == 200
    finally:
        _save_head(imagenet_cache, Path(cfg.heads["nn1"]), n_neighbors=1)
    metrics = client.get("/metrics").text
    assert 'featcache_head_reloads_total{head="nn3",result="ok"} 3.0' in metrics


def test_concurrent_requests_share_forward_passes(client, served, files):
    images = [p.read_bytes() for p in files[:8]]

    def one(i: int) -> int:
        return _post_image(client, "/v1/embed", images[i]).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8
    text = client.get("/metrics").text
    count = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("featcache_batch_size_count")))
    total = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("featcache_batch_size_sum")))
    assert total / count > 1.0  # some forward passes carried several requests
    for stage in ("decode", "model", "head", "search"):
        assert f'featcache_stage_seconds_count{{stage="{stage}"}}' in text


def test_refuses_heads_and_indexes_of_another_fingerprint(imagenet_cache, tmp_path, capsys):
    c = FeatureCache(imagenet_cache)
    fp = c.resolve_fingerprint()
    attrs = c.group_attrs(fp)
    f = c.read(fp)
    head = make_head("knn", n_neighbors=1).fit(f.vectors, f.labels.tolist())
    foreign = "f" * 20
    save_bundle(tmp_path / "head", head, fingerprint=foreign, canon={**attrs["fingerprint"], "precision": "bf16"},
                backbone=attrs["backbone"], tap="final")
    cfg = ServiceConfig(cache=str(imagenet_cache), heads={"h": str(tmp_path / "head")}, device="cpu")
    with pytest.raises(FingerprintMismatch):
        preflight(cfg)
    with pytest.raises(FingerprintMismatch):
        ServiceState(cfg, Metrics())
    assert main(["serve", "--cache", str(imagenet_cache), "--head", f"h={tmp_path / 'head'}", "--port", "1"]) == 5

    vi = VectorIndex.build(f.vectors, np.arange(len(f)), f.keys, f.sha256, fingerprint=foreign, canon={},
                           backbone={"name": "other"}, tap="final")
    vi.save(tmp_path / "index")
    with pytest.raises(FingerprintMismatch):
        preflight(ServiceConfig(cache=str(imagenet_cache), index=str(tmp_path / "index")))
    capsys.readouterr()


# A schema cannot say "these bytes decode as an image" (415/422), "exactly one of image and key" or
# "a tap this server embeds" (400): schema-valid requests may get those, and only those, refusals.
_SCHEMATHESIS_CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "404", "409", "413", "415", "422"]
"""


def test_openapi_fuzz_finds_no_server_error(served, open_server, tmp_path):
    """Schemathesis, every check, over the whole spec of a real server with and without an API key
    (bounded: 10 examples per operation): no server error, no response outside the documented schema."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(_SCHEMATHESIS_CONFIG)
    for srv, headers in ((served[0], ["-H", f"X-API-Key: {KEY}"]), (open_server, [])):
        run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
                              "run", srv.url + "/openapi.json", "--checks", "all", "--max-examples", "10",
                              "--seed", "0", "--workers", "1", *headers],
                             capture_output=True, text=True, timeout=240, cwd=tmp_path)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-6000:]
        assert "Tested: 13" in out and " passed" in out, out[-3000:]
        text = httpx.get(srv.url + "/metrics", headers={"X-API-Key": KEY}).text
        counts = [ln for ln in text.splitlines() if ln.startswith("featcache_requests_total{")]
        assert counts and not [ln for ln in counts if 'status="5' in ln], counts
        assert httpx.get(srv.url + "/healthz").status_code == 200


def test_huge_headers_are_refused_with_431(client, served):
    """uvicorn (httptools) takes headers of any size: the app refuses over 16 KiB in all, before auth."""
    url = served[0].url
    r = httpx.get(url + "/v1/info", headers={"X-API-Key": KEY, "X-Padding": "a" * (1 << 20)})
    assert r.status_code == 431 and r.json()["error"] == "HeadersTooLarge", r.text
    assert r.json()["message"].endswith("over the limit of 16,384")
    r = httpx.get(url + "/healthz", headers=[("X-Many", "b" * 1000)] * 20)  # many headers count together
    assert r.status_code == 431
    assert client.get("/v1/info", headers={"X-Padding": "c" * 8000}).status_code == 200  # under the limit
    assert client.get("/v1/info").json()["limits"]["max_header_bytes"] == 16 * 1024


def test_metrics_label_routes_by_their_templates(client):
    """Route labels come from the app's own routes: templates, never raw paths; no route is "other"."""
    client.post("/v1/heads/nope-1/reload")
    client.post("/v1/heads/nope-2/reload")
    client.get("/no/such/path-1")
    client.get("/healthz", headers={"X-Padding": "d" * 20_000})
    client.get("/v1/info")
    text = client.get("/metrics").text
    labels = {ln.split('route="')[1].split('"')[0] for ln in text.splitlines() if ln.startswith("featcache_requests_total{")}
    assert {"/v1/heads/{name}/reload", "/v1/info", "other"} <= labels
    assert not [x for x in labels if "nope" in x or "such" in x], labels
    assert 'featcache_requests_total{route="/v1/heads/{name}/reload",status="404"}' in text
    assert 'featcache_requests_total{route="other",status="431"}' in text


_OPENED: list[str] | None = None  # paths opened while a test records (a process-wide audit hook)


def _record_open(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _OPENED.append(os.fspath(args[0]))


def test_service_reads_each_head_and_the_index_once(imagenet_cache, tmp_path):
    """Start-up reads manifests in preflight, then each head bundle and the index once (it used to read
    heads four times and the index three). Counted by Python's audit hook on real file opens."""
    global _OPENED
    heads = {n: str(_save_head(imagenet_cache, tmp_path / n, n_neighbors=k)) for n, k in (("a", 1), ("b", 3))}
    build_from_cache(imagenet_cache, tmp_path / "index")
    cfg = ServiceConfig(cache=str(imagenet_cache), heads=heads, index=str(tmp_path / "index"), device="cpu")
    sys.addaudithook(_record_open)
    _OPENED = []
    try:
        with LiveServer(create_app(cfg)) as srv:
            assert httpx.get(srv.url + "/v1/info").json()["index"]["count"] == 20
    finally:
        opened, _OPENED = _OPENED, None
    counts = {str(Path(p).relative_to(tmp_path)): opened.count(p) for p in set(opened) if p.startswith(str(tmp_path))}
    assert counts == {"a/manifest.json": 2, "b/manifest.json": 2,  # preflight + load
                      "index/manifest.json": 2, "index/ids.npy": 1, "index/keys.npy": 1, "index/sha256.npy": 1,
                      "index/deleted.npy": 1}, counts


def test_refuses_an_index_of_another_cache(imagenet_cache, imagenet_dir, tmp_path, lite0_embedder, capsys):
    """Same fingerprint, other cache: the index's ids are the other cache's rows, so serve refuses it."""
    from featcache.extract.pipeline import ExtractConfig, Extraction

    src = tmp_path / "src"
    for p in sorted(Path(imagenet_dir).rglob("*.jpg"))[:6]:
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        (src / p.parent.name / p.name).write_bytes(p.read_bytes())
    other = tmp_path / "other-cache"
    Extraction(ExtractConfig(str(src), str(other), progress=False), lite0_embedder).run()
    assert FeatureCache(other).resolve_fingerprint() == FeatureCache(imagenet_cache).resolve_fingerprint()
    build_from_cache(other, tmp_path / "index")
    cfg = ServiceConfig(cache=str(imagenet_cache), index=str(tmp_path / "index"), device="cpu")
    with pytest.raises(CacheMismatch, match=f"built from cache {other}.*not from cache {imagenet_cache}"):
        preflight(cfg)
    with pytest.raises(CacheMismatch):
        ServiceState(cfg, Metrics())
    capsys.readouterr()
    assert main(["serve", "--cache", str(imagenet_cache), "--index", str(tmp_path / "index"), "--port", "1", "--json"]) == 5
    err = json.loads(capsys.readouterr().out)
    assert err["error"] == "CacheMismatch" and str(other) in err["message"] and str(imagenet_cache) in err["message"]


# -- the page's API: thumbnails, listings, labels in hits, classify by content hash (issue 14) ---------------
def test_thumbnails_by_content_hash(client, served, imagenet_cache):
    """A JPEG within the size asked, strong ETag, 304 on revalidation, the second one from server memory."""
    feats = FeatureCache(imagenet_cache).read()
    sha = str(feats.sha256[0])
    r = client.get(f"/v1/images/{sha}/thumbnail", params={"size": 64})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) == 64
    assert r.headers["etag"] == f'"{sha}-64"' and "immutable" in r.headers["cache-control"]
    assert 'desc="render"' in r.headers["server-timing"]
    again = client.get(f"/v1/images/{sha}/thumbnail", params={"size": 64})
    assert again.content == r.content and 'desc="memory"' in again.headers["server-timing"]
    r304 = client.get(f"/v1/images/{sha}/thumbnail", params={"size": 64}, headers={"If-None-Match": r.headers["etag"]})
    assert r304.status_code == 304 and not r304.content and r304.headers["etag"] == r.headers["etag"]
    big = client.get(f"/v1/images/{sha}/thumbnail", params={"size": 512})
    assert max(Image.open(io.BytesIO(big.content)).size) <= 512
    for size in ("31", "513", "x"):
        assert client.get(f"/v1/images/{sha}/thumbnail", params={"size": size}).status_code == 422
    assert client.get(f"/v1/images/{'0' * 64}/thumbnail").status_code == 404  # a hash the cache does not hold
    for bad in ("..%2F..%2Fetc%2Fpasswd", sha.upper(), sha[:-1], "%2Fetc%2Fpasswd"):  # never a path
        assert client.get(f"/v1/images/{bad}/thumbnail").status_code in (404, 422), bad
    assert httpx.get(served[0].url + f"/v1/images/{sha}/thumbnail").status_code == 401  # behind the key
    assert client.get("/v1/info").json()["thumbnails"]["hits"] >= 1


def test_thumbnail_memory_is_bounded_in_bytes_least_recently_used_first():
    from featcache.service.thumbnails import ThumbnailCache

    lru = ThumbnailCache(max_bytes=1000)
    for i in range(3):
        lru.put((f"s{i}", 64), bytes(300))
    assert lru.bytes == 900 and lru.get(("s0", 64)) is not None  # s0 is now the most recent
    lru.put(("s3", 64), bytes(300))  # over 1000: the least recently used (s1) goes
    assert lru.get(("s1", 64)) is None and lru.get(("s0", 64)) is not None and lru.bytes == 900
    lru.put(("huge", 64), bytes(2000))  # larger than the whole budget: not kept, nothing evicted for it
    assert lru.get(("huge", 64)) is None and lru.bytes == 900
    assert lru.describe() == {"items": 3, "bytes": 900, "max_bytes": 1000, "hits": 2, "misses": 2}


def test_thumbnail_of_a_changed_or_gone_file_is_410(imagenet_dir, tmp_path, lite0_embedder):
    """The file is re-hashed: bytes that no longer match the image's identity are never shown under it."""
    from featcache.extract.pipeline import ExtractConfig, Extraction

    src = tmp_path / "src"
    src.mkdir()
    files = sorted(Path(imagenet_dir).rglob("*.jpg"))[:3]
    for p in files:
        (src / p.name).write_bytes(p.read_bytes())
    Extraction(ExtractConfig(str(src), str(tmp_path / "cache"), progress=False), lite0_embedder).run()
    shas = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    with LiveServer(create_app(ServiceConfig(cache=str(tmp_path / "cache"), device="cpu"))) as srv:
        a, b, c = (shas[p.name] for p in files)
        assert httpx.get(f"{srv.url}/v1/images/{a}/thumbnail").status_code == 200
        (src / files[1].name).write_bytes(files[2].read_bytes())  # edited in place: other bytes
        (src / files[2].name).unlink()
        for sha in (b, c):
            r = httpx.get(f"{srv.url}/v1/images/{sha}/thumbnail")
            assert r.status_code == 410 and r.json()["error"] == "Gone" and "featcache extract" in r.json()["message"]


def test_listings_labels_and_classify_by_hash(client, imagenet_cache, files):
    feats = FeatureCache(imagenet_cache).read()
    labels = client.get("/v1/labels").json()
    assert labels["images"] == len(feats) == sum(x["count"] for x in labels["labels"])
    assert {x["label"]: x["count"] for x in labels["labels"]} == dict(zip(*np.unique(feats.labels, return_counts=True)))
    seen = []
    for offset in range(0, 20, 7):  # pages tile the collection: no gap, no overlap, stable order
        page = client.get("/v1/images", params={"offset": offset, "limit": 7}).json()
        assert page["total"] == 20
        seen += [(i["sha256"], i["key"], i["label"]) for i in page["images"]]
    assert sorted(seen) == sorted(zip(feats.sha256.tolist(), feats.keys.tolist(), feats.labels.tolist()))
    assert [s[2] for s in seen] == sorted(s[2] for s in seen)
    two = client.get("/v1/images", params={"label": "609"}).json()
    assert two["total"] == 2 and {i["label"] for i in two["images"]} == {"609"}
    assert client.get("/v1/images", params={"label": "no-such"}).json() == {
        "label": "no-such", "total": 0, "offset": 0, "limit": 48, "images": []}
    assert client.get("/v1/images", params={"limit": 201}).status_code == 422
    assert client.get("/v1/labels", params={"limit": 1001}).status_code == 422

    img = files[3]
    hits = _post_image(client, "/v1/search", img.read_bytes(), k=5).json()["hits"]
    label_of = dict(zip(feats.sha256.tolist(), feats.labels.tolist()))
    assert [h["label"] for h in hits] == [label_of[h["sha256"]] for h in hits]
    by_upload = _post_image(client, "/v1/classify", img.read_bytes(), head="nn1").json()
    sha = hashlib.sha256(img.read_bytes()).hexdigest()
    by_hash = client.post("/v1/classify", data={"sha256": sha, "head": "nn1"})
    assert by_hash.status_code == 200, by_hash.text
    assert by_hash.json()["label"] == by_upload["label"] == img.parent.name
    assert "model" not in by_hash.json()["timings_ms"]  # the cached vector: no decode, no forward pass
    assert _post_image(client, "/v1/classify", img.read_bytes(), sha256=sha).status_code == 400  # both
    assert client.post("/v1/classify", data={"head": "nn3"}).status_code == 400  # neither
    assert client.post("/v1/classify", data={"sha256": "0" * 64}).status_code in (400, 404)
    # one image per label for most of these 20 photos: no cross-validation possible, said so
    r = client.get("/v1/heads/nn1/review")
    assert r.status_code == 400 and "at least 2 images" in r.json()["message"]
    dup = client.get("/v1/duplicates", params={"threshold": 0.99}).json()
    assert dup["images"] == 20 and dup["total"] == 0


def test_docs_pages_load_only_local_assets(client, served):
    """/docs and /redoc name no URL off this server; the assets they name are served (open, no key)."""
    url = served[0].url
    for page in ("/docs", "/redoc"):
        html = httpx.get(url + page).text
        assert "http://" not in html and "https://" not in html, page
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css") if page == "/docs" else ("redoc.standalone.js",):
            assert f"/docs-assets/{asset}" in html
            assert httpx.get(f"{url}/docs-assets/{asset}").status_code == 200
    r = httpx.get(url + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = httpx.get(url + "/ui/")
    assert page.status_code == 200 and "app.js" in page.text and "https://" not in page.text
    assert httpx.get(url + "/ui/app.js").status_code == 200


def test_serve_prints_where_it_listens_and_logs_access(imagenet_cache, served):
    """`featcache serve --port 0 --access-log`: the real URL and what it loaded on stdout, a line per request."""
    cfg = served[1]
    proc = subprocess.Popen([sys.executable, "-m", "featcache.cli", "serve", "--cache", str(imagenet_cache),
                             "--head", f"nn1={cfg.heads['nn1']}", "--index", cfg.index, "--device", "cpu",
                             "--port", "0", "--access-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(7)]
        text = "".join(lines)
        assert lines[0].startswith("featcache serve: listening on http://127.0.0.1:"), text
        url = lines[0].split()[-1]
        assert f"{url}/ui/" in text and "20 images" in text and "nn1 (knn, 19 labels" in text
        assert "flat, 20 vectors" in text and "API key  none" in text
        assert httpx.get(url + "/ui/").status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert '"GET /ui/ HTTP/1.1" 200' in out, (out + err)[-2000:]  # uvicorn's access log goes to stdout
