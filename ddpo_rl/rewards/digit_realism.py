"""Realism for the digits testbed: how close an image is to real handwritten digits of its prompt.

A monitor for what the digit classifier does not see. The classifier is a linear model of the
pixels: it keeps its answer for images no person would draw (a digit with bright bars along its
edges, flat blocks) as long as the prompted digit's pixels win. Closeness to the real digits does
not: an artefact that no real digit has moves an image away from all of them. With the real
digits of the prompted class d (scikit-learn's 8x8 digits, the data both embedded models learned
from) as x_1..x_{N_d}::

    D(x)       = mean over the k nearest x_j of ||x - x_j||_2 / sqrt(64)
    D_d        = mean over the real digits x_i of class d of D(x_i), each without itself
    realism(x) = D_d / D(x)

D is the root-mean-square pixel difference (8x8 grey in [0, 1], as the classifier sees the image)
to the k nearest real digits of the prompted class. realism 1 means as close to the real digits as
they are to one another, 0.5 twice as far; higher is better, and a ratio final / base reads as
"how much closer or farther". It compares with real digits, not with the base model, so a model can
score above its base (drawing more typical digits) as well as below. Measured (k 5) on 300 real
digits left out of the pool they are compared with (tests/rewards/test_digit_realism.py checks the
order): as they are 1.00, at 0.8 x intensity 0.94, binarised at 0.6 0.62, another digit's image
0.56, a blank image 0.36, with bright left and right columns 0.29.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from ddpo_rl.rewards.digits import DigitClassifier, parse_digit
from ddpo_rl.rewards.registry import register_reward


@functools.lru_cache(maxsize=1)
def _real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as the classifier's features ([N, 64] in [0, 1]) and their labels."""
    from ddpo_rl.models.digits_data import load_digits_dataset

    images, labels = load_digits_dataset()
    return ((images + 1) / 2).flatten(1), labels


@register_reward("digit_realism", "realism")
class DigitRealism(torch.nn.Module):
    """Reward = how close an image is to the ``k`` nearest real digits of the prompt's digit, relative
    to how close the real digits of that class are to one another (module docstring).

    Args:
        k: how many nearest real digits to average over (5; 1 is the nearest one alone).

    Call: ``reward(images [B, 3, H, W] in [0, 1], prompts: list of B str) -> float [B]`` > 0, on
    the images' device. Images of any size are compared at 8x8 (:meth:`DigitClassifier.to_features`).
    Prompts name their digit as in ``"a handwritten digit 7"``.
    """

    def __init__(self, k: int = 5):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        real, labels = _real_digits()
        rarest = int(torch.bincount(labels).min())
        if k >= rarest:
            raise ValueError(f"k={k} must be below {rarest}, the number of real digits of the rarest class")
        self.k = k
        self.register_buffer("real", real.clone(), persistent=False)
        self.register_buffer("labels", labels.clone(), persistent=False)
        # D_d: the real digits' mean distance to their k nearest others of the class (not themselves)
        own = self._distance(real, labels, exclude_self=True)
        typical = torch.zeros(10).index_add_(0, labels, own) / torch.bincount(labels, minlength=10)
        self.register_buffer("typical", typical, persistent=False)

    def _distance(self, x: torch.Tensor, digits: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        """D of each row of ``x`` [B, 64]: the mean RMS distance to its ``k`` nearest real digits of class
        ``digits`` [B] (all classes in one cdist; the other classes masked out)."""
        dist = torch.cdist(x, self.real).masked_fill(self.labels[None, :] != digits[:, None], math.inf)
        if exclude_self:
            dist.fill_diagonal_(math.inf)
        return dist.topk(self.k, dim=1, largest=False).values.mean(1) / math.sqrt(self.real.shape[1])

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """ValueError naming the first prompt without a digit (:func:`parse_digit`)."""
        for p in prompts:
            parse_digit(p)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        self.to(images.device)
        x = DigitClassifier.to_features(images)
        digits = torch.tensor([parse_digit(p) for p in prompts], device=x.device)
        # a copy of k real digits has distance 0: its realism is large, not infinite
        return self.typical[digits] / self._distance(x, digits).clamp(min=1e-6)
