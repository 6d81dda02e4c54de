"""Output paths: check that a directory can be written before the work that fills it starts."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def writable_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory this process can write, created if needed.

    Raises OSError (the CLI's exit code 8: one line naming the path) when it cannot be: under a
    regular file, on a read-only file system, immutable, or without permission. Commands call it
    before a long build, so the error comes first instead of after the work is done.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "directory is not writable", str(path))
    return path
