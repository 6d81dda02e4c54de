"""Build a corpus of awkward and hostile image files from real photos (for decode tests)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from featcache.datasets import imagenet20


def real_photo(i: int = 0) -> Image.Image:
    return Image.open(imagenet20()[i][0]).convert("RGB")


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


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


def odd_but_valid(tmp: Path) -> dict[str, Path]:
    """Valid images in every mode featcache must turn into RGB."""
    photo = real_photo(3).resize((320, 240))
    out = {}
    arr = np.asarray(photo)
    variants = {
        "gray.png": photo.convert("L"),
        "palette.png": photo.convert("P"),
        "rgba.png": photo.convert("RGBA"),
        "la.png": photo.convert("LA"),
        "cmyk.jpg": photo.convert("CMYK"),
        "gray16.png": Image.fromarray(arr[..., 0].astype(np.uint16) * 257),
        "anim.gif": photo.convert("P"),
        "photo.webp": photo,
        "photo.bmp": photo,
        "photo.tiff": photo,
    }
    for name, img in variants.items():
        path = tmp / name
        if name == "anim.gif":
            img.save(path, save_all=True, append_images=[photo.rotate(90).convert("P")], duration=100)
        else:
            img.save(path)
        out[name] = path
    return out
