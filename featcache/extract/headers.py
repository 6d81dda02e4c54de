"""Structural checks on the raw bytes of an image, before any decoder sees them.

A decoder's cost should follow the pixel count, but some costs follow what the container
says instead: Pillow walks JPEG markers, PNG chunks, GIF extension blocks, TIFF tags and
strips, RLE bitmaps and plain-text PNM in Python; libjpeg re-reads every coefficient once
per progressive scan; Pillow allocates WebP canvases and decodes ICO frames while merely
opening them. A small file can make any of these arbitrarily large. ``sniff`` walks the
same structures in bounded time, refuses counts no real image needs (``TooLarge``), names
formats featcache does not decode (``UnsupportedMedia``), and reports what the decoders
will allocate beyond the image itself, so the caller can reserve memory before decoding.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..errors import ImageError, TooLarge, UnsupportedMedia

# Limits far above any real image, low enough that the Python loops they bound stay ~0.1-1 s.
DEFAULT_MAX_PIXELS = 64_000_000  # larger images are refused (decompression bombs); --max-pixels
MAX_JPEG_SEGMENTS = 1024  # markers before EOI; Pillow parses those before the first scan in Python
MAX_JPEG_STRAY_BYTES = 65_536  # junk between segments before the first scan, stepped over byte by byte
MAX_JPEG_SCANS = 100  # libjpeg writes 10 progressive scans, mozjpeg ~10-20
MAX_JPEG_SCAN_PIXELS = 2_000_000_000  # scans x pixels: each progressive scan revisits every coefficient
MAX_PNG_CHUNKS = 65_536  # Pillow reads each chunk in Python (~10 us each)
MAX_GIF_BLOCKS = 65_536  # extension sub-blocks (and stray bytes) before the first frame
MAX_TIFF_VALUES = 1 << 18  # values of one numeric tag (a 16-bit colour map has 3 x 65,536)
MAX_TIFF_BLOCKS = 65_536  # strips or tiles in the first page
MAX_ICO_ENTRIES = 256
MAX_PY_DECODED_BYTES = 1 << 20  # RLE bitmaps and plain-text PNM are decoded byte by byte in Python
MAX_PNM_HEADER = 4096  # Pillow reads the PNM header (comments included) one byte at a time

# Pillow format name -> what users call it; anything else Pillow knows is refused as unsupported.
SUPPORTED = {"JPEG": "JPEG", "PNG": "PNG", "GIF": "GIF", "WEBP": "WebP", "TIFF": "TIFF", "BMP": "BMP",
             "PPM": "PNM", "ICO": "ICO", "AVIF": "AVIF"}


@dataclass(frozen=True)
class Header:
    """What the container says, as far as decoding cost is concerned."""

    format: str  # Pillow format name to open with
    size: tuple[int, int] | None = None  # (width, height) when known before opening
    opens_eagerly: bool = False  # Pillow allocates/decodes while opening: reserve memory before Image.open
    decoder_bytes: int = 0  # what the decoder allocates beyond the image (coefficients, canvases)
    decoder_bytes_per_pixel: float = 0.0  # the same, per pixel
    scans: int = 0  # JPEG scans (each one a pass over every coefficient)


def sniff(data: bytes, max_pixels: int) -> Header:
    """The format, size and decoder costs of ``data``; raises an ``ImageError`` with a reason instead."""
    try:
        header = _sniff(data)
    except (struct.error, IndexError):  # a field the parser needs lies past the end
        raise ImageError(f"truncated image: the header ends early ({len(data):,} bytes)") from None
    if header.size is not None:
        check_pixels(header.size, max_pixels)
        w, h = header.size
        if header.scans * w * h > MAX_JPEG_SCAN_PIXELS:
            raise TooLarge(f"too large: JPEG with {header.scans} scans over {w}x{h} pixels; decoding revisits every "
                           f"pixel once per scan (limit {MAX_JPEG_SCAN_PIXELS:,} scan-pixels)")
    return header


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse a size before anything of that size is allocated."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"corrupt image: invalid size {w}x{h}")
    if w * h > max_pixels:
        raise TooLarge(f"too large: image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
                       "(decompression bomb?)")


def _sniff(data: bytes) -> Header:
    if not data:
        raise ImageError("not an image: empty file (0 bytes)")
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(data)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data)
    if head.startswith((b"GIF87a", b"GIF89a")):
        return _gif(data)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp(data)
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"MM*\x00", b"II\x00*")):  # as Pillow
        return _tiff(data)
    if head.startswith(b"BM"):
        return _bmp(data)
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456fF":
        return _pnm(data)
    if head.startswith(b"\x00\x00\x01\x00"):
        return _ico(data)
    if head[4:8] == b"ftyp":
        return _isobmff(data)
    raise UnsupportedMedia(_unknown(data))


def _isobmff(data: bytes) -> Header:
    """AVIF is decoded; other HEIF brands (HEIC from phones) are named, not mistaken for broken AVIF."""
    box = min(len(data), max(16, _u32(data, 0)), 4096)
    brands = {data[i : i + 4] for i in range(8, box - 3, 4)}
    if brands & {b"avif", b"avis"}:
        return Header("AVIF", decoder_bytes_per_pixel=12.0)  # YUV planes up to 16-bit, alpha, RGBA
    if brands & {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"}:
        raise UnsupportedMedia(f"unsupported: HEIF/HEIC images are not decoded (supported: {_supported()})")
    raise UnsupportedMedia(f"unsupported: ISO media ({data[8:12].decode('latin-1')!r}) is not an image format "
                           f"featcache decodes (supported: {_supported()})")


def _supported() -> str:
    return ", ".join(sorted(set(SUPPORTED.values())))


def _unknown(data: bytes) -> str:
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and name not in SUPPORTED and accept(prefix) is True:
                return f"unsupported: {name} images are not decoded (supported: {_supported()})"
        except Exception:  # noqa: BLE001 - an accept() that trips over a short prefix just says no
            continue
    return "not an image: unrecognised format"


def _u16(data: bytes, pos: int, order: str = ">") -> int:
    return struct.unpack_from(order + "H", data, pos)[0]


def _u32(data: bytes, pos: int, order: str = ">") -> int:
    return struct.unpack_from(order + "I", data, pos)[0]


# --- JPEG -------------------------------------------------------------------------------
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the end of entropy-coded data or of junk
# Segments whose Pillow handler loops or concatenates in Python: how many of each a real file needs at most.
_JPEG_KIND_LIMITS = {"exif": 8, "photoshop": 8, "DQT": 64}


def _jpeg_kind(data: bytes, marker: int, body: int) -> str | None:
    if marker == 0xDB:
        return "DQT"
    if marker == 0xE1 and data.startswith(b"Exif\0\0", body):
        return "exif"
    if marker == 0xED and data.startswith(b"Photoshop 3.0\0", body):
        return "photoshop"
    return None


def _jpeg(data: bytes) -> Header:
    pos, n = 2, len(data)
    segments = scans = stray = 0
    kinds = dict.fromkeys(_JPEG_KIND_LIMITS, 0)
    progressive = False
    frame: tuple[int, int, list[tuple[int, int]]] | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):  # junk or fill bytes: find the next marker
            m = _NEXT_MARKER.search(data, pos)
            if m is None:
                break
            if not scans:  # before the first scan Pillow steps over these one byte at a time
                stray += m.start() - pos
                if stray > MAX_JPEG_STRAY_BYTES:
                    raise ImageError(f"corrupt image: more than {MAX_JPEG_STRAY_BYTES:,} stray bytes between "
                                     "JPEG segments")
            pos = m.start()
        marker = data[pos + 1]
        pos += 2
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            continue
        length = _u16(data, pos)
        if length < 2:
            raise ImageError(f"corrupt image: JPEG segment 0x{marker:02X} has length {length}")
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise TooLarge(f"too large: JPEG has more than {MAX_JPEG_SEGMENTS:,} segments")
        kind = _jpeg_kind(data, marker, pos + 2)
        if kind is not None:
            kinds[kind] += 1
            if kinds[kind] > _JPEG_KIND_LIMITS[kind]:
                raise TooLarge(f"too large: JPEG has more than {_JPEG_KIND_LIMITS[kind]} {kind} segments")
        if marker in _SOF and length >= 8:
            if frame is not None:
                raise ImageError("corrupt image: JPEG has two frame headers (SOF)")
            height, width, ncomp = _u16(data, pos + 3), _u16(data, pos + 5), data[pos + 7]
            sampling = [(data[i] >> 4, data[i] & 15) for i in range(pos + 9, min(pos + 8 + 3 * ncomp, n), 3)]
            frame = (width, height, sampling)
            progressive = marker in _PROGRESSIVE
        pos += length
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise TooLarge(f"too large: JPEG has more than {MAX_JPEG_SCANS} scans")
            m = _NEXT_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
    if frame is None:
        return Header("JPEG")  # no frame header: the decoders will say what is wrong
    width, height, sampling = frame
    coef = 0
    if progressive or scans > 1:  # libjpeg keeps every DCT coefficient of the image until the last scan
        hmax = max((h for h, _ in sampling), default=1) or 1
        vmax = max((v for _, v in sampling), default=1) or 1
        for h, v in sampling:
            coef += 128 * (width * h // (8 * hmax) + h + 1) * (height * v // (8 * vmax) + v + 1)
    return Header("JPEG", (width, height), decoder_bytes=coef, scans=scans)


# --- PNG --------------------------------------------------------------------------------
def _png(data: bytes) -> Header:
    pos, n, chunks, frames = 8, len(data), 0, 0
    while pos + 8 <= n:
        length, kind = _u32(data, pos), data[pos + 4 : pos + 8]
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise TooLarge(f"too large: PNG has more than {MAX_PNG_CHUNKS:,} chunks")
        if kind == b"IEND":
            break
        if kind == b"fcTL":
            frames += 1
            if frames > 1:  # Pillow stops reading at the second frame of an animation
                break
        pos += 12 + length
    if data[12:16] != b"IHDR" or n < 26:
        return Header("PNG")
    width, height, depth, colour = _u32(data, 16), _u32(data, 20), data[24], data[25]
    row = 1 + (width * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4) * depth + 7) // 8
    return Header("PNG", (width, height), decoder_bytes=2 * row)  # zlib's decoder unfilters against the previous row


# --- GIF --------------------------------------------------------------------------------
def _gif(data: bytes) -> Header:
    """Blocks up to the first frame; the canvas Pillow makes: the screen, grown to hold the first frame."""
    n = len(data)
    if n < 13:
        raise ImageError("truncated image: GIF header is incomplete")
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = 0
    while pos < n and data[pos] not in (0x2C, 0x3B):  # up to the first image descriptor, or the trailer
        if data[pos] == 0x21 and pos + 1 < n:  # extension: label, then sub-blocks up to an empty one
            pos += 2
            while pos < n and data[pos] and blocks <= MAX_GIF_BLOCKS:
                pos += 1 + data[pos]
                blocks += 1
        blocks += 1  # the extension's terminator, or a stray byte Pillow steps over one at a time
        pos += 1
        if blocks > MAX_GIF_BLOCKS:
            raise TooLarge(f"too large: GIF has more than {MAX_GIF_BLOCKS:,} blocks before its first frame")
    width, height = _u16(data, 6, "<"), _u16(data, 8, "<")
    if pos + 9 <= n and data[pos] == 0x2C:
        x, y, w, h = struct.unpack_from("<HHHH", data, pos + 1)
        width, height = max(width, x + w), max(height, y + h)
    return Header("GIF", (width, height))


# --- WebP -------------------------------------------------------------------------------
def _webp(data: bytes) -> Header:
    """Canvas size from the first chunk: Pillow's decoder allocates two canvases while opening."""
    kind, body = data[12:16], 20
    size = None
    if kind == b"VP8X" and len(data) >= body + 10:
        size = (1 + int.from_bytes(data[body + 4 : body + 7], "little"), 1 + int.from_bytes(data[body + 7 : body + 10], "little"))
    elif kind == b"VP8 " and len(data) >= body + 10:
        size = (_u16(data, body + 6, "<") & 0x3FFF, _u16(data, body + 8, "<") & 0x3FFF)
    elif kind == b"VP8L" and len(data) >= body + 5:
        bits = _u32(data, body + 1, "<")
        size = (1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
    if size is None:
        raise ImageError("corrupt image: WebP without a VP8/VP8L/VP8X header")
    return Header("WEBP", size, opens_eagerly=True, decoder_bytes=2 * len(data), decoder_bytes_per_pixel=8.0)


# --- TIFF -------------------------------------------------------------------------------
_TIFF_NUMERIC = {3: 2, 4: 4, 5: 8, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}  # type -> size


def _tiff(data: bytes) -> Header:
    """The first page's tags: Pillow turns numeric tags and strip lists into Python tuples and tiles."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        if data[2:4] in (b"*\x00", b"\x00*"):
            offset = _u32(data, 4, order)
            count, entries, entry_size, count_fmt = _u16(data, offset, order), offset + 2, 12, "I"
        else:  # BigTIFF
            offset = struct.unpack_from(order + "Q", data, 8)[0]
            count, entries, entry_size, count_fmt = struct.unpack_from(order + "Q", data, offset)[0], offset + 8, 20, "Q"
    except struct.error:
        raise ImageError("truncated image: TIFF header or first directory is incomplete") from None
    if count > 65_535:
        raise TooLarge(f"too large: TIFF directory has {count:,} entries")
    samples, bits, width, height = 1, 8, 0, 0
    for i in range(count):
        at = entries + i * entry_size
        if at + entry_size > len(data):
            break
        tag, kind = struct.unpack_from(order + "HH", data, at)
        values = struct.unpack_from(order + count_fmt, data, at + 4)[0]
        if kind in _TIFF_NUMERIC and values > MAX_TIFF_VALUES:
            raise TooLarge(f"too large: TIFF tag {tag} holds {values:,} values (limit {MAX_TIFF_VALUES:,})")
        if tag in (273, 324) and values > MAX_TIFF_BLOCKS:  # StripOffsets, TileOffsets
            raise TooLarge(f"too large: TIFF first page has {values:,} strips or tiles (limit {MAX_TIFF_BLOCKS:,})")
        value_at = at + entry_size // 2 + 2  # the inline value: byte 8 of 12, or 12 of 20 (BigTIFF)
        if tag in (256, 257) and kind in (3, 4, 16) and values == 1:  # ImageWidth, ImageLength
            value = struct.unpack_from(order + {3: "H", 4: "I", 16: "Q"}[kind], data, value_at)[0]
            width, height = (value, height) if tag == 256 else (width, value)
        if tag in (258, 277) and kind == 3:  # BitsPerSample (first value, if inline), SamplesPerPixel
            value = _u16(data, value_at, order) if values * 2 <= entry_size - value_at + at else 16
            samples, bits = (samples, value) if tag == 258 else (value, bits)
    # libtiff holds one raw strip or tile, which can be the whole page (at up to 64 bits x several samples).
    raw = min(64, samples) * min(64, bits) / 8
    return Header("TIFF", (width, height) if width and height else None, decoder_bytes_per_pixel=max(1.0, raw))


# --- BMP, PNM, ICO ------------------------------------------------------------------------
def _bmp(data: bytes) -> Header:
    if len(data) < 26:
        raise ImageError("truncated image: BMP header is incomplete")
    info = _u32(data, 14, "<")
    if info == 12:  # OS/2 1.x
        size = (_u16(data, 18, "<"), _u16(data, 20, "<"))
    else:
        size = (abs(struct.unpack_from("<i", data, 18)[0]), abs(struct.unpack_from("<i", data, 22)[0]))
    if info >= 40 and len(data) >= 34 and _u32(data, 30, "<") in (1, 2) and len(data) > MAX_PY_DECODED_BYTES:
        raise TooLarge(f"too large: run-length encoded BMP of {len(data):,} bytes (decoded in Python; limit "
                       f"{MAX_PY_DECODED_BYTES:,} bytes)")
    return Header("BMP", size)


def _pnm(data: bytes) -> Header:
    """Pillow reads the header one byte at a time: its tokens (and comments) must end early."""
    if data[1:2] in b"123" and len(data) > MAX_PY_DECODED_BYTES:
        raise TooLarge(f"too large: plain-text PNM of {len(data):,} bytes (decoded in Python; limit "
                       f"{MAX_PY_DECODED_BYTES:,} bytes)")
    tokens: list[bytes] = []
    need = 2 if data[1:2] in b"14" else 3  # width, height, then maxval or scale
    pos, end = 2, min(len(data), MAX_PNM_HEADER)
    while len(tokens) < need and pos < end:
        if data[pos] in b" \t\r\n\x0b\x0c":
            pos += 1
        elif data[pos] == 0x23:  # a comment, to the end of the line
            stops = [i for i in (data.find(b"\n", pos, end), data.find(b"\r", pos, end)) if i >= 0]
            pos = min(stops, default=end) + 1
        else:
            start = pos
            while pos < end and data[pos] not in b" \t\r\n\x0b\x0c#":
                pos += 1
            tokens.append(data[start:pos])
    if len(tokens) < need and len(data) > MAX_PNM_HEADER:
        raise ImageError(f"corrupt image: PNM header is longer than {MAX_PNM_HEADER:,} bytes")
    size = (int(tokens[0]), int(tokens[1])) if len(tokens) >= 2 and tokens[0].isdigit() and tokens[1].isdigit() else None
    return Header("PPM", size)


def _ico(data: bytes) -> Header:
    """Pillow decodes the largest frame while opening, at its real size (not the directory's)."""
    count = _u16(data, 4, "<")
    if count > MAX_ICO_ENTRIES:
        raise TooLarge(f"too large: ICO has {count} images (limit {MAX_ICO_ENTRIES})")
    width = height = 1
    for i in range(count):
        at = 6 + 16 * i
        if at + 16 > len(data):
            raise ImageError("truncated image: ICO directory is incomplete")
        offset = _u32(data, at + 12, "<")
        frame = data[offset : offset + 24]
        if frame.startswith(b"\x89PNG\r\n\x1a\n") and len(frame) >= 24:
            w, h = _u32(frame, 16), _u32(frame, 20)
        elif len(frame) >= 12:
            w, h = abs(struct.unpack_from("<i", frame, 4)[0]), abs(struct.unpack_from("<i", frame, 8)[0]) // 2
        else:
            raise ImageError(f"truncated image: ICO image {i} is missing")
        if w * h > width * height:
            width, height = w, h
    return Header("ICO", (width, height), opens_eagerly=True, decoder_bytes_per_pixel=12.0)
