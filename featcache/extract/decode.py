"""Bytes to a preprocessed uint8 tensor (3, crop, crop), or an ImageError with a reason.

Every input becomes 8-bit RGB the same way: EXIF orientation applied; palette, gray and
CMYK converted; alpha composited onto the spec's background (white by default); 16-bit
scaled (not clipped) to 8 bits; only the first frame of animations. Plain JPEGs take a
fast path (torchvision's libjpeg-turbo decoder); everything else goes through Pillow.
Resizing is torch's antialiased uint8 resize for every input. Changing any of this
changes the pixels: bump ``spec.DECODER`` so the fingerprint changes with it.

Every decode is bounded in time and memory by limits that do not depend on the file:
``headers.sniff`` refuses container structures that would make a decoder loop or allocate
without bound; the pixel count is checked before decoding (``max_pixels``); the peak
memory is estimated from the header and reserved from the process-wide decode budget
(``budget.DECODE_BUDGET``) before any pixel is decoded, so concurrent decodes cannot add
up past it; modes are converted a tile at a time; and an extreme aspect ratio is resized
from the part that survives the centre crop, never through the whole resized image.
Failure reasons start with a stable category ("not an image", "unsupported", "too large",
"corrupt image", "truncated image") followed by ': ' and the specifics.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import AvifImagePlugin, Image, PngImagePlugin, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from ..errors import FeatcacheError, ImageError, TooLarge, UnsupportedMedia
from .budget import DECODE_BUDGET
from .headers import DEFAULT_MAX_PIXELS, SUPPORTED, Header, check_pixels, sniff
from .spec import Preprocess

RESIZE_EXACT_MAX_PIXELS = 1 << 24  # resized images up to this size take torch's one-shot resize (aspect <= 256:1)
TILE_PIXELS = 1 << 20  # pixels converted to RGB at a time
_TILE_BYTES = 48 * TILE_PIXELS  # the temporaries of one tile (float64 at worst)
_FIXED_BYTES = 16 << 20  # small buffers of any decode
_INTERP = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR}
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}

# Pillow's own safety net stays on: it can only refuse sizes our checks already refuse, and it also guards
# the sizes a plugin discovers while loading. Its warnings are ours to give, so they are silenced.
Image.MAX_IMAGE_PIXELS = 1 << 30
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
PngImagePlugin.MAX_TEXT_MEMORY = 16 << 20  # text chunks kept per PNG (Pillow's default is 64 MB)
AvifImagePlugin.DEFAULT_MAX_THREADS = 1  # one decode per worker thread; callers own the parallelism


def load_image(data: bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Bytes to the uint8 (3, crop, crop) tensor the backbone expects (before normalisation)."""
    return _bounded(data, pre.background, max_pixels, pre)


