"""What a regularised fine-tuning objective can reach, estimated from the base model's own samples.

Before a run: draw N samples of the base model per prompt, score them with the training reward R and
a monitor M (e.g. the digit classifier), and ask two questions without training anything.

1. Where does the optimum of the KL-regularised objective lie? For a reward of the final image, the
   policy over denoising chains that maximises ``E[R] - beta * KL(pi || pi_ref)`` is the reference
   re-weighted by ``exp(R / beta)``; its images follow ``p_ref(x | c) exp(R(x, c) / beta) / Z(c)``.
   :func:`tilt` estimates its reward and monitor means by self-normalised importance weights per
   prompt, with the effective sample size that says how far the estimate can be trusted.
2. What is the best ANY re-weighting of the base samples can do? Every objective whose divergence to
   the reference grows without bound with the density ratio pi / pi_ref (the KL at every coefficient,
   chi^2), and one round of fine-tuning on the base model's filtered or re-weighted samples
   (best-of-n, RWR's target), ends at a re-weighting of the reference with a bounded density ratio
   (a ratio <= K everywhere means KL <= log K). :func:`reweighting_bound` solves the linear programme:
   the largest mean reward with the mean monitor kept >= a floor, each weight at most K x the
   reference's. If it falls short of a target, no such objective reaches the target: the policy must
   move far from the base distribution (docs/results/digits_search.md, "Eighth session").

Notation (per prompt group g with n_g samples, G groups weighted equally, as the evaluation does)::

    w_i       weight of sample i, sum_{i in g} w_i = 1 / G
    R_i, M_i  reward and monitor of sample i
    tilt:     w_i = softmax_{i in g}(R_i / (beta * s_g)) / G      (s_g: 1, or the group's reward std)
    bound:    max sum_i w_i R_i  s.t.  sum_i w_i M_i >= floor,  0 <= w_i <= K / (G n_g)

Both functions return plain floats (analysis, not the training loop).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["TiltEstimate", "tilt", "reweighting_bound"]


class TiltEstimate(NamedTuple):
    """The tilted base samples' means (equally weighted groups) and how many samples carry them."""

    reward: float
    """Tilted mean reward."""
    monitor: float
    """Tilted mean monitor."""
    min_ess: float
    """Smallest effective sample size over the groups, 1 / sum w^2 (a few units: little to trust)."""


def _check(reward: torch.Tensor, monitor: torch.Tensor, groups: torch.Tensor) -> None:
    if reward.dim() != 1 or reward.shape != monitor.shape or reward.shape != groups.shape:
        raise ValueError(
            f"reward, monitor and groups must be 1-D of one length, got {tuple(reward.shape)}, "
            f"{tuple(monitor.shape)}, {tuple(groups.shape)}"
        )
    if reward.numel() == 0:
        raise ValueError("reward: no samples")
    if not (torch.isfinite(reward).all() and torch.isfinite(monitor).all()):
        raise ValueError("reward, monitor: every value must be finite")


def tilt(
    reward: torch.Tensor,
    monitor: torch.Tensor,
    groups: torch.Tensor,
    beta: float,
    scale: torch.Tensor | None = None,
) -> TiltEstimate:
    """The base samples re-weighted by exp(R / (beta * scale)) within each group.

    Args:
        reward, monitor: [N] per-sample values.
        groups: [N] integer prompt ids; each id present is one group, groups weighted equally.
        beta: the KL coefficient in the reward's units (``math.inf``: no tilt, the base means).
        scale: per group id (indexed by the id), the unit of beta (e.g. each prompt's reward std when
            the reward is standardised per prompt); None: 1.

    Returns:
        :class:`TiltEstimate` (tilted mean reward, tilted mean monitor, smallest ESS = 1 / sum w^2).
    """
    _check(reward, monitor, groups)
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (math.inf for no tilt), got {beta}")
    rewards, monitors, ess = [], [], []
    for g in groups.unique():
        m = groups == g
        r, p = reward[m].double(), monitor[m].double()
        unit = 1.0 if scale is None else float(scale[g])
        logw = torch.zeros_like(r) if math.isinf(beta) else r / (beta * unit)
        w = torch.softmax(logw, 0)
        rewards.append((w * r).sum())
        monitors.append((w * p).sum())
        ess.append(1.0 / (w**2).sum())
    return TiltEstimate(
        torch.stack(rewards).mean().item(), torch.stack(monitors).mean().item(), min(e.item() for e in ess)
    )


def reweighting_bound(
    reward: torch.Tensor,
    monitor: torch.Tensor,
    groups: torch.Tensor,
    min_monitor: float,
    density_bound: float | None = None,
) -> tuple[float, float] | None:
    """The largest mean reward over re-weightings of the samples whose mean monitor is >= ``min_monitor``.

    Each group keeps its share 1/G of the weight; every weight is >= 0 and, with ``density_bound`` K,
    at most K x its group's uniform weight (a density ratio <= K). Solved exactly (scipy's HiGHS).

    Returns:
        (mean reward, mean monitor) at the optimum, or None when no re-weighting keeps the monitor.
    """
    from scipy.optimize import linprog

    _check(reward, monitor, groups)
    if density_bound is not None and not density_bound >= 1:
        raise ValueError(f"density_bound must be >= 1 (1 = the base weights only) or None, got {density_bound}")
    r, p = reward.double().numpy(), monitor.double().numpy()
    present = groups.unique()
    n_groups = len(present)
    member = torch.stack([(groups == g).double() for g in present]).numpy()  # [G, N]
    counts = member.sum(1)
    if density_bound is None:
        bounds = [(0.0, None)] * len(r)
    else:
        index = torch.searchsorted(present, groups.contiguous()).numpy()  # each sample's group position
        bounds = [(0.0, float(c)) for c in density_bound / (n_groups * counts[index])]
    sol = linprog(
        -r, A_ub=-p[None], b_ub=[-min_monitor], A_eq=member, b_eq=[1.0 / n_groups] * n_groups,
        bounds=bounds, method="highs",
    )
    if sol.status == 2:  # infeasible: no re-weighting keeps the monitor
        return None
    if sol.status != 0:
        raise RuntimeError(f"reweighting_bound: the linear programme did not solve ({sol.message})")
    return float(sol.x @ r), float(sol.x @ p)
