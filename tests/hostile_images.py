"""Hostile image files built from real photos: one or more per class of decode bomb featcache must bound.

Each file says what must happen to it: fail with a reason in a given category, or decode
(to a normal tensor) within the usual time and memory. Shared by the tests and by
``benchmarks/hostile.py``; every builder is deterministic.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import bomb_png, encode, jpeg_bytes, png_bytes, real_photo

DECODES = ""  # expected outcome: a normal tensor


@dataclass(frozen=True)
class Hostile:
    name: str  # file name; the suffix is what an uploader would claim
    data: bytes
    expect: str  # DECODES, or the reason category it must fail with ("too large", "corrupt image", ...)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def with_png_chunks(png: bytes, chunks: bytes) -> bytes:
    """Insert chunks right after IHDR (before the image data)."""
    return png[:33] + chunks + png[33:]


def strip_photo(width: int, height: int, i: int = 0) -> Image.Image:
    """A real photo squeezed into an extreme aspect ratio (its pixels smeared along the long side)."""
    return real_photo(i).resize((width, height), Image.Resampling.BILINEAR)


# --- extreme aspect ratios: decode at bounded cost ---------------------------------------------
def extreme_aspect() -> list[Hostile]:
    wide, tall = strip_photo(65535, 1), strip_photo(1, 65535, 1)
    return [
        Hostile("wide_65535x1.png", png_bytes(wide), DECODES),  # the pair
        Hostile("tall_1x65535.png", png_bytes(tall), DECODES),
        Hostile("wide_65535x3.png", png_bytes(strip_photo(65535, 3, 2)), DECODES),
        Hostile("wide_65500x1.jpg", jpeg_bytes(strip_photo(65500, 1, 3)), DECODES),  # JPEG's largest side
        Hostile("tall_1x65500.jpg", jpeg_bytes(strip_photo(1, 65500, 4)), DECODES),
        Hostile("wide_65535x1.bmp", encode(wide, "BMP"), DECODES),
        Hostile("tall_1x65535.tiff", encode(tall, "TIFF"), DECODES),
        Hostile("tall_1x65535.gif", encode(tall.convert("P"), "GIF"), DECODES),
        Hostile("wide_16383x1.webp", encode(strip_photo(16383, 1, 5), "WEBP", lossless=True), DECODES),
        Hostile("wide_65535x1.ppm", encode(wide, "PPM"), DECODES),
        Hostile("wide_16000000x1.png", png_bytes(Image.new("RGB", (16_000_000, 1), (90, 120, 30))), DECODES),
    ]


# --- huge frames in small files ----------------------------------------------------------------
def _jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header's size (the scan data stays that of the small photo)."""
    at = next(i for i in range(2, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC2))
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def _gif_first_descriptor(gif: bytes) -> int:
    """Where the first image descriptor (',') starts: after the header, global palette and extensions."""
    at = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    while gif[at] == 0x21:  # extension: label, sub-blocks, terminator
        at += 2
        while gif[at]:
            at += 1 + gif[at]
        at += 1
    return at


def _gif_frame_at(x: int, y: int) -> bytes:
    g = bytearray(encode(real_photo(6).resize((32, 32)).convert("P"), "GIF"))
    at = _gif_first_descriptor(g)
    g[at + 1 : at + 5] = struct.pack("<HH", x, y)  # a 32x32 frame far outside the 32x32 screen
    return bytes(g)


def _webp_canvas(width: int, height: int) -> bytes:
    """An animated WebP whose canvas (allocated on open, twice) is far larger than its one small frame."""
    small = encode(real_photo(7).resize((64, 64)), "WEBP", save_all=True, append_images=[real_photo(8).resize((64, 64))])
    at = small.index(b"VP8X") + 8
    return small[: at + 4] + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little") + small[at + 10 :]


