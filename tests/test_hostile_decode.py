"""Hostile files, one class at a time: each fails with a reason in its category or decodes, in bounded time and memory.

The files (tests/hostile_images.py, built from real photos) are decoded in a child process that
trims freed memory back to the OS and resets its peak RSS (VmHWM) before each one, so every
file's time and memory are its own; the child runs under an 8 GB address-space limit so that a
regression fails here instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featcache.extract.headers import MAX_JPEG_SCANS

from . import hostile_images

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
CATEGORIES = ("not an image", "unsupported", "too large", "corrupt image", "truncated image")

CHILD = r"""
import ctypes, json, resource, sys, time
libc = ctypes.CDLL("libc.so.6")
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
import numpy as np, torch
from PIL import Image
torch.set_num_threads(1)
from featcache.errors import ImageError
from featcache.extract.decode import estimate_bytes, load_image
from featcache.extract.registry import BUILTIN
from tests import hostile_images as H
from tests.images import real_photo

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

pre = BUILTIN["efficientnet_lite0"].preprocess
photo = real_photo(6).resize((3000, 2000))
rgba = photo.convert("RGBA"); rgba.putalpha(photo.convert("L"))
exif = Image.Exif(); exif[0x0112] = 6
large = [H.Hostile("large_rgba.png", H.encode(rgba, "PNG", compress_level=1), ""),
         H.Hostile("large.webp", H.encode(photo, "WEBP", quality=70), ""),
         H.Hostile("large_exif6_progressive.jpg", H.encode(photo, "JPEG", progressive=True, exif=exif.tobytes()), ""),
         H.Hostile("large_16bit.png", H.encode(Image.fromarray(np.asarray(photo)[..., 0].astype(np.uint16) * 257), "PNG",
                                           compress_level=1), ""),
         H.Hostile("large_float.tiff", H.encode(Image.fromarray(np.asarray(photo)[..., 1].astype(np.float32) / 255), "TIFF"), "")]
load_image(H.jpeg_bytes(real_photo(0)), pre)  # warm up torch and Pillow
for name, files in [*H.hostile_classes().items(), ("large", large)]:
    for h in files:
        libc.malloc_trim(0)  # memory freed by the previous file goes back to the OS: this one's peak is its own
        open("/proc/self/clear_refs", "w").write("5")
        base, t = status("VmRSS"), time.perf_counter()
        row = {"class": name, "name": h.name, "expect": h.expect, "bytes": len(h.data)}
        try:
            x = load_image(h.data, pre)
            row["shape"], row["dtype"] = list(x.shape), str(x.dtype)
        except ImageError as e:
            row["error"], row["type"] = str(e), type(e).__name__
        except BaseException as e:
            row["crash"] = f"{type(e).__name__}: {e}"
        row["seconds"], row["peak"] = time.perf_counter() - t, status("VmHWM") - base
        if "shape" in row:
            row["estimate"] = estimate_bytes(h.data, pre=pre)
        print(json.dumps(row), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure per-file peak memory")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["name"]: r for r in rows}


def _of(outcomes: dict, cls: str) -> list[dict]:
    rows = [r for r in outcomes.values() if r["class"] == cls]
    assert rows, cls
    return rows


def _check(rows: list[dict], seconds: float, peak_mb: float) -> None:
    for r in rows:
        assert "crash" not in r, r
        if r["expect"]:
            assert "error" in r, f"{r['name']} decoded, expected a failure in {r['expect']!r}"
            assert r["error"].split(":")[0] == r["expect"], (r["name"], r["error"])
        else:
            assert r.get("shape") == [3, 224, 224] and r["dtype"] == "torch.uint8", r
        assert r["seconds"] < seconds, f"{r['name']} took {r['seconds']:.2f} s"
        assert r["peak"] < peak_mb * MB, f"{r['name']} grew RSS by {r['peak'] / MB:.0f} MB"


def test_extreme_aspect_ratios_decode_from_the_cropped_span(outcomes):
    # the 65535x1 / 1x65535 PNGs needed a 13 GB resize; a 16,000,000x1 PNG is 48 MB decoded
    _check(_of(outcomes, "extreme_aspect"), seconds=10, peak_mb=400)
    assert outcomes["wide_65535x1.png"]["peak"] < 64 * MB and outcomes["tall_1x65535.png"]["peak"] < 64 * MB


def test_huge_frames_are_refused_from_the_header(outcomes):
    rows = _of(outcomes, "huge_frames")
    _check(rows, seconds=10, peak_mb=400)  # two decode a mostly missing 6000x6000 frame, within max_pixels
    for r in rows:
        if r["expect"] == "too large":
            assert r["seconds"] < 1 and r["peak"] < 32 * MB, r  # refused before any pixel buffer exists
            assert r["type"] == "TooLarge"


def test_many_frame_animations_decode_only_the_first(outcomes):
    _check(_of(outcomes, "many_frames"), seconds=5, peak_mb=64)


def test_progressive_jpeg_scans_are_bounded(outcomes):
    rows = _of(outcomes, "progressive_scans")
    _check(rows, seconds=10, peak_mb=200)
    assert f"more than {MAX_JPEG_SCANS} scans" in outcomes["scans_5000.jpg"]["error"]
    assert "scan-pixels" in outcomes["scans_100_64mp.jpg"]["error"]


def test_metadata_that_pillow_walks_in_python_is_bounded(outcomes):
    # before: 12 s for 100k PNG text chunks, 60 s and 626 MB for 2M TIFF strips, 11 s and 518 MB for an EXIF bomb
    _check(_of(outcomes, "python_walked_metadata"), seconds=2, peak_mb=64)


def test_just_inside_every_limit_the_cost_is_the_bound(outcomes):
    _check(_of(outcomes, "at_the_limits"), seconds=10, peak_mb=64)


def test_broken_and_foreign_files_fail_with_their_category(outcomes):
    rows = _of(outcomes, "broken")
    _check(rows, seconds=1, peak_mb=64)
    assert {r["type"] for r in rows if r["expect"] in ("not an image", "unsupported")} <= {"UnsupportedMedia", "ImageError"}
    assert "PSD" in outcomes["photoshop.png"]["error"] and "JPEG2000" in outcomes["jpeg2000.jpg"]["error"]


def test_every_failure_starts_with_a_category(outcomes):
    for r in outcomes.values():
        if "error" in r:
            assert r["error"].split(":")[0] in CATEGORIES and r["error"].split(":", 1)[1].strip(), r


def test_the_reserved_estimate_bounds_the_measured_peak(outcomes):
    """What a decode reserves from the budget is an upper bound of what it really takes (VmHWM growth)."""
    rows = [r for r in outcomes.values() if "estimate" in r]
    assert len(_of(outcomes, "large")) == 5
    for r in rows:
        assert r["peak"] <= r["estimate"], f"{r['name']}: peak {r['peak'] / MB:.0f} MB > estimate {r['estimate'] / MB:.0f} MB"
    for r in _of(outcomes, "large"):
        assert r["peak"] > 40 * MB and r["estimate"] < 6 * r["peak"], r  # a bound, not a wild guess


def test_corpus_is_deterministic():
    a = [(h.name, h.data) for h in hostile_images.huge_frames()]
    assert a == [(h.name, h.data) for h in hostile_images.huge_frames()]
