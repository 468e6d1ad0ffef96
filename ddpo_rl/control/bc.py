"""Behaviour cloning of a diffusion policy: the usual denoising loss on (observation, action) pairs.

    t ~ U{0, ..., N-1},  eps ~ N(0, I),  x_t = sqrt(alpha_bar_t) a + sqrt(1 - alpha_bar_t) eps
    L_BC = E || eps_theta(x_t, t, s) - eps ||^2          (Ho et al. 2020, Chi et al. 2023)

with ``a`` the demonstrated action normalised to [-1, 1]. This is pretraining; RL fine-tuning
(DPPO) then starts from the cloned policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import torch
from torch import nn


def denoising_loss(
    noise_model: nn.Module,
    alphas_cumprod: torch.Tensor,
    observation: torch.Tensor,
    action: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The epsilon-prediction loss on a batch of normalised actions [B, A] given observations [B, O]."""
    n = action.shape[0]
    t = torch.randint(0, alphas_cumprod.shape[0], (n,), generator=generator, device=action.device)
    eps = torch.randn(action.shape, generator=generator, device=action.device)
    ab = alphas_cumprod.to(action.device)[t].unsqueeze(-1)
    x_t = ab.sqrt() * action + (1 - ab).sqrt() * eps
    return nn.functional.mse_loss(noise_model(x_t, t, encoder_hidden_states=observation), eps)


@dataclass
class BCConfig:
    """Behaviour-cloning settings."""

    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 256
    """(observation, action) pairs per step."""
    lr: float = 1e-3
    """AdamW learning rate (cosine-decayed to 10% over the steps)."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""


def fit_behaviour_cloning(
    noise_model: nn.Module,
    scheduler,
    observations: torch.Tensor,
    actions: torch.Tensor,
    config: BCConfig = BCConfig(),
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Train ``noise_model`` on demonstrations; returns the per-step losses [steps] (one host sync, at the end).

    Args:
        noise_model: eps_theta, called as ``model(x_t, t, encoder_hidden_states=obs)``.
        scheduler: the diffusers scheduler whose ``alphas_cumprod`` defines the forward process.
        observations: [N, O].
        actions: normalised actions [N, A] in [-1, 1].
        on_step: called with the number of steps done after each step (a progress bar; host-side, it
            reads no tensor).
    """
    if observations.shape[0] != actions.shape[0]:
        raise ValueError(f"{observations.shape[0]} observations but {actions.shape[0]} actions")
    if config.steps <= 0:
        return torch.zeros(0)
    ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
    opt = torch.optim.AdamW(noise_model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps, eta_min=config.lr * 0.1)
    losses = torch.empty(config.steps, device=actions.device)
    n = observations.shape[0]
    noise_model.train()
    for i in range(config.steps):
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        loss = denoising_loss(noise_model, ac, observations[idx], actions[idx], generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses[i] = loss.detach()
        if on_step is not None:
            on_step(i + 1)
    return losses
