"""Advantages for DDPO: per-prompt (or GRPO group-relative) reward normalisation, then clipping.

DDPO has no critic. The advantage of a trajectory is its terminal reward standardised
against other samples of the SAME prompt (Black et al. 2024, appendix; the reference
implementation's per-prompt stat tracker)::

    A_i = clip((r_i - mean_p) / (std_p + 1e-6), -A_max, A_max)

where (mean_p, std_p) are the statistics of the last ``buffer_size`` rewards seen for prompt
p, or of the whole batch while p has fewer than ``min_count`` of them. The same A_i is used
at every one of the trajectory's T steps.

Samples whose reward is NaN (a reward that was dropped, see ddpo_rl.rewards.transform) get
advantage 0 and are left out of every statistic.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Sequence

import torch

EPS = 1e-6


class PerPromptStatTracker:
    """Running reward statistics per prompt.

    Args:
        buffer_size: how many recent rewards to keep per prompt (16 in the paper).
        min_count: below this many rewards for a prompt, fall back to the batch statistics (16).
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if buffer_size <= 0 or min_count <= 0:
            raise ValueError(f"buffer_size={buffer_size} and min_count={min_count} must be positive")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers: dict[Hashable, deque] = {}

    def update(self, prompts: Sequence[Hashable], rewards: torch.Tensor) -> torch.Tensor:
        """Add a batch of rewards and return their normalised advantages (unclipped), same shape as ``rewards``.

        ``prompts`` are any hashable keys (prompt strings, or prompt ids); one per reward.
        Runs once per epoch on the host (it needs the rewards there anyway).
        """
        r = rewards.detach().reshape(-1).double().cpu()
        if len(prompts) != r.numel():
            raise ValueError(f"{len(prompts)} prompts for {r.numel()} rewards")
        finite = torch.isfinite(r)
        if finite.sum() >= 2:
            batch_mean, batch_std = r[finite].mean(), r[finite].std(unbiased=False)
        else:
            batch_mean, batch_std = torch.tensor(0.0, dtype=torch.double), torch.tensor(1.0, dtype=torch.double)
        adv = torch.zeros_like(r)
        groups: dict[Hashable, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        for p, idx in groups.items():
            idx_t = torch.tensor(idx)
            vals = r[idx_t]
            buf = self.buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(vals[torch.isfinite(vals)].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=torch.double)
                mean, std = hist.mean(), hist.std(unbiased=False)
            adv[idx_t] = (vals - mean) / (std + EPS)
        adv = torch.where(finite, adv, torch.zeros_like(adv))
        return adv.to(dtype=rewards.dtype, device=rewards.device).reshape(rewards.shape)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {k: list(v) for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def batch_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Whole-batch normalisation (no per-prompt statistics); NaN rewards get 0."""
    finite = torch.isfinite(rewards)
    vals = rewards[finite]
    adv = (rewards - vals.mean()) / (vals.std(unbiased=False) + EPS)
    return torch.where(finite, adv, torch.zeros_like(adv))


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-relative advantages (GRPO; Flow-GRPO sec. 4.1): each reward standardised within its group.

    The rewards come in consecutive groups of ``group_size`` samples of one prompt (the env's
    ``group_size`` prompt order puts them there, and each rank's batch holds whole groups, so the
    all-gathered batch does too)::

        A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-6)

    with the population std, as every statistic of this module. Samples whose reward is NaN get
    advantage 0 and are left out of their group's statistics; a group with one finite reward gives 0.
    On the rewards' device, no host sync.

    Why not torchrl's ``MCAdvantage`` (torchrl.objectives.llm): it is a replay-buffer write
    transform built for LLM trajectories. Given a DDPO batch [N, T] it returns the trajectories
    flattened to [N * T] and regrouped by group id (checked with torchrl 0.14.1), where
    DDPOTrainer needs the [N, T] layout in the collection order (it shuffles trajectories and
    their steps, and each rank takes back its own slice of the gathered advantages); it copies
    every key of the trajectories (the latents) to compute a scalar per trajectory; it keeps
    incomplete groups queued across calls; it uses the Bessel-corrected std and has no notion of
    a dropped (NaN) reward. Here the advantage is a function of the [N] terminal rewards only.
    """
    group_size = int(group_size)
    n = rewards.numel()
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size: {n} rewards do not split into groups of {group_size} (it must divide the batch)")
    r = rewards.detach().reshape(-1, group_size).double()
    finite = torch.isfinite(r)
    count = finite.sum(1, keepdim=True).clamp(min=1)
    mean = torch.where(finite, r, torch.zeros_like(r)).sum(1, keepdim=True) / count
    var = torch.where(finite, (r - mean) ** 2, torch.zeros_like(r)).sum(1, keepdim=True) / count
    adv = torch.where(finite, (r - mean) / (var.sqrt() + EPS), torch.zeros_like(r))
    return adv.to(rewards.dtype).reshape(rewards.shape)


def compute_advantages(
    rewards: torch.Tensor,
    prompts: Sequence[Hashable] | None = None,
    tracker: PerPromptStatTracker | None = None,
    clip: float | None = 5.0,
    group_size: int | None = None,
) -> torch.Tensor:
    """Advantages [B] from terminal rewards [B]: group-relative, per-prompt (with a tracker) or batch
    normalised, then clipped.

    Args:
        rewards: terminal rewards, one per trajectory.
        prompts: the prompt (or prompt id) of each trajectory; required with ``tracker``.
        tracker: a :class:`PerPromptStatTracker`, or None for batch statistics.
        clip: A_max of the advantage clipping (5 in the paper); None disables it.
        group_size: G > 1: GRPO's group-relative advantages over consecutive groups of G
            (:func:`group_advantages`), used instead of the tracker; None, 0 or 1: off.
    """
    if group_size is not None and group_size > 1:
        adv = group_advantages(rewards, group_size)
    elif tracker is not None:
        if prompts is None:
            raise ValueError("per-prompt advantages need the prompt of each reward")
        adv = tracker.update(prompts, rewards)
    else:
        adv = batch_advantages(rewards)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"advantage clip={clip} must be positive (or None to disable)")
        adv = adv.clamp(-clip, clip)
    return adv
