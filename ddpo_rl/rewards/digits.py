"""Prompt alignment for the digits testbed: P(image shows the prompt's digit).

A multinomial logistic regression is fit with scikit-learn on its bundled 8x8 digits when the
reward is built (deterministic, well under a second), and its forward pass runs in torch:
images of any size are turned into 8x8 grayscale in sklearn's 0..16 scale (channel mean, area
downsampling) and the softmax probability of the prompt's digit is the reward.

The classifier is deliberately regularised (``C=0.1`` on features scaled to [0, 1]): it still
classifies ~94% of held-out digits correctly, but gives a typical real digit a probability of
~0.75 rather than ~0.99, so the reward is not saturated by a model that already draws
recognisable digits, and there is headroom for RL to move it.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

import torch
import torch.nn.functional as F

from ddpo_rl.rewards.registry import register_reward

_DIGIT = re.compile(r"(?<!\d)(\d)(?!\d)")


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for: the last standalone digit 0-9 in it
    (``"a handwritten digit 7"`` -> 7).

    Raises:
        ValueError: the prompt has no standalone digit.
    """
    found = _DIGIT.findall(prompt)
    if not found:
        raise ValueError(f"cannot find a digit 0-9 in prompt {prompt!r} (expected e.g. 'a handwritten digit 7')")
    return int(found[-1])


@functools.lru_cache(maxsize=8)
def _fit_logistic_regression(C: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit sklearn's LogisticRegression on all 1797 digits (features / 16); (weight [10, 64], bias [10])."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    try:  # BLAS threads only slow a problem this small down (and fight torch for the cores)
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        limits = None
    try:
        clf = LogisticRegression(C=C, max_iter=max_iter).fit(data.data / 16.0, data.target)
    finally:
        if limits is not None:
            limits.restore_original_limits()
    weight = torch.as_tensor(clf.coef_, dtype=torch.float32)
    bias = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    return weight, bias


class DigitClassifier(torch.nn.Module):
    """A linear softmax digit classifier (sklearn-fit weights, torch forward).

    Args:
        C: inverse L2 regularisation strength of the logistic regression (features in [0, 1]).
            Smaller is less confident; ``1.0`` gives ~0.92 mean probability on real digits,
            ``0.1`` ~0.76.
        max_iter: iterations of sklearn's lbfgs solver.

    Forward: images [B, C, H, W] in [0, 1] (any size; RGB or grayscale) -> logits [B, 10].
    """

    def __init__(self, C: float = 0.1, max_iter: int = 1000):
        super().__init__()
        if C <= 0:
            raise ValueError(f"C must be positive, got {C}")
        weight, bias = _fit_logistic_regression(float(C), int(max_iter))
        self.C = float(C)
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.clone())

    @staticmethod
    def to_features(images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> [B, 64] features in [0, 1] (sklearn's 0..16 scale / 16).

        Channels are averaged to grayscale and the image is area-downsampled to 8x8 (exact for
        sizes that are multiples of 8; adaptive average pooling otherwise).
        """
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        x = images.float().clamp(0, 1).mean(dim=1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, (8, 8))
        return x.flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.to_features(images)
        return feats @ self.weight.t().to(feats.dtype) + self.bias.to(feats.dtype)

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [B, 10]."""
        return self(images).softmax(dim=-1)


@register_reward("digit_alignment", "alignment")
class DigitAlignment(torch.nn.Module):
    """Reward = probability, under :class:`DigitClassifier`, that the image shows the prompt's digit.

    Args:
        C, max_iter: passed to :class:`DigitClassifier` (ignored when ``classifier`` is given).
        classifier: an existing classifier to use.

    Call: ``reward(images [B, 3, H, W] in [0, 1], prompts: list of B str) -> float [B]`` in
    [0, 1], on the images' device. Prompts name their digit as in ``"a handwritten digit 7"``.
    """

    def __init__(self, C: float = 0.1, max_iter: int = 1000, classifier: DigitClassifier | None = None):
        super().__init__()
        self.classifier = classifier if classifier is not None else DigitClassifier(C=C, max_iter=max_iter)
        self._digit_cache: dict[str, int] = {}

    def digits_of(self, prompts: Sequence[str]) -> list[int]:
        out = []
        for p in prompts:
            d = self._digit_cache.get(p)
            if d is None:
                d = self._digit_cache[p] = parse_digit(p)
            out.append(d)
        return out

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """ValueError naming the first prompt without a digit (:func:`parse_digit`)."""
        self.digits_of(prompts)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        self.classifier.to(images.device)
        target = torch.tensor(self.digits_of(prompts), dtype=torch.long).to(images.device)
        probs = self.classifier(images).softmax(dim=-1)
        return probs.gather(1, target[:, None]).squeeze(1)
