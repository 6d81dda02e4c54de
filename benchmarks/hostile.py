"""Hostile images against `featcache extract` and `featcache serve` (issue 10): outcomes, reasons, peak RSS.

    python benchmarks/hostile.py [--work DIR] [--clients 16]

Builds a folder of the hostile corpus (tests/hostile_images.py: every class, with the issue's
65535x1 and 1x65535 PNGs, bombs, corrupt and foreign files) mixed with the 20 real ImageNet
photos, then
(a) runs `featcache extract FOLDER --cache DIR --json` as a child process: its exit code, that
    every file meant to fail is a failed row whose reason starts with its category (and every
    other file is extracted), its wall time and its peak RSS (ru_maxrss of the waited child);
(b) starts `featcache serve --cache DIR` on a free loopback port and sends ``--clients``
    concurrent uploads of files meant to fail to POST /v1/embed (each must answer 4xx), then
    as many concurrent uploads of the hostile files that decode (extreme aspect ratios, many
    frames, ...; each must answer 200), then a real photo (200: still serving), polling the
    server's VmHWM throughout.
Writes benchmarks/results/hostile.json and prints a short table. Targets: extraction exit 0,
every bad file a row with a reason, peak RSS <= 2 GB; service 4xx for each hostile upload,
peak RSS <= 2.5 GB, still serving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from record import RESULTS, save
from served import serving
from targets import HOSTILE_EXTRACT_PEAK_RSS_BYTES, HOSTILE_SERVE_PEAK_RSS_BYTES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featcache.datasets import imagenet20  # noqa: E402
from tests.hostile_images import Hostile, hostile_classes  # noqa: E402

GB = 1 << 30
TARGETS = {"extract_peak_rss_bytes": HOSTILE_EXTRACT_PEAK_RSS_BYTES, "serve_peak_rss_bytes": HOSTILE_SERVE_PEAK_RSS_BYTES}


def build_folder(root: Path, corpus: list[Hostile]) -> int:
    """The corpus under root/hostile, the real photos under root/photos; returns how many photos."""
    (root / "hostile").mkdir(parents=True)
    (root / "photos").mkdir()
    for h in corpus:
        (root / "hostile" / h.name).write_bytes(h.data)
    photos = imagenet20()
    for path, _ in photos:
        shutil.copy(path, root / "photos" / path.name)
    return len(photos)


def extract_child(folder: Path, cache: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """`featcache extract` as a child: (completed process, seconds, the child's own peak RSS from wait4)."""
    cmd = [sys.executable, "-m", "featcache.cli", "extract", str(folder), "--cache", str(cache), "--json",
           "--labels", "none", "--device", "cpu", "--quiet"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child: its rusage is its own
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return done, seconds, usage.ru_maxrss * 1024


def run_extract(work: Path, corpus: list[Hostile], photos: int) -> dict:
    _, base_s, base_peak = extract_child(work / "folder" / "photos", work / "cache-photos")
    proc, seconds, peak = extract_child(work / "folder", work / "cache")
    out = {"exit_code": proc.returncode, "seconds": round(seconds, 1), "peak_rss_bytes": peak,
           "photos_only": {"seconds": round(base_s, 1), "peak_rss_bytes": base_peak}}
    if proc.returncode:
        out["stderr"] = proc.stderr[-2000:]
        return out
    summary = json.loads(proc.stdout)
    reasons = {f["key"]: f["error"] for f in summary["failures"]}
    rows = []
    for h in corpus:
        reason = reasons.get(f"hostile/{h.name}")
        ok = (reason is None) if not h.expect else (reason is not None and reason.split(":")[0] == h.expect)
        rows.append({"file": h.name, "expect": h.expect or "decodes", "reason": reason, "ok": ok})
    photo_failures = [k for k in reasons if k.startswith("photos/")]
    out.update(files=summary["files"], extracted=summary["extracted"], failed=summary["failed"],
               failure_reasons=summary["failure_reasons"], photos_failed=photo_failures, rows=rows,
               all_as_expected=all(r["ok"] for r in rows) and not photo_failures and summary["extracted"] >= photos)
    return out


class PeakWatcher:
    """Polls a process's VmHWM (kernel-kept peak RSS) until stopped."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._read()

    def __enter__(self) -> PeakWatcher:
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._read()
        self._stop.set()
        self._thread.join()


async def upload_all(url: str, files: list[Hostile]) -> list[dict]:
    """All files at once, one connection each: POST /v1/embed with multipart field ``image``."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def one(h: Hostile) -> dict:
            t = time.perf_counter()
            r = await client.post("/v1/embed", files={"image": (h.name, h.data, "application/octet-stream")})
            message = r.json().get("message", "") if r.status_code >= 400 else ""
            return {"file": h.name, "status": r.status_code, "seconds": round(time.perf_counter() - t, 2),
                    "message": message}
        return list(await asyncio.gather(*(one(h) for h in files)))


ISSUE_PAIR = ("wide_65535x1.png", "tall_1x65535.png")  # the two files of issue 10's report


def pick(classes: dict[str, list[Hostile]], must_fail: bool, n: int) -> list[Hostile]:
    """``n`` uploads: the issue's pair first, then one file of each class in turn (largest first)."""
    pools = [sorted((h for h in files if bool(h.expect) == must_fail), key=lambda h: (h.name not in ISSUE_PAIR,
                                                                                    -len(h.data)))
             for files in classes.values()]
    pools.sort(key=lambda pool: not any(h.name in ISSUE_PAIR for h in pool))
    order = [pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)]
    return [order[i % len(order)] for i in range(n)]


def run_serve(cache: Path, classes: dict[str, list[Hostile]], clients: int) -> dict:
    bad, heavy_good = pick(classes, True, clients), pick(classes, False, clients)
    photo = Hostile("photo.jpg", imagenet20()[0][0].read_bytes(), "")
    with serving("--cache", str(cache), "--device", "cpu") as (url, ready_s, pid), PeakWatcher(pid) as watch:
        asyncio.run(upload_all(url, [photo] * clients))  # warm: the model has run, the pools exist
        baseline = watch.peak
        t = time.perf_counter()
        hostile = asyncio.run(upload_all(url, bad))
        decodable = asyncio.run(upload_all(url, heavy_good))
        after = asyncio.run(upload_all(url, [photo]))[0]
        seconds = time.perf_counter() - t
    return {
        "ready_seconds": round(ready_s, 1), "seconds": round(seconds, 1), "peak_rss_bytes": watch.peak,
        "peak_rss_warm_bytes": baseline, "hostile": hostile, "decodable": decodable, "photo_after": after,
        "hostile_all_4xx": all(400 <= r["status"] < 500 for r in hostile),
        "decodable_all_200": all(r["status"] == 200 for r in decodable),
        "still_serving": after["status"] == 200,
    }


def table(result: dict) -> str:
    e, s = result["extract"], result["serve"]

    def row(name: str, value: str, target: str = "") -> str:
        return f"{name:38} {value:>14} {target:>12}"

    lines = [row("", "result", "target"), row("extract: exit code", str(e["exit_code"]), "0")]
    if "rows" in e:
        bad = [r for r in e["rows"] if r["expect"] != "decodes"]
        good = [r for r in e["rows"] if r["expect"] == "decodes"]
        lines += [row("extract: bad files failed with reason", f"{sum(r['ok'] for r in bad)}/{len(bad)}", "all"),
                  row("extract: hostile-but-valid decoded", f"{sum(r['ok'] for r in good)}/{len(good)}", "all"),
                  row("extract: photos extracted", f"{result['corpus']['photos'] - len(e['photos_failed'])}/"
                      f"{result['corpus']['photos']}", "all")]
    lines += [row("extract: peak RSS", f"{e['peak_rss_bytes'] / GB:.2f} GB", "<= 2 GB"),
              row("extract: peak RSS, photos only", f"{e['photos_only']['peak_rss_bytes'] / GB:.2f} GB"),
              row("extract: seconds (photos only)", f"{e['seconds']} ({e['photos_only']['seconds']})")]
    if s:
        lines += [row("serve: hostile uploads answered 4xx",
                      f"{sum(400 <= r['status'] < 500 for r in s['hostile'])}/{len(s['hostile'])}", "all"),
                  row("serve: hostile-but-valid answered 200",
                      f"{sum(r['status'] == 200 for r in s['decodable'])}/{len(s['decodable'])}", "all"),
                  row("serve: real photo afterwards", str(s["photo_after"]["status"]), "200"),
                  row("serve: peak RSS", f"{s['peak_rss_bytes'] / GB:.2f} GB", "<= 2.5 GB"),
                  row("serve: peak RSS after warm-up", f"{s['peak_rss_warm_bytes'] / GB:.2f} GB"),
                  row("serve: seconds for all uploads", str(s["seconds"]))]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent uploads per round")
    ap.add_argument("--out", default=str(RESULTS / "hostile.json"))
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="featcache-hostile-"))
    try:
        t = time.perf_counter()
        classes = hostile_classes()
        corpus = [h for files in classes.values() for h in files]
        photos = build_folder(work / "folder", corpus)
        built = time.perf_counter() - t
        extract = run_extract(work, corpus, photos)
        serve = run_serve(work / "cache", classes, a.clients) if extract["exit_code"] == 0 else {}
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "corpus": {"files": len(corpus), "must_fail": sum(bool(h.expect) for h in corpus),
                   "must_decode": sum(not h.expect for h in corpus), "photos": photos,
                   "bytes": sum(len(h.data) for h in corpus), "build_seconds": round(built, 1)},
        "extract": extract, "serve": serve, "targets": TARGETS,
        "met": bool(serve) and extract["exit_code"] == 0 and extract["all_as_expected"]
        and extract["peak_rss_bytes"] <= TARGETS["extract_peak_rss_bytes"] and serve["hostile_all_4xx"]
        and serve["decodable_all_200"] and serve["still_serving"]
        and serve["peak_rss_bytes"] <= TARGETS["serve_peak_rss_bytes"],
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    save(result, a.out)
    print(table(result))
    if not serve:
        print(extract.get("stderr", ""))
    print(f"all targets met: {result['met']}   ({a.out})")


if __name__ == "__main__":
    main()