def _tiff_size(width: int, height: int) -> bytes:
    tiff = bytearray(encode(real_photo(9).resize((64, 64)), "TIFF"))
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    for i in range(struct.unpack_from("<H", tiff, ifd)[0]):
        at = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", tiff, at)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<I" if kind == 4 else "<H", tiff, at + 8, value)
            if kind == 3:
                struct.pack_into("<H", tiff, at + 10, 0)
    return bytes(tiff)


def _bmp_size(width: int, height: int) -> bytes:
    bmp = bytearray(encode(real_photo(10).resize((64, 64)), "BMP"))
    struct.pack_into("<ii", bmp, 18, width, height)
    return bytes(bmp)


def _ico_with_png(width: int, height: int) -> bytes:
    """An icon whose directory says 16x16 but whose PNG frame is width x height of real-looking rows."""
    row = b"\x00" + np.asarray(real_photo(11).resize((width, 1))).tobytes()
    body = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    body += png_chunk(b"IDAT", zlib.compress(row * 64)) + png_chunk(b"IEND", b"")
    png = b"\x89PNG\r\n\x1a\n" + body
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def huge_frames() -> list[Hostile]:
    photo = jpeg_bytes(real_photo(12).resize((256, 192)))
    return [
        Hostile("bomb_60000x60000.png", bomb_png(), "too large"),
        Hostile("sof_65500x65500.jpg", _jpeg_with_size(photo, 65500, 65500), "too large"),
        Hostile("frame_off_screen.gif", _gif_frame_at(65000, 65000), "too large"),
        Hostile("canvas_16383x16383.webp", _webp_canvas(16383, 16383), "too large"),
        Hostile("tiff_100000x100000.tiff", _tiff_size(100_000, 100_000), "too large"),
        Hostile("bmp_50000x50000.bmp", _bmp_size(50_000, 50_000), "too large"),
        Hostile("ico_png_30000x30000.png", _ico_with_png(30_000, 30_000), "too large"),
        Hostile("ppm_100000x100000.ppm", b"P6\n100000 100000\n255\n" + b"\x80" * 4096, "too large"),
        # within the pixel limit, but the data stops early: fails, after bounded work
        Hostile("sof_6000x6000_short.jpg", _jpeg_with_size(photo, 6000, 6000), DECODES),
        Hostile("png_6000x6000_short.png", bomb_png(6000, 6000), DECODES),
    ]


# --- animations with many frames: only the first is decoded -----------------------------------
def _gif_frames(n: int) -> bytes:
    """A real two-frame GIF whose second frame (with its control block) is repeated to make ``n`` frames."""
    a, b = (real_photo(i).resize((16, 16)).convert("P") for i in (0, 1))
    gif = encode(a, "GIF", save_all=True, append_images=[b])
    first = _gif_first_descriptor(gif)
    second = gif.index(b"!\xf9", first)  # the second frame's graphic control extension
    return gif[:-1] + gif[second:-1] * (n - 1) + b";"


def _apng_frames(n: int) -> bytes:
    """A real two-frame APNG whose second frame is repeated (with fresh sequence numbers) to make ``n`` frames."""
    a, b = (real_photo(i).resize((16, 16)) for i in (2, 3))
    png = encode(a, "PNG", save_all=True, append_images=[b])
    chunks, at = [], 8
    while at < len(png):
        length = struct.unpack_from(">I", png, at)[0]
        chunks.append((png[at + 4 : at + 8], png[at + 8 : at + 8 + length]))
        at += 12 + length
    head = [c for c in chunks if c[0] not in (b"fcTL", b"fdAT", b"IEND", b"acTL")]
    first = [c for c in chunks if c[0] in (b"fcTL", b"IDAT")][:2]
    fctl, fdat = (next(c for c in chunks[::-1] if c[0] == kind)[1] for kind in (b"fcTL", b"fdAT"))
    out = [b"\x89PNG\r\n\x1a\n", png_chunk(b"IHDR", head[0][1]), png_chunk(b"acTL", struct.pack(">II", n, 0))]
    out += [png_chunk(k, d) for k, d in head[1:] + first]
    for i in range(1, n):
        out += [png_chunk(b"fcTL", struct.pack(">I", 2 * i - 1) + fctl[4:]),
                png_chunk(b"fdAT", struct.pack(">I", 2 * i) + fdat[4:])]
    return b"".join(out + [png_chunk(b"IEND", b"")])


