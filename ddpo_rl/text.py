"""Prompt encoding: tokenizer + frozen text encoder -> prompt embeddings c; a bounded cache of them."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import torch
from torch import nn


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden state [B, L, D] of ``text_encoder`` on ``prompts`` padded to the tokenizer's
    ``model_max_length`` (Stable Diffusion's conditioning; "" gives the unconditional embedding)."""
    return text_encoder(token_ids(tokenizer, prompts, next(text_encoder.parameters()).device))[0]


def token_ids(tokenizer, prompts: Sequence[str], device=None) -> torch.Tensor:
    """Token ids [B, L] of ``prompts`` padded (and truncated, with a warning) to the tokenizer's
    ``model_max_length``."""
    warn_truncated_prompts(tokenizer, prompts)
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


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


@torch.no_grad()
def encode_prompts_pooled(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3-style conditioning from one ``CLIPTextModelWithProjection``: its ``last_hidden_state``
    [B, L, D] (the token sequence) and ``text_embeds`` [B, P] (the pooled, projected vector), on
    ``prompts`` padded to the tokenizer's ``model_max_length``."""
    out = text_encoder(token_ids(tokenizer, prompts, next(text_encoder.parameters()).device))
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


def as_condition(encoded) -> dict:
    """An encoder's output as ``{key: tensor [N, ...]}``: a tensor is ``{KEYS.prompt_embeds: it}``; a
    mapping (e.g. SD3's ``{prompt_embeds, pooled_prompt_embeds}``) is taken as it is."""
    from ddpo_rl.keys import KEYS

    if isinstance(encoded, torch.Tensor):
        return {KEYS.prompt_embeds: encoded}
    if isinstance(encoded, Mapping):
        if KEYS.prompt_embeds not in encoded:
            raise ValueError(f"the prompt encoder returned keys {list(encoded)}; expected {KEYS.prompt_embeds!r} among them")
        return dict(encoded)
    raise TypeError(f"the prompt encoder returned {type(encoded).__name__}; expected a tensor or a mapping of tensors")


class PromptEmbeddingCache:
    """Prompt embeddings encoded on demand, in batches, kept in a bounded LRU cache.

    Large prompt sets (tens of thousands of prompts) cannot be encoded up front: SD3's T5
    embeddings are 333 x 4096 x 2 bytes = 2.7 MB per prompt, ~68 GB for 25k prompts. The env asks
    for the embeddings of the prompts it draws at each reset; prompts not in the cache are encoded
    ``batch_size`` at a time, and the least recently used entries beyond ``capacity`` are dropped,
    so memory is bounded by ``capacity`` prompts whatever the size of the prompt set.

    Args:
        encode: ``list[str] -> Tensor [N, ...]`` or ``-> {key: Tensor [N, ...]}`` (a frozen encoder).
        capacity: the most prompts kept (>= 1). A batch needing more distinct prompts than this is
            still served (its rows are returned before eviction); they are just not all kept.
        batch_size: prompts per call to ``encode``.
        device: where the cached embeddings live (default: where the encoder put them).
    """

    def __init__(self, encode: Callable, capacity: int = 1024, batch_size: int = 64, device=None):
        if capacity < 1:
            raise ValueError(f"prompt_cache_size: {capacity} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"prompt encoding batch_size={batch_size} must be >= 1")
        self.encode = encode
        self.capacity = int(capacity)
        self.batch_size = int(batch_size)
        self.device = device
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached embeddings."""
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in e.values())

    @torch.no_grad()
    def _encode_missing(self, prompts: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            cond = as_condition(self.encode(chunk))
            for i, p in enumerate(chunk):
                # clone: a row view would keep the whole batch's storage alive
                out[p] = {k: v[i].detach().to(self.device).clone() for k, v in cond.items()}
        return out

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The embeddings of ``prompts`` stacked in order: ``{key: Tensor [len(prompts), ...]}``."""
        prompts = list(prompts)
        unique = list(dict.fromkeys(prompts))
        missing = [p for p in unique if p not in self._entries]
        self.misses += len(missing)
        self.hits += len(unique) - len(missing)
        rows = {p: self._entries[p] for p in unique if p in self._entries}
        rows.update(self._encode_missing(missing))
        for p in unique:  # most recently used last
            self._entries[p] = rows[p]
            self._entries.move_to_end(p)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        keys = rows[unique[0]].keys()
        return {k: torch.stack([rows[p][k] for p in prompts]) for k in keys}

    def clear(self) -> None:
        self._entries.clear()
