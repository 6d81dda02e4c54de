"""Thumbnails of cached images, by content hash: the file is read, checked, decoded, shrunk, kept.

A thumbnail is named by (sha256, size), never by a path. The file the cache recorded for the
hash is read and hashed again: bytes that no longer hash to the image's sha256 (the file was
edited or replaced) are refused (410), never shown under the old identity. Decoding goes
through ``featcache.extract.decode`` (pixel-count limit, EXIF, alpha on white), so a thumbnail
shows what the model saw before its resize. Encoded thumbnails are kept in a bounded LRU (bytes).
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict

from PIL import Image

from ..errors import FeatcacheError, TooLarge
from ..extract.decode import decode_rgb
from ..hashing import sha256_bytes

SIZE_MIN, SIZE_MAX, SIZE_DEFAULT = 32, 512, 160
MAX_FILE_BYTES = 256 * 1024 * 1024
JPEG_QUALITY = 85


class Gone(FeatcacheError):
    """The image is in the cache, but no file holds its bytes any more."""

    http_status = 410


def render(path: str, sha256: str, size: int, max_pixels: int) -> bytes:
    """JPEG bytes of the image at ``path`` shrunk to fit ``size`` x ``size`` (never enlarged)."""
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            raise TooLarge(f"image file is over {MAX_FILE_BYTES:,} bytes; no thumbnail")
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise Gone(f"image {sha256} is in the cache, but its file {os.path.basename(path)!r} can no longer be read; "
                   "re-run `featcache extract` on the collection") from None
    if sha256_bytes(data) != sha256:
        raise Gone(f"the file cached for image {sha256} now holds other bytes (edited or replaced); "
                   "re-run `featcache extract` on the collection")
    rgb = decode_rgb(data, max_pixels=max_pixels)
    img = Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB")
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


class ThumbnailCache:
    """Least-recently-used thumbnails, at most ``max_bytes`` of encoded images in all.

    Used from the event loop only (no lock): rendering runs in a worker thread, the cache does not.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, key: tuple[str, int]) -> bytes | None:
        data = self._items.get(key)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        if len(data) > self.max_bytes or key in self._items:
            return
        self._items[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= len(old)

    def describe(self) -> dict:
        return {"items": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}
