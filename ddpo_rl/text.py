"""Prompt encoding: tokenizer + frozen text encoder -> prompt embeddings c."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden state [B, L, D] of ``text_encoder`` on ``prompts`` padded to the tokenizer's
    ``model_max_length`` (Stable Diffusion's conditioning; "" gives the unconditional embedding)."""
    device = next(text_encoder.parameters()).device
    warn_truncated_prompts(tokenizer, prompts)
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def warn_truncated_prompts(tokenizer, prompts: Sequence[str]) -> None:
    """Warn (once per prompt) when a prompt has more tokens than the text encoder reads.

    The encoder sees the first ``model_max_length`` tokens (77 for CLIP, start and end tokens
    included); the rest of the prompt has no effect on the images.
    """
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids]
    for prompt, n in zip(prompts, lengths):
        if n > limit:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            warnings.warn(
                f"prompt {shown!r} has {n} tokens; the text encoder keeps the first {limit} "
                f"(start and end tokens included) and ignores the other {n - limit}",
                stacklevel=3,
            )


class PromptEncoder(nn.Module):
    """Encode prompts with a (frozen) CLIP-style text encoder, as Stable Diffusion does.

    Returns the last hidden state [B, L, D] of ``text_encoder`` on the prompts padded to the
    tokenizer's ``model_max_length``. The encoder is frozen (DDPO fine-tunes the UNet only).

    Args:
        tokenizer: a transformers tokenizer (e.g. CLIPTokenizer).
        text_encoder: e.g. transformers CLIPTextModel.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

    def negative_embeds(self, negative_prompt: str = "") -> torch.Tensor:
        """The unconditional embedding for classifier-free guidance: [1, L, D]."""
        return self([negative_prompt])