def _webp_frames(n: int) -> bytes:
    """A real two-frame animated WebP whose last frame chunk is repeated to make ``n`` frames."""
    a, b = (real_photo(i).resize((16, 16)) for i in (4, 5))
    webp = encode(a, "WEBP", save_all=True, append_images=[b], quality=30)
    last = webp.rindex(b"ANMF")
    body = webp[12:] + webp[last:] * (n - 2)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def many_frames() -> list[Hostile]:
    pages = [real_photo(i % 20).resize((32, 32)) for i in range(200)]
    return [
        Hostile("frames_5000.gif", _gif_frames(5000), DECODES),
        Hostile("frames_5000.png", _apng_frames(5000), DECODES),
        Hostile("frames_5000.webp", _webp_frames(5000), DECODES),
        Hostile("pages_200.tiff", encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), DECODES),
    ]


# --- progressive JPEG scans --------------------------------------------------------------------
def _repeat_last_scan_header(jpeg: bytes, extra: int) -> bytes:
    """Append ``extra`` empty copies of the last scan: each costs 10 bytes and a pass over every coefficient."""
    eoi = jpeg.rindex(b"\xff\xd9")
    sos = jpeg.rindex(b"\xff\xda", 0, eoi)
    header = jpeg[sos : sos + 2 + struct.unpack_from(">H", jpeg, sos + 2)[0]]
    return jpeg[:eoi] + header * extra + jpeg[eoi:]


def progressive_scans() -> list[Hostile]:
    big = encode(real_photo(13).resize((2000, 2000)), "JPEG", quality=80, progressive=True)
    return [
        Hostile("scans_5000.jpg", _repeat_last_scan_header(big, 5000), "too large"),
        Hostile("scans_100_64mp.jpg", _repeat_last_scan_header(_jpeg_with_size(big, 8000, 8000), 90), "too large"),
        Hostile("scans_60.jpg", _repeat_last_scan_header(big, 50), DECODES),
    ]


# --- containers whose metadata Pillow walks in Python ------------------------------------------
def _gif_with_comment_blocks(n: int) -> bytes:
    gif = encode(real_photo(14).resize((32, 32)).convert("P"), "GIF")
    at = _gif_first_descriptor(gif)
    return gif[:at] + b"!\xfe" + b"\x01c" * n + b"\x00" + gif[at:]


def _jpeg_with_segments(marker: bytes, body: bytes, n: int) -> bytes:
    jpeg = jpeg_bytes(real_photo(15).resize((64, 64)))
    seg = b"\xff" + marker + struct.pack(">H", 2 + len(body)) + body
    return jpeg[:2] + seg * n + jpeg[2:]


def _jpeg_with_stray_bytes(n: int) -> bytes:
    """Junk between two segments: decoders skip it, Pillow's parser one byte per Python iteration."""
    jpeg = jpeg_bytes(real_photo(1).resize((64, 64)))
    after_app0 = 4 + struct.unpack_from(">H", jpeg, 4)[0]
    return jpeg[:after_app0] + b"\x00" * n + jpeg[after_app0:]


