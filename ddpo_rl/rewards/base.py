"""What a reward function is.

A reward function is any callable ``fn(images, prompts) -> rewards``:

- ``images``: float tensor [B, 3, H, W] with values in [0, 1] (decoded samples);
- ``prompts``: a list of B prompt strings (the prompt each image was generated from);
- returns a float tensor [B] (any device; the reward transform moves it).

Plain functions qualify. Reward models (aesthetic predictor, VLM judges) are nn.Modules or
objects that choose their own device and batch internally.

A reward that reads its prompts and cannot score some (the digit rewards need a digit in each
prompt) may also define ``check_prompts(prompts)``, raising ValueError for the first prompt it
cannot score; recipes call it through :func:`check_prompts` with the inputs, before any model is
loaded or any file written.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def check_prompts(reward_fn, prompts: Sequence[str]) -> None:
    """ValueError if ``reward_fn`` cannot score images of some of ``prompts`` (its ``check_prompts``
    hook, see the module docstring); a reward without the hook accepts every prompt."""
    hook = getattr(reward_fn, "check_prompts", None)
    if callable(hook):
        hook(list(prompts))
