"""Small networks for diffusion policies over action vectors.

:class:`NoisePredictionMLP` is the noise model eps_theta(x_t, t, s) of a diffusion policy for
continuous control: x_t is a noisy (normalised) action [B, A], t the scheduler's training
timestep [B], s the observation [B, O]. It is called exactly as a diffusers UNet is,
``model(sample, timestep, encoder_hidden_states=observation)``, so it plugs into
:class:`ddpo_rl.policy.DiffusionPolicy` (with ``event_dim=1``) unchanged.

:class:`ObservationScaler` maps raw observations to roughly [-1, 1] from the env's bounds; the
noise model and the value critic share it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ObservationScaler(nn.Module):
    """(obs - loc) / scale with fixed buffers, e.g. from a Box's bounds (see :meth:`from_bounds`)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        loc, scale = torch.as_tensor(loc, dtype=torch.float32), torch.as_tensor(scale, dtype=torch.float32)
        if loc.shape != scale.shape or loc.dim() != 1:
            raise ValueError(f"loc {tuple(loc.shape)} and scale {tuple(scale.shape)} must be equal 1-D shapes")
        if not bool((scale > 0).all()):
            raise ValueError("every observation scale must be positive")
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    @classmethod
    def from_bounds(cls, low, high, fallback_scale: float = 1.0) -> ObservationScaler:
        """Centre and half-width of finite bounds; infinite bounds get loc 0, scale ``fallback_scale``."""
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        finite = torch.isfinite(low) & torch.isfinite(high) & (high > low)
        loc = torch.where(finite, (high + low) / 2, torch.zeros_like(low))
        scale = torch.where(finite, (high - low) / 2, torch.full_like(low, fallback_scale))
        return cls(loc, scale)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.loc) / self.scale


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer (or real) timesteps [B] -> [B, dim] (Vaswani et al. 2017)."""
    if dim % 2:
        raise ValueError(f"timestep embedding dim={dim} must be even")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    args = timestep.float().unsqueeze(-1) * freqs
    return torch.cat([args.sin(), args.cos()], dim=-1)


class NoisePredictionMLP(nn.Module):
    """eps_theta(x_t, t, s): an MLP on [x_t, embed(t), scale(s)].

    Args:
        action_dim: A, size of the (normalised) action vector.
        observation_dim: O, size of the observation vector.
        hidden_dim: width of the hidden layers.
        num_layers: number of hidden layers (>= 1).
        time_embed_dim: size of the sinusoidal timestep embedding (even), passed through a
            small MLP before concatenation.
        observation_scaler: optional :class:`ObservationScaler` applied to s first.
    """

    def __init__(
        self,
        action_dim: int,
        observation_dim: int,
        hidden_dim: int = 128,
        num_layers: int = 3,
        time_embed_dim: int = 32,
        observation_scaler: ObservationScaler | None = None,
    ):
        super().__init__()
        if action_dim <= 0 or observation_dim <= 0:
            raise ValueError(f"action_dim={action_dim} and observation_dim={observation_dim} must be positive")
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        self.action_dim, self.observation_dim, self.time_embed_dim = action_dim, observation_dim, time_embed_dim
        self.observation_scaler = observation_scaler if observation_scaler is not None else nn.Identity()
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, time_embed_dim * 2), nn.Mish(), nn.Linear(time_embed_dim * 2, time_embed_dim)
        )
        layers: list[nn.Module] = []
        width = action_dim + time_embed_dim + observation_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.Mish()]
            width = hidden_dim
        layers.append(nn.Linear(width, action_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """sample [B, A], timestep [B] (or 0-dim), encoder_hidden_states = observation [B, O] -> eps [B, A]."""
        if sample.shape[-1] != self.action_dim or encoder_hidden_states.shape[-1] != self.observation_dim:
            raise ValueError(
                f"expected sample [..., {self.action_dim}] and observation [..., {self.observation_dim}], got "
                f"{tuple(sample.shape)} and {tuple(encoder_hidden_states.shape)}"
            )
        if timestep.dim() == 0:
            timestep = timestep.expand(sample.shape[:-1])
        t = self.time_mlp(timestep_embedding(timestep, self.time_embed_dim))
        s = self.observation_scaler(encoder_hidden_states.float())
        return self.net(torch.cat([sample.float(), t, s], dim=-1))


def make_value_mlp(
    observation_dim: int,
    hidden_dim: int = 64,
    num_layers: int = 2,
    observation_scaler: ObservationScaler | None = None,
) -> nn.Module:
    """V(s): an MLP from (scaled) observations to one value, for a torchrl ``ValueOperator``."""
    layers: list[nn.Module] = [observation_scaler if observation_scaler is not None else nn.Identity()]
    width = observation_dim
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden_dim), nn.Tanh()]
        width = hidden_dim
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)
