import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddpo_rl.rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_sizes_kb


def _pil_size_kb(arr_hwc_uint8: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(arr_hwc_uint8).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000.0


def _batch(seed=0, b=6, h=8, w=8):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    return arr, images


def test_sizes_match_pil_at_quality_95():
    arr, images = _batch(b=5, h=16, w=12)
    expected = torch.tensor([_pil_size_kb(a) for a in arr])
    got = JpegIncompressibility()(images, [""] * 5)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_resize_is_nearest_neighbour_upscale():
    arr, images = _batch(b=4)
    # independent upscale with numpy (each pixel -> a 4x4 block), then PIL at q95
    up = arr.repeat(4, axis=1).repeat(4, axis=2)
    expected = torch.tensor([_pil_size_kb(a) for a in up])
    torch.testing.assert_close(JpegIncompressibility(resize=32)(images, [""] * 4), expected)
    torch.testing.assert_close(JpegIncompressibility(resize=(32, 32))(images, [""] * 4), expected)
    # and it is not the same as encoding the raw 8x8 image
    assert not torch.allclose(JpegIncompressibility()(images, [""] * 4), expected)


def test_flat_image_more_compressible_than_noise():
    _, noise = _batch(b=3, h=32, w=32)
    flat = torch.full_like(noise, 0.5)
    comp, incomp = JpegCompressibility(), JpegIncompressibility()
    assert (comp(flat, [""] * 3) > comp(noise, [""] * 3)).all()
    assert (incomp(flat, [""] * 3) < incomp(noise, [""] * 3)).all()


def test_sign_convention():
    _, images = _batch(b=4)
    size = jpeg_sizes_kb(images, quality=95)
    assert (size > 0).all()
    torch.testing.assert_close(JpegIncompressibility()(images, [""] * 4), size)
    torch.testing.assert_close(JpegCompressibility()(images, [""] * 4), -size)


def test_grayscale_is_repeated_to_rgb_and_values_clamped():
    _, images = _batch(b=2)
    gray = images[:, :1]
    r = JpegIncompressibility()
    torch.testing.assert_close(r(gray, ["", ""]), r(gray.expand(-1, 3, -1, -1), ["", ""]))
    torch.testing.assert_close(r(gray * 3 - 1, ["", ""]), r((gray * 3 - 1).clamp(0, 1), ["", ""]))


def test_bad_arguments():
    with pytest.raises(ValueError):
        JpegCompressibility(quality=0)
    with pytest.raises(ValueError):
        JpegCompressibility(resize=0)
    with pytest.raises(ValueError):
        JpegCompressibility()(torch.rand(2, 8, 8), ["", ""])
