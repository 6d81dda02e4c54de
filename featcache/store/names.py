"""File names as cache text: every name the OS allows round-trips, and stored text is valid Unicode.

Linux file names are bytes; Python hands the bytes that are not UTF-8 over as lone surrogates
(``os.fsdecode``), which no UTF-8 writer (Zarr, JSON, HTTP) accepts. A name that is valid
UTF-8 is stored as itself. Any other is stored as NUL (the one character no file name can hold)
followed by its bytes percent-encoded, so it stays readable, unambiguous and reversible.
"""

from __future__ import annotations

import os
from urllib.parse import quote_from_bytes, unquote_to_bytes

MARK = "\x00"
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def encode_name(name: str) -> str:
    """Text to store for an OS name (a key, path or label taken from the file system)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return MARK + quote_from_bytes(os.fsencode(name), safe=_SAFE)
    return name


def decode_name(stored: str) -> str:
    """The OS name (surrogate-escaped ``str``, as ``os`` functions take it) back from stored text."""
    if stored.startswith(MARK):
        return os.fsdecode(unquote_to_bytes(stored[1:]))
    return stored


def printable(text: str) -> str:
    """Any text (an error message quoting a file name) made valid Unicode; not reversible."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
