"""sha256 of bytes and of files: the image identity and the weights check use these two and no other."""

from __future__ import annotations

import hashlib
import os


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string (an image already read into memory)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed (weights files are hundreds of MB: never read whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
