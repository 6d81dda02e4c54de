"""Bytes to a preprocessed uint8 tensor (3, crop, crop), or an ImageError with a reason.

Every input becomes 8-bit RGB the same way: EXIF orientation applied; palette, gray and
CMYK converted; alpha composited onto the spec's background (white by default); 16-bit
scaled (not clipped) to 8 bits; only the first frame of animations. Plain JPEGs take a
fast path (torchvision's libjpeg-turbo decoder); everything else goes through Pillow.
Resizing is torch's antialiased uint8 resize for every input. Changing any of this
changes the pixels: bump ``spec.DECODER`` so the fingerprint changes with it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from ..errors import ImageError, TooLarge, UnsupportedMedia
from .spec import Preprocess

DEFAULT_MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit from the header, before decoding
_INTERP = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR}


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMedia("not an image (unrecognised format)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken headers
        raise ImageError(f"unreadable image header: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise TooLarge(f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} (decompression bomb?)")
    return img


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or arr.max() > 255 else 255
        img = Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = 1.0 if arr.max() <= 1.0 else 255.0
        img = Image.fromarray((np.clip(arr / top, 0, 1) * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def _fast_jpeg(data: bytes, img: Image.Image) -> torch.Tensor | None:
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        return None  # let Pillow try (and name the problem) instead


def decode_rgb(data: bytes, background: tuple[int, int, int] = (255, 255, 255), max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode to an 8-bit RGB tensor (3, H, W) at full resolution."""
    img = _open(data, max_pixels)
    fast = _fast_jpeg(data, img)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.seek(0)
            rgb = _to_rgb(img, background)
            rgb.load()
    except OSError as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg.lower() else "corrupt image"
        raise ImageError(f"{reason}: {msg}") from None
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"corrupt image: {e}") from None
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def preprocess(rgb: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side to ``pre.resize`` (antialiased) and center-crop ``pre.crop``."""
    x = TF.resize(rgb, [pre.resize], interpolation=_INTERP[pre.interpolation], antialias=True)
    return TF.center_crop(x, [pre.crop]).contiguous()


def load_image(data: bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Bytes to the uint8 (3, crop, crop) tensor the backbone expects (before normalisation)."""
    return preprocess(decode_rgb(data, pre.background, max_pixels), pre)
