"""The web page on a large cache: first paint, click-to-grid latency in the browser, thumbnail cache hits.

    python benchmarks/bench_ui.py --images 10000            # builds the cache once under benchmarks/ui-data/

Builds (once, reused by later runs) a cache of ``--images`` Fashion-MNIST training PNGs through
the default backbone, a logreg head (``featcache train``) and an index (``featcache index``), then
starts ``featcache serve`` on loopback and drives Debian's Chromium (Playwright, as tests/test_ui.py):

- first paint of ``/ui/``: the Performance API's ``first-contentful-paint`` in a fresh browser
  context (cold HTTP cache) each time, ``--loads`` times;
- click to rendered grid: ``performance.now()`` before a thumbnail's ``click()``, then the moment
  the results grid holds ``--k`` decoded thumbnails and a frame was painted; ``--clicks`` times,
  each on a neighbour of the last query (so most thumbnails are new to the page);
- thumbnails in the server: each of ``--thumbs`` images fetched once (rendered), then again
  (served from memory) and revalidated (304); the handler's own time comes from the
  ``Server-Timing`` header, the loopback round trip from the client.

Writes benchmarks/results/ui.json. Targets (issue 14): first paint <= 1 s, click-to-grid p50 <= 300 ms
(24 thumbnails), second thumbnail request <= 5 ms p50 in the server.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from served import serving

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcache.datasets import write_fashion_mnist  # noqa: E402
from featcache.runtime import available_cpus  # noqa: E402
from tests.browser import chromium, open_page  # noqa: E402

FC = [sys.executable, "-m", "featcache.cli"]

# Resolves with [ms from the click to a painted grid of k decoded thumbnails of the clicked image's neighbours,
# thumbnails the page fetched for it (the others it already held)].
CLICK_JS = """async ([sha, k]) => {
  const grid = document.querySelector('#results');
  const card = grid.querySelector(`.card[data-sha="${sha}"]`);
  const key = card.dataset.key;
  const t0 = performance.now();
  card.click();
  await new Promise((resolve) => {
    const done = () => grid.dataset.state === 'ready' && grid.dataset.query === key
      && grid.querySelectorAll('.card').length === k;
    if (done()) return resolve();
    const obs = new MutationObserver(() => { if (done()) { obs.disconnect(); resolve(); } });
    obs.observe(grid, { attributes: true, childList: true });
  });
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const ms = performance.now() - t0;
  const fetched = performance.getEntriesByType('resource')
    .filter((r) => r.startTime >= t0 && r.name.includes('/thumbnail')).length;
  return [ms, fetched];
}"""


def build(work: Path, images: int) -> tuple[Path, Path, Path]:
    """(cache, head, index) of ``images`` Fashion-MNIST PNGs; each step is skipped when already done."""
    cache, head, index = work / "cache", work / "head", work / "index"
    src = write_fashion_mnist(work / "png", "train", limit=images)
    if not (cache / "zarr.json").is_file():
        subprocess.run([*FC, "extract", str(src), "--cache", str(cache)], check=True)
    if not (head / "manifest.json").is_file():
        subprocess.run([*FC, "train", "--cache", str(cache), "--out", str(head)], check=True)
    if not (index / "manifest.json").is_file():
        subprocess.run([*FC, "index", "--cache", str(cache), "--out", str(index)], check=True)
    return cache, head, index


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def server_ms(resp: httpx.Response) -> float:
    return float(resp.headers["server-timing"].split("dur=")[1])


def thumbnails(url: str, shas: list[str]) -> dict:
    """Per image: a first request (rendered), a second (memory), a revalidation (304); server and round-trip ms."""
    first, second, reval, second_rt, reval_rt = [], [], [], [], []
    with httpx.Client(base_url=url, timeout=60) as c:
        for sha in shas:
            path = f"/v1/images/{sha}/thumbnail?size=160"
            r = c.get(path)
            assert r.status_code == 200, r.text
            first.append(server_ms(r))
            t = time.perf_counter()
            r2 = c.get(path)
            second_rt.append((time.perf_counter() - t) * 1000)
            assert 'desc="memory"' in r2.headers["server-timing"]
            second.append(server_ms(r2))
            t = time.perf_counter()
            r3 = c.get(path, headers={"If-None-Match": r.headers["etag"]})
            reval_rt.append((time.perf_counter() - t) * 1000)
            assert r3.status_code == 304
            reval.append(server_ms(r3))
    return {"images": len(shas), "first_server_ms_p50": pct(first, 50),
            "second_server_ms_p50": pct(second, 50), "second_server_ms_p90": pct(second, 90),
            "second_roundtrip_ms_p50": pct(second_rt, 50),
            "revalidate_304_server_ms_p50": pct(reval, 50), "revalidate_304_roundtrip_ms_p50": pct(reval_rt, 50)}


def browser_figures(url: str, start: dict, loads: int, clicks: int, k: int) -> dict:
    paints, click_ms = [], []
    with chromium() as browser:
        for _ in range(loads):
            page, _ = open_page(browser)
            page.goto(url + "/ui/")
            page.wait_for_selector("body[data-ready=true]")
            fcp = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]?.startTime")
            paints.append(fcp)
            page.context.close()
        page, watch = open_page(browser)
        page.goto(f"{url}/ui/#search?key={start['key']}&sha={start['sha256']}")
        page.wait_for_selector("body[data-ready=true]")
        page.fill("#k", str(k))
        page.dispatch_event("#k", "change")
        page.wait_for_function(f"document.querySelectorAll('#results .card').length === {k} && "
                               "document.querySelector('#results').dataset.state === 'ready'", timeout=120_000)
        page.evaluate("performance.setResourceTimingBufferSize(1000000)")
        rng = random.Random(0)
        fetched = []
        seen = {start["sha256"]}
        for _ in range(clicks):
            shas = page.eval_on_selector_all("#results .card", "cs => cs.map(c => c.dataset.sha)")
            fresh = [s for s in shas if s not in seen] or shas
            sha = rng.choice(fresh[: max(1, len(fresh) // 2)])
            seen.add(sha)
            ms, n = page.evaluate(CLICK_JS, [sha, k])
            click_ms.append(ms)
            fetched.append(n)
        assert not watch.errors, watch.errors
    return {"first_contentful_paint_ms": [round(p, 1) for p in paints], "first_paint_ms_p50": pct(paints, 50),
            "click_to_grid_ms_p50": pct(click_ms, 50), "click_to_grid_ms_p90": pct(click_ms, 90),
            "clicks": clicks, "k": k, "thumbnails_fetched_per_click_mean": round(float(np.mean(fetched)), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "ui-data"))
    p.add_argument("--loads", type=int, default=7)
    p.add_argument("--clicks", type=int, default=40)
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--thumbs", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ui.json"))
    a = p.parse_args()
    work = Path(a.work) / f"fmnist-{a.images}"
    cache, head, index = build(work, a.images)
    with serving("--cache", str(cache), "--head", f"fmnist={head}", "--index", str(index)) as (url, ready_s, _):
        info = httpx.get(url + "/v1/info").json()
        listing = httpx.get(url + "/v1/images", params={"limit": 200, "offset": info["images"] // 2}).json()["images"]
        figures = browser_figures(url, listing[0], a.loads, a.clicks, a.k)  # first: no thumbnail cached yet
        thumbs = thumbnails(url, [i["sha256"] for i in listing[-a.thumbs:]])
    r = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
         "images": info["images"], "index": info["index"]["kind"], "cpus": available_cpus(),
         "server_ready_seconds": round(ready_s, 1), **figures, "thumbnails": thumbs,
         "targets": {"first_paint_ms_p50 <= 1000": figures["first_paint_ms_p50"] <= 1000,
                     "click_to_grid_ms_p50 <= 300": figures["click_to_grid_ms_p50"] <= 300,
                     "second_thumbnail_server_ms_p50 <= 5": thumbs["second_server_ms_p50"] <= 5},
         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=2))
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
