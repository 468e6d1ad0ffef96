"""Sample diversity: how far each image is from the other images of its prompt in the same batch.

A reward-like function over a batch grouped by prompt, for monitoring mode collapse (a model
fine-tuned on a per-prompt reward such as digit alignment can end up drawing one image per prompt)::

    d(i) = mean over j != i with prompt_j = prompt_i of  ||x_i - x_j||_2 / sqrt(D)

i.e. the root-mean-square pixel difference (images in [0, 1], D = C*H*W values) to each other
sample of the same prompt, averaged. An image whose prompt has no other sample in the batch gets
NaN (no diversity to measure; the evaluation averages the finite values). It depends on the batch,
so it is meant for evaluation batches, where each prompt appears several times.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ddpo_rl.rewards.registry import register_reward


@register_reward("sample_diversity", "diversity")
class SampleDiversity:
    """Mean RMS pixel distance of each image to the other images of its prompt in the batch.

    Call: ``reward(images [B, C, H, W] in [0, 1], prompts: list of B str) -> float [B]``.
    """

    __name__ = "sample_diversity"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        x = images.float().flatten(1)
        ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        pid = torch.tensor([ids[p] for p in prompts], device=x.device)
        same = (pid[:, None] == pid[None, :]) & ~torch.eye(len(prompts), dtype=torch.bool, device=x.device)
        dist = torch.cdist(x, x) / math.sqrt(x.shape[1])
        count = same.sum(1)
        total = (dist * same).sum(1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
