"""The action distribution of a denoising step: an isotropic Gaussian whose log-prob is reduced
over the latent dims with ONE documented choice (see :mod:`ddpo_rl.ddim`).

torchrl's ``IndependentNormal(event_dim=3)`` sums the log-density over C, H, W; DDPO's
reference implementation averages it, and the paper's clip range (1e-4) assumes the
average. :class:`DDIMGaussian` is what every ddpo_rl actor uses, so the log-probs stored at
collection and recomputed by every loss are the same quantity.
"""

from __future__ import annotations

import torch
from torch.distributions import Normal

from ddpo_rl.ddim import LOG_PROB_REDUCTIONS, gaussian_log_prob


class DDIMGaussian(Normal):
    """N(loc, scale^2) over a latent of ``event_dim`` trailing dims, log-prob reduced by ``reduction``.

    Args:
        loc: the DDIM mean [B, *latent].
        scale: sigma_t, broadcastable to ``loc`` (e.g. [B, 1, 1, 1]).
        event_dim: number of trailing latent dims (3 for [C, H, W] images, 1 for action vectors).
        reduction: "mean" (the paper's choice, default) or "sum" (the joint log-density).
        point_mass_log_prob: where ``scale`` is 0 (a deterministic step: the flow policy's ODE steps
            outside its SDE window), write this log-prob instead of the NaN of a zero-std density
            (None: no such steps expected, nothing checked). Such steps are never trained on.
    """

    arg_constraints = {}  # scale may be broadcast; validated where it is built (ddim.check_log_prob_defined)

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        event_dim: int = 3,
        reduction: str = "mean",
        point_mass_log_prob: float | None = None,
    ):
        if reduction not in LOG_PROB_REDUCTIONS:
            raise ValueError(f"reduction must be one of {LOG_PROB_REDUCTIONS}, got {reduction!r}")
        super().__init__(loc, scale, validate_args=False)
        self.event_dim = event_dim
        self.reduction = reduction
        self.point_mass_log_prob = point_mass_log_prob

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lp = gaussian_log_prob(value, self.loc, self.scale, self.event_dim, self.reduction)
        if self.point_mass_log_prob is None:
            return lp
        deterministic = (self.scale == 0).expand_as(self.loc).flatten(-self.event_dim).all(-1)
        return torch.where(deterministic, torch.full_like(lp, self.point_mass_log_prob), lp)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        """The mean: what torchrl returns under ExplorationType.DETERMINISTIC/MEAN."""
        return self.loc

    @property
    def mode(self) -> torch.Tensor:
        return self.loc
