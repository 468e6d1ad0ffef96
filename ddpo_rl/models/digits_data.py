"""The digits model's training data: scikit-learn's bundled 8x8 handwritten digits (offline)."""

from __future__ import annotations

import torch


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as ``(images [N, 1, 8, 8] in [-1, 1], labels int64 [N])``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.as_tensor(data.target, dtype=torch.long)
