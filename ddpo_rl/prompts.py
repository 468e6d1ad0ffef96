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
        try:
            with open(path, encoding="utf-8") as f:
                prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except UnicodeDecodeError as err:
            raise ValueError(
                f"prompt file {path!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): "
                "save it as UTF-8"
            ) from None
        if not prompts:
            raise ValueError(f"prompt file {path!r} holds no prompts: write one prompt per line")
        return cls(prompts, name=os.path.basename(path))


from ddpo_rl.models.digits import PROMPT_TEMPLATE as DIGIT_PROMPT  # noqa: E402  (one template for model and prompts)


def resolve_prompts(spec: str, field: str = "prompts") -> PromptSource:
    """A prompt source from a spec string.

    - ``"digits:A-B"``: "a handwritten digit N" for N in A..B (the embedded digits model);
    - a prompt-set name shipped with ddpo_rl (``simple_animals``, ``imagenet_animals``,
      ``animal_activities``; see :mod:`ddpo_rl.prompt_sets`);
    - a path to a text file, one prompt per line.

    ``field`` (the config field the spec came from) starts every error message.
    """
    spec = os.path.expanduser(spec)
    if spec.startswith("digits:"):
        body = spec.split(":", 1)[1]
        try:
            lo, hi = (int(x) for x in body.split("-")) if "-" in body else (int(body), int(body))
        except ValueError:
            raise ValueError(f"{field}: cannot read {spec!r}; write digits:A-B with 0 <= A <= B <= 9") from None
        if not 0 <= lo <= hi <= 9:
            raise ValueError(f"{field}: {spec!r} is out of range; write digits:A-B with 0 <= A <= B <= 9")
        return PromptSource([DIGIT_PROMPT.format(n) for n in range(lo, hi + 1)], name=spec)
    if os.path.isfile(spec) or os.sep in spec or spec.endswith(".txt"):
        try:
            return PromptSource.from_file(spec)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{field}: {err}") from None
    from ddpo_rl.prompt_sets import load_prompt_set

    try:
        return PromptSource(load_prompt_set(spec), name=spec)
    except KeyError as err:  # an unknown set name
        raise ValueError(f"{field}: {err.args[0]}") from None
