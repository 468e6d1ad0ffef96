"""What a reward function is.

A reward function is any callable ``fn(images, prompts) -> rewards``:

- ``images``: float tensor [B, 3, H, W] with values in [0, 1] (decoded samples);
- ``prompts``: a list of B prompt strings (the prompt each image was generated from);
- returns a float tensor [B] (any device; the reward transform moves it).

Plain functions qualify. Reward models (aesthetic predictor, VLM judges) are nn.Modules or
objects that choose their own device and batch internally.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...
