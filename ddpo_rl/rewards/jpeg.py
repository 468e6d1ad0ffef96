"""JPEG compressibility and incompressibility, the DDPO paper's task-free rewards.

Each image is quantised to uint8 RGB, encoded by PIL as a JPEG at quality 95, and its file
size is measured in kilobytes (bytes / 1000). Incompressibility rewards the size,
compressibility its negative.

For tiny images the size barely varies: an 8x8 image is one JPEG block, and its file is
~330 bytes of header plus a few coefficients. ``resize`` upscales with nearest-neighbour
interpolation before encoding (e.g. 8x8 digits to 32x32), which gives a reward with much more
spread while keeping the image content unchanged.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch

from ddpo_rl.rewards.registry import register_reward


def _as_size(resize: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    if isinstance(resize, int):
        resize = (resize, resize)
    h, w = (int(v) for v in resize)
    if h < 1 or w < 1:
        raise ValueError(f"resize must be positive, got {resize}")
    return h, w


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Float images [B, C, H, W] in [0, 1] -> uint8 array [B, H, W, 3] (C=1 repeated to RGB)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, 3, H, W] (or [B, 1, H, W]), got {tuple(images.shape)}")
    x = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def jpeg_sizes_kb(
    images: torch.Tensor, quality: int = 95, resize: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """JPEG file size in kB (bytes / 1000) of each image, float32 [B] on the images' device.

    Args:
        images: [B, 3, H, W] in [0, 1] (values outside are clamped).
        quality: PIL JPEG quality (95 in the paper).
        resize: optional ``(height, width)`` (or one int) to upscale to, nearest neighbour,
            before encoding.
    """
    from PIL import Image

    size = _as_size(resize)
    sizes = []
    for arr in to_uint8_hwc(images):
        img = Image.fromarray(arr)
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), resample=Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32).to(images.device)


class JpegSize:
    """Reward = +/- JPEG size in kB; base of the two named rewards below.

    Args:
        resize: optional nearest-neighbour upscale before encoding, an int (square) or
            ``(height, width)``; ``32`` suits the 8x8 digits.
        quality: JPEG quality (95, as in the DDPO paper).
        sign: +1 rewards large files (incompressibility), -1 small ones (compressibility).
    """

    sign: float = 1.0

    def __init__(self, resize: int | tuple[int, int] | None = None, quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.resize = _as_size(resize)
        self.quality = int(quality)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return self.sign * jpeg_sizes_kb(images, quality=self.quality, resize=self.resize)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, quality={self.quality})"


@register_reward("jpeg_incompressibility", "incompressibility")
class JpegIncompressibility(JpegSize):
    """Reward = JPEG size in kB (quality 95): larger files score higher."""

    sign = 1.0


@register_reward("jpeg_compressibility", "compressibility")
class JpegCompressibility(JpegSize):
    """Reward = minus the JPEG size in kB (quality 95): smaller files score higher."""

    sign = -1.0
