"""Decoding: every odd mode becomes the right RGB; hostile files fail with a reason, fast."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.errors import ImageError, TooLarge, UnsupportedMedia
from featcache.extract.decode import decode_rgb, load_image
from featcache.extract.registry import BUILTIN

from .images import bad_files, exif_rotated_jpeg, jpeg_bytes, odd_but_valid, real_photo

PRE = BUILTIN["efficientnet_lite0"].preprocess


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


def test_every_mode_becomes_rgb(tmp_path):
    for name, path in odd_but_valid(tmp_path).items():
        x = load_image(path.read_bytes(), PRE)
        assert x.shape == (3, 224, 224) and x.dtype == torch.uint8, name


def test_alpha_composited_on_white():
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (16, 16, 48, 48))  # opaque blue square
    import io

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