def _tiff_strips(height: int) -> bytes:
    """A 1-pixel-wide gray TIFF with one strip per row."""
    n, entries = height, 8
    offsets_at = 8 + 2 + 12 * entries + 4
    counts_at = offsets_at + 4 * n
    pixels_at = counts_at + 4 * n

    def entry(tag, kind, count, value):
        return struct.pack("<HHII", tag, kind, count, value)

    ifd = [entry(256, 4, 1, 1), entry(257, 4, 1, height), entry(258, 3, 1, 8), entry(259, 3, 1, 1),
           entry(262, 3, 1, 1), entry(273, 4, n, offsets_at), entry(278, 4, 1, 1), entry(279, 4, n, counts_at)]
    head = b"II*\x00" + struct.pack("<IH", 8, entries) + b"".join(ifd) + b"\x00" * 4
    pixels = np.asarray(real_photo(16).convert("L").resize((1, height))).tobytes()
    return (head + struct.pack(f"<{n}I", *range(pixels_at, pixels_at + n)) + struct.pack(f"<{n}I", *([1] * n))
            + pixels)


def _bmp_rle8_single_runs(width: int, height: int) -> bytes:
    gray = np.asarray(real_photo(17).convert("L").resize((width, height)))
    pixels = b"".join(b"".join(bytes((1, v)) for v in row) + b"\x00\x00" for row in gray[::-1]) + b"\x00\x01"
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + 40 + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def _png_exif_bomb(values: int) -> bytes:
    """Orientation 6 plus one tag of ``values`` LONGs: rewriting EXIF after a transpose would unpack them all."""
    entries = struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x9999, 4, values, 8 + 2 + 24 + 4)
    exif = b"II*\x00" + struct.pack("<IH", 8, 2) + entries + b"\x00" * 4 + b"\x01\x00\x00\x00" * values
    return with_png_chunks(png_bytes(real_photo(18).resize((128, 96))), png_chunk(b"eXIf", exif))


def python_walked_metadata() -> list[Hostile]:
    small_png = png_bytes(real_photo(19).resize((64, 64)))
    z = zlib.compress(b"a" * (16 << 20), 9)  # Pillow keeps at most 1 MB per text chunk
    gray = np.asarray(real_photo(0).convert("L").resize((800, 800))).ravel()
    return [
        Hostile("text_chunks_100000.png", with_png_chunks(small_png, png_chunk(b"tEXt", b"k\x00v") * 100_000), "too large"),
        Hostile("ztxt_bomb.png", with_png_chunks(small_png, png_chunk(b"zTXt", b"k\x00\x00" + z)), "too large"),
        Hostile("iccp_bomb.png", with_png_chunks(small_png, png_chunk(b"iCCP", b"icc\x00\x00" + z)), "too large"),
        Hostile("idat_1_byte_chunks.png", _png_tiny_idats(), "too large"),
        Hostile("gif_comment_blocks.gif", _gif_with_comment_blocks(2_000_000), "too large"),
        Hostile("jpeg_com_10000.jpg", _jpeg_with_segments(b"\xfe", b"", 10_000), "too large"),
        Hostile("jpeg_exif_x100.jpg", _jpeg_with_segments(b"\xe1", b"Exif\x00\x00" + b"\x00" * 60_000, 100), "too large"),
        Hostile("jpeg_dqt_x200.jpg", _jpeg_with_segments(b"\xdb", b"\x00" + bytes(range(1, 65)), 200), "too large"),
        Hostile("jpeg_stray_bytes.jpg", _jpeg_with_stray_bytes(2_000_000), "corrupt image"),
        Hostile("tiff_strips_100000.tiff", _tiff_strips(100_000), "too large"),
        Hostile("bmp_rle8_runs.bmp", _bmp_rle8_single_runs(1000, 600), "too large"),
        Hostile("pnm_plain_800x800.pgm", b"P2\n800 800\n255\n" + b" ".join(b"%d" % v for v in gray), "too large"),
        Hostile("pnm_comment.ppm", b"P6\n#" + b"x" * 4_000_000 + b"\n64 64\n255\n" + b"\x80" * (64 * 64 * 3),
                "corrupt image"),
        Hostile("png_exif_bomb.png", _png_exif_bomb(3_000_000), DECODES),
    ]