def decode_rgb(data: bytes, background: tuple[int, int, int] = (255, 255, 255), max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode to an 8-bit RGB tensor (3, H, W) at full resolution."""
    return _bounded(data, background, max_pixels, None)


def estimate_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, pre: Preprocess | None = None) -> int:
    """The peak memory ``load_image`` (or ``decode_rgb`` without ``pre``) reserves for ``data``."""
    header = sniff(data, max_pixels)
    if header.opens_eagerly:
        return _cost(header, data, header.size, "RGBA", pre)
    img = _open(data, header, max_pixels)
    return _cost(header, data, img.size, img.mode, pre)


def _bounded(data: bytes, background: tuple[int, int, int], max_pixels: int, pre: Preprocess | None) -> torch.Tensor:
    header = sniff(data, max_pixels)
    if header.opens_eagerly:  # opening allocates the canvas: reserve from the container's numbers first
        cost, img = _cost(header, data, header.size, "RGBA", pre), None
    else:
        img = _open(data, header, max_pixels)
        cost = _cost(header, data, img.size, img.mode, pre)
    w, h = header.size if img is None else img.size
    with DECODE_BUDGET.reserve(cost, f"a {w}x{h} {SUPPORTED[header.format]} image"):
        if img is None:
            img = _open(data, header, max_pixels)
        rgb = _decode(data, img, background)
        return rgb if pre is None else preprocess(rgb, pre)


@contextlib.contextmanager
def _decoder_errors(stage: str) -> Iterator[None]:
    """Whatever a decoder raises on bad bytes becomes an ImageError whose reason starts with a category.

    Decoder warnings (corrupt EXIF, odd sizes) are silenced: the outcome is the result or the reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except FeatcacheError:
        raise
    except Image.DecompressionBombError as e:
        raise TooLarge(f"too large: {e}") from None
    except MemoryError:
        raise TooLarge(f"too large: out of memory while {stage}") from None
    except Exception as e:  # noqa: BLE001 - Pillow and its codecs raise many types for broken files
        msg = str(e) or type(e).__name__
        if "too large" in msg.lower() or "too much memory" in msg.lower():  # Pillow's limits (text chunks, ICC)
            raise TooLarge(f"too large: {stage}: {msg}") from None
        reason = "truncated image" if "truncated" in msg.lower() or isinstance(e, EOFError) else "corrupt image"
        raise ImageError(f"{reason}: {stage}: {msg}") from None


def _open(data: bytes, header: Header, max_pixels: int) -> Image.Image:
    with _decoder_errors(f"reading the {SUPPORTED[header.format]} header"):
        try:
            img = Image.open(io.BytesIO(data), formats=[header.format])
        except UnidentifiedImageError:
            raise ImageError(f"corrupt image: not a readable {SUPPORTED[header.format]} file") from None
    check_pixels(img.size, max_pixels)
    if header.size is not None and img.size[0] * img.size[1] > header.size[0] * header.size[1]:
        raise ImageError(f"corrupt image: a {img.size[0]}x{img.size[1]} frame in a {header.size[0]}x{header.size[1]} "
                         "container")
    return img


def _pillow_bytes_per_pixel(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _cost(header: Header, data: bytes, size: tuple[int, int], mode: str, pre: Preprocess | None) -> int:
    """Peak bytes of one decode, from the header (checked against VmHWM in tests/test_hostile_decode.py).

    Phases: Pillow's image, the decoder's own buffers and the RGB array, converted a tile at a time;
    then (Pillow's image closed) an oriented copy of the RGB array; then the resize's buffers. The
    torchvision JPEG path needs less than Pillow's, which stays its fallback.
    """
    w, h = size
    px = w * h
    rgb = 3 * px
    decoder = header.decoder_bytes + int(header.decoder_bytes_per_pixel * px) + 8 * w  # + a decoder's row buffers
    decode = max(px * _pillow_bytes_per_pixel(mode) + decoder + rgb + _TILE_BYTES, 2 * rgb)
    resize = rgb + _resize_bytes(h, w, pre) if pre is not None else 0
    return _FIXED_BYTES + len(data) + max(decode, resize)


def _resize_bytes(h: int, w: int, pre: Preprocess) -> int:
    """The resize's own buffers: the horizontal pass and the output (small on the extreme-aspect path)."""
    oh, ow = _resized_size(h, w, pre.resize)
    if oh * ow > RESIZE_EXACT_MAX_PIXELS:
        return 64 * pre.resize * pre.resize
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return 8 * (h * ow + oh * ow)
    return 16 * h * w + 24 * (h * ow + oh * ow)  # without AVX2 torchvision resizes bilinear through float32


def _resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision's size for "shorter side to ``short``" (``_compute_resized_output_size``)."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _decode(data: bytes, img: Image.Image, background: tuple[int, int, int]) -> torch.Tensor:
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)
        except RuntimeError:
            pass  # let Pillow try (and name the problem) instead
    with _decoder_errors("decoding"):
        img.seek(0)
        img.load()
        method = _orientation(img)
        rgb = _to_rgb_array(img, background)
    img.close()
    if method is not None:
        rgb = np.ascontiguousarray(_transpose_array(rgb, method))
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The EXIF orientation's transpose, read the way ``ImageOps.exif_transpose`` reads it; broken EXIF is ignored."""
    try:
        return _TRANSPOSE.get(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - an unreadable EXIF block leaves the image as stored
        return None


def _transpose_array(a: np.ndarray, method: Image.Transpose) -> np.ndarray:
    """``Image.transpose`` on an (H, W, C) array, as a view."""
    T = Image.Transpose
    return {T.FLIP_LEFT_RIGHT: lambda: a[:, ::-1], T.FLIP_TOP_BOTTOM: lambda: a[::-1], T.ROTATE_180: lambda: a[::-1, ::-1],
            T.ROTATE_90: lambda: np.rot90(a, 1), T.ROTATE_270: lambda: np.rot90(a, -1),
            T.TRANSPOSE: lambda: a.transpose(1, 0, 2), T.TRANSVERSE: lambda: np.rot90(a, 2).transpose(1, 0, 2)}[method]()


def _tiles(w: int, h: int) -> Iterator[tuple[int, int, int, int]]:
    """Boxes of at most TILE_PIXELS covering the image: bands of rows, or pieces of one row if it is longer."""
    if w <= TILE_PIXELS:
        rows = TILE_PIXELS // w
        for y in range(0, h, rows):
            yield 0, y, w, min(h, y + rows)
    else:
        for y in range(h):
            for x in range(0, w, TILE_PIXELS):
                yield x, y, min(w, x + TILE_PIXELS), y + 1


def _to_rgb_array(img: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8, converted a tile at a time so that no full-size temporary exists but the output.

    Every conversion is per pixel, so converting tiles gives the very pixels of converting the whole.
    """
    w, h = img.size
    top = _value_range(img)
    out = np.empty((h, w, 3), dtype=np.uint8)
    for box in _tiles(w, h):
        tile = img if box == (0, 0, w, h) else img.crop(box)
        out[box[1] : box[3], box[0] : box[2]] = _tile_rgb(tile, top, background)
    return out


def _value_range(img: Image.Image) -> float:
    """The value that maps to 255 for 16/32-bit integer and float modes (from the whole image, not a tile)."""
    mode = img.mode
    if mode.startswith("I;16"):
        return 65535
    if mode == "I":
        return 65535 if img.getextrema()[1] > 255 else 255
    if mode == "F":
        peak = max(np.nan_to_num(np.asarray(img.crop(box), dtype=np.float64)).max() for box in _tiles(*img.size))
        return 1.0 if peak <= 1.0 else 255.0
    return 255


def _tile_rgb(img: Image.Image, top: float, background: tuple[int, int, int]) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I"):  # "I;16*" and "I": scaled, not clipped
        arr = np.asarray(img, dtype=np.int64)
        gray = (np.clip(arr, 0, top) * 255 // top).astype(np.uint8)
        return gray[..., None]
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        gray = (np.clip(arr / top, 0, 1) * 255).round().astype(np.uint8)
        return gray[..., None]
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        img = canvas
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except ValueError as e:
            raise UnsupportedMedia(f"unsupported: {mode} images: {e}") from None
    return np.asarray(img)


def preprocess(rgb: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side to ``pre.resize`` (antialiased) and center-crop ``pre.crop``."""
    h, w = rgb.shape[-2:]
    oh, ow = _resized_size(h, w, pre.resize)
    if oh * ow > RESIZE_EXACT_MAX_PIXELS:
        return _preprocess_extreme(rgb, pre)
    x = TF.resize(rgb, [pre.resize], interpolation=_INTERP[pre.interpolation], antialias=True)
    return TF.center_crop(x, [pre.crop]).contiguous()


def _preprocess_extreme(rgb: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """``preprocess`` for extreme aspect ratios: resize only the source span that the centre crop keeps.

    The long side would be resized to ``resize * long / short`` pixels (a 65535x1 image: 16.8 M
    columns, 13 GB) to keep ``crop`` of them. The same scale is applied to that span plus the filter's
    support, so the result matches the one-shot resize up to sub-pixel placement.
    """
    tall = rgb.shape[-2] > rgb.shape[-1]
    x = rgb.transpose(-1, -2) if tall else rgb  # the long side last
    short, long = x.shape[-2], x.shape[-1]
    new_long = int(pre.resize * long / short)
    scale = long / new_long  # source pixels per output pixel
    start = int(round((new_long - pre.crop) / 2))  # torchvision's centre-crop offset
    margin = math.ceil(2 * max(scale, 1.0)) + 2  # bicubic support, in source pixels
    a = max(0, math.floor(scale * start) - margin)
    b = min(long, math.ceil(scale * (start + pre.crop)) + margin)
    span_out = max(pre.crop, round((b - a) / scale))
    y = TF.resize(x[..., a:b].contiguous(), [pre.resize, span_out], interpolation=_INTERP[pre.interpolation],
                  antialias=True)
    left = min(max(0, int(round((scale * start - a) * span_out / (b - a)))), span_out - pre.crop)
    y = TF.center_crop(y[..., left : left + pre.crop], [pre.crop])
    return (y.transpose(-1, -2) if tall else y).contiguous()
