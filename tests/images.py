"""Build a corpus of awkward and hostile image files from real photos (for decode tests)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from featcache.datasets import imagenet20


def real_photo(i: int = 0) -> Image.Image:
    return Image.open(imagenet20()[i][0]).convert("RGB")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    return encode(img, "JPEG", quality=90, **kw)


def png_bytes(img: Image.Image) -> bytes:
    return encode(img, "PNG")


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid-looking PNG whose header claims width x height (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 16)  # a few rows; the header is what matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(img: Image.Image) -> bytes:
    """JPEG stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def bad_files() -> dict[str, bytes]:
    """name -> bytes of files that must fail with a reason, never crash or hang."""
    good = jpeg_bytes(real_photo(1))
    return {
        "zero.jpg": b"",
        "truncated.jpg": good[: len(good) // 3],
        "text.jpg": b"this is not an image, just text\n" * 10,
        "random.png": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "bomb.png": bomb_png(),
        "header_only.png": png_bytes(real_photo(2))[:60],
    }


def mode_variants(photo: Image.Image) -> dict[str, bytes]:
    """A real photo in every format and mode featcache must turn into RGB (and every EXIF orientation)."""
    arr = np.asarray(photo)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray((arr[..., 1] // 2 + 64).astype(np.uint8)))
    gray16 = Image.fromarray(arr[..., 0].astype(np.uint16) * 257 + 3)
    palette_t = photo.convert("P")
    palette_t.info["transparency"] = 5
    out = {
        "rgb.jpg": encode(photo, "JPEG", quality=90), "progressive.jpg": encode(photo, "JPEG", progressive=True),
        "gray.jpg": encode(photo.convert("L"), "JPEG"), "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
        "rgb.png": encode(photo, "PNG"), "rgba.png": encode(rgba, "PNG"), "la.png": encode(rgba.convert("LA"), "PNG"),
        "palette.png": encode(photo.convert("P"), "PNG"), "palette_t.png": encode(palette_t, "PNG"),
        "gray.png": encode(photo.convert("L"), "PNG"), "bilevel.png": encode(photo.convert("1"), "PNG"),
        "gray16.png": encode(gray16, "PNG"), "gray16.pgm": encode(gray16, "PPM"),
        "anim.gif": encode(photo.convert("P"), "GIF", save_all=True, append_images=[photo.rotate(90).convert("P")]),
        "lossy.webp": encode(photo, "WEBP"), "alpha.webp": encode(rgba, "WEBP", lossless=True),
        "rgb.tiff": encode(photo, "TIFF"), "lzw_rgba.tiff": encode(rgba, "TIFF", compression="tiff_lzw"),
        "float.tiff": encode(Image.fromarray(arr[..., 2].astype(np.float32) / 255), "TIFF"),
        "float255.tiff": encode(Image.fromarray(arr[..., 2].astype(np.float32) * 1.5), "TIFF"),
        "int32.tiff": encode(Image.fromarray(arr[..., 0].astype(np.int32) * 100 - 50), "TIFF"),
        "cmyk.tiff": encode(photo.convert("CMYK"), "TIFF"), "ycbcr.tiff": encode(photo.convert("YCbCr"), "TIFF"),
        "rgb.bmp": encode(photo, "BMP"), "rgb.ppm": encode(photo, "PPM"), "bilevel.pbm": encode(photo.convert("1"), "PPM"),
        "icon.ico": encode(photo.resize((64, 48)), "ICO", sizes=[(64, 48)]), "rgb.avif": encode(photo, "AVIF"),
    }
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out[f"exif{orientation}.jpg"] = encode(photo, "JPEG", exif=exif.tobytes())
        out[f"exif{orientation}.png"] = encode(rgba, "PNG", exif=exif.tobytes())
    return out