def _png_tiny_idats() -> bytes:
    photo = png_bytes(real_photo(2).resize((400, 300)))
    ihdr_end, iend = 33, photo.rindex(b"IEND") - 4
    stream = b""
    at = ihdr_end
    while at < iend:
        length = struct.unpack_from(">I", photo, at)[0]
        if photo[at + 4 : at + 8] == b"IDAT":
            stream += photo[at + 8 : at + 8 + length]
        at += 12 + length
    idats = b"".join(png_chunk(b"IDAT", stream[i : i + 1]) for i in range(len(stream)))
    return photo[:ihdr_end] + idats + png_chunk(b"IEND", b"")


# --- just inside every structural limit: decodes, and the time that takes is the bound ----------
def at_the_limits() -> list[Hostile]:
    small_png = png_bytes(real_photo(3).resize((64, 64)))
    big = encode(real_photo(4).resize((2000, 1000)), "JPEG", quality=80, progressive=True)
    dqt = b"".join(bytes([i % 4]) + bytes(range(1, 65)) for i in range(1000))  # 1000 tables in one segment
    gray = np.asarray(real_photo(5).convert("L").resize((400, 400))).ravel()
    return [
        Hostile("limit_text_chunks.png", with_png_chunks(small_png, png_chunk(b"tEXt", b"k\x00v") * 65_000), DECODES),
        Hostile("limit_gif_blocks.gif", _gif_with_comment_blocks(65_000), DECODES),
        Hostile("limit_jpeg_segments.jpg", _jpeg_with_segments(b"\xfe", b"c" * 1000, 1000), DECODES),
        Hostile("limit_jpeg_dqt.jpg", _jpeg_with_segments(b"\xdb", dqt, 60), DECODES),
        Hostile("limit_jpeg_exif.jpg", _jpeg_with_segments(b"\xe1", b"Exif\x00\x00" + b"\x00" * 65_000, 8), DECODES),
        Hostile("limit_scans_100.jpg", _repeat_last_scan_header(big, 90), DECODES),
        Hostile("limit_tiff_strips.tiff", _tiff_strips(65_536), DECODES),
        Hostile("limit_bmp_rle8.bmp", _bmp_rle8_single_runs(700, 700), DECODES),
        Hostile("limit_pnm_plain.pgm", b"P2\n400 400\n255\n" + b" ".join(b"%d" % v for v in gray), DECODES),
        Hostile("limit_pnm_comment.ppm", b"P6\n#" + b"x" * 4000 + b"\n64 64\n255\n" + b"\x80" * (64 * 64 * 3), DECODES),
    ]


# --- not images, broken images, formats featcache does not decode ------------------------------
def broken() -> list[Hostile]:
    good = jpeg_bytes(real_photo(1))
    png = png_bytes(real_photo(2))
    return [
        Hostile("zero.jpg", b"", "not an image"),
        Hostile("text.jpg", b"this is not an image, just text\n" * 10, "not an image"),
        Hostile("random.png", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
        Hostile("truncated.jpg", good[: len(good) // 3], "truncated image"),
        Hostile("truncated.png", png[: len(png) // 2], "truncated image"),
        Hostile("header_only.png", png[:60], "truncated image"),
        Hostile("photoshop.png", b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03" + struct.pack(">II", 64, 64)
                + b"\x00\x08\x00\x03" + b"\x00" * 64, "unsupported"),
        Hostile("jpeg2000.jpg", encode(real_photo(3).resize((64, 64)), "JPEG2000"), "unsupported"),
        Hostile("phone.heic.jpg", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 512, "unsupported"),
    ]


def hostile_classes() -> dict[str, list[Hostile]]:
    """Every class by name, in a stable order."""
    builders = (extreme_aspect, huge_frames, many_frames, progressive_scans, python_walked_metadata, at_the_limits,
                broken)
    return {b.__name__: b() for b in builders}


def hostile_corpus() -> list[Hostile]:
    return [h for files in hostile_classes().values() for h in files]
