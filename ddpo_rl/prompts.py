"""Prompt sources: where the env's prompts come from.

A :class:`PromptSource` is a finite list of prompts sampled uniformly by index. Indices (not
strings) travel in the TensorDict (``KEYS.prompt_id``), so drawing prompts never leaves the
device; the strings are looked up once per batch, when the reward needs them.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch


class PromptSource:
    """A finite set of prompts, sampled uniformly with replacement.

    Args:
        prompts: the prompt strings (at least one; duplicates are allowed and weight sampling).
        name: a label for logs.
    """

    def __init__(self, prompts: Iterable[str], name: str = "prompts"):
        self.prompts: list[str] = [str(p) for p in prompts]
        self.name = name
        if not self.prompts:
            raise ValueError(f"prompt source {name!r} is empty: give at least one prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``n`` prompt indices, int64 [n], drawn on ``generator``'s device then moved to ``device``."""
        gen_device = generator.device if generator is not None else "cpu"
        ids = torch.randint(len(self.prompts), (n,), generator=generator, device=gen_device)
        return ids.to(device) if device is not None else ids

    def lookup(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """Prompt strings for indices (one host transfer for a tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return [self.prompts[i] for i in ids]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PromptSource:
        """One prompt per line; blank lines and lines starting with '#' are skipped."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path!r} does not exist: give a text file with one prompt per line")
        with open(path, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"prompt file {path!r} holds no prompts: write one prompt per line")
        return cls(prompts, name=os.path.basename(path))
