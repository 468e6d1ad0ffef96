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


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype, its name (``"float16"``, ``"torch.bfloat16"``, ``"fp16"``) or None
    (reward factories take dtypes from JSON ``reward_kwargs``, where they are strings)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    name = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype (e.g. 'float16', 'bfloat16', 'float32')")
    return value
