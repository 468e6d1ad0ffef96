"""Weight interpolation towards the reference model: what a run evaluates and saves.

    theta_lambda = theta_ref + lambda * (theta - theta_ref),      0 < lambda <= 1

Notation (WiSE-FT, Wortsman et al. 2022; LITI, "linear interpolation towards initialisation", in
WARP, Ramé et al. 2024):

- ``theta``: the trained weights (what the optimizer updates; checkpoints hold these).
- ``theta_ref``: the reference model, the same one the KL term uses (:mod:`ddpo_rl.objectives.kl`):
  the weights before fine-tuning, or, with LoRA, the network with its adapters disabled.
- ``lambda`` (``DDPOConfig.reference_interpolation``): 1 = the trained weights (off), 0 = the
  reference.

Fine-tuning moves the weights along a path on which reward rises and what the reward does not see
(here: whether the samples still show the prompted digit) falls. Interpolating the end of that path
back towards its start trades some of the reward for the model's other qualities at a better rate
than stopping earlier on the path does (WARP's observation for RLHF; measured for the digits preset
in docs/results/digits_interpolation.md). Training is unchanged: the optimizer keeps updating
``theta``; every evaluation, the sample grids, final/ and best/ see ``theta_lambda``.

How each trainable parameter is interpolated:

1. a full fine-tune: ``p <- p_ref + lambda (p - p_ref)``, ``p_ref`` a copy taken when the
   interpolation is built (build it before a resume loads weights, like the KL's reference). It
   costs one copy of the trainable parameters, plus a second one while the interpolated weights are
   in place (to put the trained ones back bit for bit).
2. LoRA (peft): the adapter's update ``s B A`` is scaled, ``B <- lambda B`` (its reference, adapters
   disabled, is ``B = 0``), ``A`` unchanged, so the adapted weight is ``W0 + lambda s B A`` exactly.
   No reference copy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def is_lora_b(name: str) -> bool:
    """A peft LoRA ``B`` matrix (``...lora_B.<adapter>.weight``): the factor the update is scaled through."""
    return ".lora_B." in f".{name}"


def is_lora_a(name: str) -> bool:
    """A peft LoRA ``A`` matrix: left as it is (scaling ``B`` scales the update once)."""
    return ".lora_A." in f".{name}"


def check_coef(coef: float) -> float:
    """``coef`` as a float; ValueError naming ``reference_interpolation`` unless it is in (0, 1]."""
    if not 0.0 < coef <= 1.0:
        raise ValueError(f"reference_interpolation: must be in (0, 1], got {coef}")
    return float(coef)


class ReferenceInterpolation:
    """Swap in ``theta_ref + lambda (theta - theta_ref)`` for the trainable parameters of ``network``.

    Args:
        network: the noise (or velocity) network being fine-tuned.
        coef: lambda, in (0, 1]. 1 makes :meth:`applied` a no-op and copies nothing.

    ``with interpolation.applied(): ...`` runs the block with the interpolated weights and puts the
    trained weights back afterwards, bit for bit (also when the block raises). The parameters are
    changed in place, so a CUDA graph captured on them replays the interpolated network.
    """

    def __init__(self, network: nn.Module, coef: float):
        self.coef = check_coef(coef)
        # (parameter, its reference value, or None for a LoRA B matrix whose reference is 0)
        self._entries: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if self.coef == 1.0:
            return
        with torch.no_grad():
            for name, p in network.named_parameters():
                if not p.requires_grad or is_lora_a(name):
                    continue
                self._entries.append((p, None if is_lora_b(name) else p.detach().clone()))

    @property
    def active(self) -> bool:
        """Whether anything is interpolated (lambda < 1 and some parameter is trainable)."""
        return bool(self._entries)

    def memory_bytes(self) -> int:
        """Bytes of the reference copies (a full fine-tune's trainable parameters; 0 with LoRA or lambda 1)."""
        return sum(r.numel() * r.element_size() for _, r in self._entries if r is not None)

    @contextlib.contextmanager
    def applied(self, coef: float | None = None):
        """The interpolated weights inside the block; the trained ones, exactly, after it. ``coef``:
        another lambda than the one built with (recipes/interpolate.py measures several on one run;
        the references exist only when the interpolation was built with a lambda < 1)."""
        coef = self.coef if coef is None else check_coef(coef)
        if coef < 1.0 and self.coef == 1.0:
            raise ValueError("reference_interpolation: built with lambda 1, no reference values were kept")
        if coef == 1.0 or not self._entries:  # the trained weights, or nothing trainable
            yield self
            return
        with torch.no_grad():
            trained = [p.detach().clone() for p, _ in self._entries]
            for p, ref in self._entries:
                if ref is None:
                    p.mul_(coef)
                else:
                    p.lerp_(ref, 1.0 - coef)  # p + (1 - lambda)(p_ref - p) = p_ref + lambda (p - p_ref)
        try:
            yield self
        finally:
            with torch.no_grad():
                for (p, _), value in zip(self._entries, trained):
                    p.copy_(value)
