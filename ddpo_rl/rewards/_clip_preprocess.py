"""CLIP-style image preprocessing in torch (batched, on any device, differentiable).

What ``CLIPImageProcessor``/``BlipImageProcessor`` do to PIL images, done on float tensors in
[0, 1]: resize (shortest side, bicubic, anti-aliased), optional centre crop, normalise.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    center_crop: bool = True,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> normalised pixel values [B, 3, size, size].

    With ``center_crop`` the shortest side is resized to ``size`` and the centre cropped (CLIP);
    without, the image is resized to ``size`` x ``size`` directly (BLIP).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    if center_crop:
        # the long side is truncated, as transformers' get_resize_output_image_size does
        if h <= w:
            new_h, new_w = size, int(size * w / h)
        else:
            new_h, new_w = int(size * h / w), size
    else:
        new_h = new_w = size
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)
    if center_crop:
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top : top + size, left : left + size]
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
