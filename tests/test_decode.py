"""Decoding: every odd mode becomes the right RGB, with the very pixels the fingerprint's DECODER names;
hostile files fail with a reason, fast (the classes of hostile files: test_hostile_decode.py)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from featcache.errors import ImageError, TooLarge, UnsupportedMedia
from featcache.extract import decode
from featcache.extract.decode import decode_rgb, load_image, preprocess
from featcache.extract.registry import BUILTIN

from .images import bad_files, exif_rotated_jpeg, jpeg_bytes, mode_variants, real_photo

PRE = BUILTIN["efficientnet_lite0"].preprocess
BILINEAR = next(s.preprocess for s in BUILTIN.values() if s.preprocess.interpolation == "bilinear")


@pytest.fixture(scope="module")
def variants() -> dict[str, bytes]:
    """One real photo in every mode and format (encoding them, AVIF above all, takes seconds): read only."""
    return mode_variants(real_photo(3).resize((320, 240)))


def reference_decode(data: bytes, background=(255, 255, 255)) -> torch.Tensor:
    """featcache-decode-v1 as first written (whole-image Pillow conversions): what spec.DECODER promises."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                           apply_exif_orientation=True)
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
        img = Image.new("RGB", rgba.size, background)
        img.paste(rgba, mask=rgba.getchannel("A"))
    img = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def reference_preprocess(rgb: torch.Tensor, pre) -> torch.Tensor:
    x = TF.resize(rgb, [pre.resize], interpolation=decode._INTERP[pre.interpolation], antialias=True)
    return TF.center_crop(x, [pre.crop]).contiguous()


@pytest.mark.parametrize("tile_pixels", [decode.TILE_PIXELS, 1000, 100])
def test_pixels_are_those_of_the_reference_decoder(monkeypatch, variants, tile_pixels):
    """Bounded decoding changed no pixel: same tensors (and memory layout) for every mode, tiles of any size."""
    monkeypatch.setattr(decode, "TILE_PIXELS", tile_pixels)  # 100: every row is cut into pieces
    for name, data in variants.items():
        want = reference_decode(data, (10, 20, 30))
        got = decode_rgb(data, (10, 20, 30))
        assert torch.equal(got, want) and got.stride() == want.stride(), name
        for pre in (PRE, BILINEAR):
            assert torch.equal(load_image(data, pre), reference_preprocess(reference_decode(data, pre.background), pre)), name


def test_orientation_transposes_match_pillow():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    for method in Image.Transpose:
        want = np.asarray(img.transpose(method))
        assert np.array_equal(decode._transpose_array(np.asarray(img), method), want), method


@pytest.mark.parametrize("size", [(12_000, 40), (40, 12_000), (9000, 300), (300, 9000)])
def test_extreme_aspect_path_matches_the_one_shot_resize(size):
    """Resizing only the span the centre crop keeps gives the one-shot result up to sub-pixel placement."""
    rgb = torch.from_numpy(np.asarray(real_photo(5).resize(size, Image.Resampling.BILINEAR)).copy()).permute(2, 0, 1)
    for pre in (PRE, BILINEAR):
        exact = reference_preprocess(rgb, pre).float()  # affordable at these sizes (up to 77 M pixels resized)
        cropped = decode._preprocess_extreme(rgb, pre).float()
        assert cropped.shape == exact.shape == (3, pre.crop, pre.crop)
        assert (cropped - exact).abs().mean() < 2.0, size


def test_extreme_aspect_path_is_taken_above_the_threshold(monkeypatch):
    rgb = decode_rgb(jpeg_bytes(real_photo(6).resize((1200, 100))))
    assert torch.equal(preprocess(rgb, PRE), reference_preprocess(rgb, PRE))  # 256 x 3072: one shot
    monkeypatch.setattr(decode, "RESIZE_EXACT_MAX_PIXELS", 256 * 1000)
    x = preprocess(rgb, PRE)
    assert not torch.equal(x, reference_preprocess(rgb, PRE))
    assert (x.float() - reference_preprocess(rgb, PRE).float()).abs().mean() < 2.0


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_files_fail_with_reason(name):
    data = bad_files()[name]
    t = time.perf_counter()
    with pytest.raises(ImageError) as err:
        load_image(data, PRE)
    assert time.perf_counter() - t < 5, "a hostile file must not stall the decoder"
    assert str(err.value)


def test_reasons_name_the_problem():
    files = bad_files()
    cases = {"zero.jpg": "empty", "text.jpg": "not an image", "bomb.png": "decompression bomb", "truncated.jpg": "truncat"}
    for name, word in cases.items():
        with pytest.raises(ImageError, match=word):
            load_image(files[name], PRE)
    with pytest.raises(TooLarge):
        load_image(files["bomb.png"], PRE)
    with pytest.raises(UnsupportedMedia):
        load_image(files["text.jpg"], PRE)


def test_pixel_limit_is_configurable():
    data = jpeg_bytes(real_photo(0))  # 512 x 512
    assert load_image(data, PRE).shape == (3, 224, 224)
    with pytest.raises(TooLarge):
        load_image(data, PRE, max_pixels=100_000)


def test_every_mode_becomes_rgb(variants):
    for name, data in variants.items():
        x = load_image(data, PRE)
        assert x.shape == (3, 224, 224) and x.dtype == torch.uint8, name


def test_alpha_composited_on_white():
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (16, 16, 48, 48))  # opaque blue square
    buf = io.BytesIO()
    img.save(buf, "PNG")
    rgb = decode_rgb(buf.getvalue())
    assert rgb[:, 0, 0].tolist() == [255, 255, 255]
    assert rgb[:, 32, 32].tolist() == [0, 0, 255]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16).repeat(4).reshape(32, 32) * 257)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    rgb = decode_rgb(path.read_bytes())
    assert rgb[0].max() == 255 and rgb[0].min() == 0
    assert len(torch.unique(rgb[0])) > 200  # clipping would leave almost everything at 255


def test_exif_orientation_applied():
    photo = real_photo(4).resize((300, 200))
    upright = decode_rgb(jpeg_bytes(photo)).float()
    rotated = decode_rgb(exif_rotated_jpeg(photo)).float()
    assert rotated.shape == upright.shape
    assert (rotated - upright).abs().mean() < 8  # JPEG noise only; unrotated would differ wildly


def test_cmyk_matches_rgb_source(tmp_path):
    photo = real_photo(5).resize((256, 256))
    a = decode_rgb(jpeg_bytes(photo)).float()
    b = decode_rgb(jpeg_bytes(photo.convert("CMYK"))).float()
    assert (a - b).abs().mean() < 12
