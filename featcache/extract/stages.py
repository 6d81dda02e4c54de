"""The stages every extraction engine runs, as plain functions: read -> hash -> decode.

An engine (``engines/local.py``, ``engines/ray.py``) only decides where and when they run.
A file is read once: the bytes that are hashed are the bytes that are decoded, so a file that
changes during a job can never pair one content's identity with another content's vector.
Failures are returned as reasons (plain strings that cross process boundaries), never raised.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FeatcacheError
from ..hashing import sha256_bytes
from .spec import Preprocess

DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


@dataclass
class Read:
    """A file's bytes and their sha256, or why it could not be read (``error``)."""

    sha256: str | None
    data: bytes | None
    error: str = ""


def _not_regular(st: os.stat_result) -> str | None:
    if stat.S_ISREG(st.st_mode):
        return None
    return f"not a regular file: {_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')}"


def read_file(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Read:
    """Read a regular file whole and hash it. Anything else (FIFO, device, socket) is never read.

    The type is checked before opening (opening a device can have side effects) and again on the
    open descriptor (the path may have been swapped in between); the open is non-blocking, so a
    FIFO cannot stall the job.
    """
    try:
        why = _not_regular(os.stat(path))
        if why:
            return Read(None, None, why)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        return Read(None, None, f"unreadable file: {e.strerror or e}")
    try:
        st = os.fstat(fd)
        why = _not_regular(st)
        if why:
            return Read(None, None, why)
        if st.st_size > max_bytes:
            return Read(None, None, f"too large: file is {st.st_size:,} bytes, above the limit of {max_bytes:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        return Read(None, None, f"unreadable file: {e.strerror or e}")
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        return Read(None, None, f"too large: file grew past the limit of {max_bytes:,} bytes while read")
    return Read(sha256_bytes(data), data)


def decode_bytes(data: bytes, pres: Sequence[Preprocess], max_pixels: int) -> list[np.ndarray] | str:
    """uint8 (3, crop, crop) pixels for each preprocessing (one per backbone of the run), or the reason
    these bytes fail (plain types: they cross processes). The file is decoded once per background."""
    from .decode import decode_rgb, load_image, preprocess

    try:
        if len(pres) == 1:
            return [load_image(data, pres[0], max_pixels).numpy()]
        rgb: dict = {}
        for pre in pres:
            if pre.background not in rgb:
                rgb[pre.background] = decode_rgb(data, pre.background, max_pixels)
        return [preprocess(rgb[pre.background], pre).numpy() for pre in pres]
    except FeatcacheError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a hostile file must not stop the job
        return f"decoder error: {type(e).__name__}: {e}"


def reason_bucket(reason: str) -> str:
    """The category of a failure reason (the text before its first ':'), for summaries."""
    return reason.split(":", 1)[0].strip()
