"""Property: whatever bytes sit in an image container, decoding returns a (3, crop, crop) uint8 tensor or
raises a featcache ImageError whose reason starts with a category, within seconds and a bounded memory.

Examples: real photos at random sizes and extreme aspect ratios in every supported format and a few
modes, then left whole, truncated at a random offset, with random bytes overwritten, with a header
field set to an extreme value, or with the body replaced by random bytes behind the right magic.
Derandomized with a fixed number of examples, so CI sees the same examples every run.
"""

from __future__ import annotations

import ctypes
import faulthandler
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featcache.errors import ImageError
from featcache.extract.decode import load_image
from featcache.extract.registry import BUILTIN

from .images import encode, real_photo

PRE = BUILTIN["efficientnet_lite0"].preprocess
CATEGORIES = ("not an image", "unsupported", "too large", "corrupt image", "truncated image")
MAX_PIXELS = 16_000_000
SECONDS, PEAK_BYTES = 5.0, 512 << 20
FORMATS = {  # format -> (largest side it can store, modes to try)
    "JPEG": (65_500, ("RGB", "L", "CMYK")), "PNG": (1 << 20, ("RGB", "RGBA", "P", "L", "I;16", "1")),
    "GIF": (65_535, ("P", "L")), "WEBP": (16_383, ("RGB", "RGBA")), "TIFF": (1 << 20, ("RGB", "RGBA", "L", "F", "I;16")),
    "BMP": (1 << 20, ("RGB", "P", "L")), "PPM": (1 << 20, ("RGB", "L", "1")), "ICO": (256, ("RGBA",)),
}
EXTREMES = (0, 1, 2, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [real_photo(i).resize((128, 128)) for i in range(20)]


@st.composite
def containers(draw, photos: list[Image.Image]) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    longest, modes = FORMATS[fmt]
    long = draw(st.one_of(st.integers(1, min(longest, 600)), st.integers(1, min(longest, 65_536))))
    short = draw(st.integers(1, max(1, min(600, longest, 65_536 // long))))
    w, h = (long, short) if draw(st.booleans()) else (short, long)
    mode = draw(st.sampled_from(modes))
    img = photos[draw(st.integers(0, 19))].resize((w, h))
    img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257) if mode == "I;16" else img.convert(mode)
    data = encode(img, fmt, **({"sizes": [(w, h)]} if fmt == "ICO" else {}))
    how = draw(st.sampled_from(["whole", "truncated", "bytes", "field", "random body"]))
    if how == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "bytes":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        data = bytes(buf)
    elif how == "field":
        at = draw(st.integers(0, max(0, min(len(data), 96) - 4)))
        size, order = draw(st.sampled_from([2, 4])), draw(st.sampled_from(["big", "little"]))
        value = draw(st.sampled_from(EXTREMES)) % (1 << (8 * size))
        data = data[:at] + value.to_bytes(size, order) + data[at + size :]
    elif how == "random body":
        data = data[:16] + draw(st.binary(min_size=0, max_size=4096))
    return fmt, data


def _peak_since_reset() -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM"))


def _reset_peak() -> int | None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS"))


def test_any_bytes_in_any_container_decode_or_fail_with_a_reason(photos):
    torch.set_num_threads(1)

    @settings(max_examples=800, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(containers(photos))
    def check(sample: tuple[str, bytes]) -> None:
        fmt, data = sample
        base = _reset_peak()
        faulthandler.dump_traceback_later(60, exit=True)  # a hang kills the run with a traceback, not the CI job
        t = time.perf_counter()
        try:
            x = load_image(data, PRE, MAX_PIXELS)
            assert x.shape == (3, PRE.crop, PRE.crop) and x.dtype == torch.uint8
        except ImageError as e:
            category, _, detail = str(e).partition(": ")
            assert category in CATEGORIES and detail, f"{fmt}: {e}"
        finally:
            faulthandler.cancel_dump_traceback_later()
        assert time.perf_counter() - t < SECONDS, f"{fmt} ({len(data)} bytes) took {time.perf_counter() - t:.1f} s"
        peak = _peak_since_reset()
        if base is not None and peak is not None:
            assert peak - base < PEAK_BYTES, f"{fmt} ({len(data)} bytes) grew RSS by {(peak - base) >> 20} MB"

    check()
