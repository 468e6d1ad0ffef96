"""Prompt encoding: tokenizer + frozen text encoder -> prompt embeddings c."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden state [B, L, D] of ``text_encoder`` on ``prompts`` padded to the tokenizer's
    ``model_max_length`` (Stable Diffusion's conditioning; "" gives the unconditional embedding)."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


@torch.no_grad()
def encode_prompts_pooled(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3-style conditioning from one ``CLIPTextModelWithProjection``: its ``last_hidden_state``
    [B, L, D] (the token sequence) and ``text_embeds`` [B, P] (the pooled, projected vector), on
    ``prompts`` padded to the tokenizer's ``model_max_length``."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    out = text_encoder(ids)
    return out.last_hidden_state, out.text_embeds


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
