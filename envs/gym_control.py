"""Gymnasium continuous-control tasks through torchrl, and scripted demonstrators for them.

- :func:`make_control_env`: a gymnasium ``SyncVectorEnv`` of N copies (in-process: torchrl's
  ``GymEnv(name, num_envs=N)`` builds an ``AsyncVectorEnv``, N subprocesses, too many for a
  2-core machine) with ``autoreset_mode=DISABLED`` (torchrl resets finished copies itself and
  keeps the true final observation in ``("next", "observation")``), wrapped by torchrl's
  ``GymWrapper``, with a ``RewardSum`` transform: ``("next", "episode_reward")`` holds each
  episode's running return.
- Demonstrators: hand-written controllers, used as experts for behaviour cloning
  (no PPO-trained Gaussian expert: PPO needs ~1e5-1e6 Pendulum steps, minutes to tens of minutes
  on the 2-core CPU this project runs on; an energy-shaping controller is exact and instant):

  * ``Pendulum-v1``: energy-based swing-up, then a PD balance near the top
    (theta'' = 15 sin(theta) + 3 u for g=10, m=l=1; energy E = theta'^2 / 2 + 15 cos(theta),
    E_top = 15; pumping u = u_max sign(theta') while E < E_top raises E since dE/dt = 3 u theta').
  * ``MountainCarContinuous-v0``: push in the direction of the velocity (pumps energy until the
    car reaches the flag).

  ``noise_std`` adds Gaussian noise (in units of the half action range) before clipping, for
  diverse demonstrations; ``gain`` < 1 weakens the controller (a deliberately mediocre expert).
"""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import GymWrapper, RewardSum, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

CONTROL_TASKS = ("Pendulum-v1", "MountainCarContinuous-v0")
"""Continuous tasks that install with plain gymnasium (classic_control; Box2D and MuJoCo ones need
extra system packages). Any other continuous gymnasium id works with :func:`make_control_env`; only
these have a scripted demonstrator."""


def make_control_env(name: str, num_envs: int = 8, seed: int | None = None, device="cpu") -> TransformedEnv:
    """A batched torchrl env [num_envs] over gymnasium's ``name``, with ``episode_reward`` tracking."""
    if num_envs <= 0:
        raise ValueError(f"num_envs={num_envs} must be positive")
    vec = gym.vector.SyncVectorEnv(
        [partial(gym.make, name)] * num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED
    )
    base = GymWrapper(vec, device=device)
    if not base.action_spec.dtype.is_floating_point:
        raise ValueError(f"{name} has a discrete action space; a diffusion policy over actions needs a Box")
    env = TransformedEnv(base, RewardSum())
    if seed is not None:
        env.set_seed(seed)
    return env


def _copies(env) -> list:
    vec = env.base_env._env if isinstance(env, TransformedEnv) else env._env
    return [copy.unwrapped for copy in vec.envs]


def env_rng_state(env) -> list[dict]:
    """The random state of each copy of a :func:`make_control_env` env (its ``np_random``, which draws
    the initial states of its episodes): with :func:`set_env_rng_state`, a resumed run's rollouts
    start from the states the uninterrupted run's would. A plain list of dicts (checkpoint-safe)."""
    return [copy.np_random.bit_generator.state for copy in _copies(env)]


def set_env_rng_state(env, state: list[dict]) -> None:
    """Put back what :func:`env_rng_state` returned (ValueError if the env has another number of copies)."""
    copies = _copies(env)
    if len(state) != len(copies):
        raise ValueError(f"the state is of {len(state)} env copies, the env has {len(copies)}")
    for copy, s in zip(copies, state):
        copy.np_random.bit_generator.state = s


def action_bounds(env) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of a torchrl env's continuous action spec, flattened to [A]."""
    spec = env.action_spec
    space = getattr(spec, "space", None)
    if space is None or not hasattr(space, "low"):
        raise ValueError(f"the env's action spec {type(spec).__name__} has no bounds")
    low, high = space.low, space.high
    while low.dim() > 1:  # batched specs repeat the bounds per env
        low, high = low[0], high[0]
    return low.float().reshape(-1), high.float().reshape(-1)


class PendulumSwingUp(nn.Module):
    """Energy-shaping swing-up + PD balance for ``Pendulum-v1``; obs (cos th, sin th, th') -> torque [1]."""

    def __init__(self, max_torque: float = 2.0, gain: float = 1.0, noise_std: float = 0.0, balance_angle: float = 0.6):
        super().__init__()
        self.max_torque, self.gain, self.noise_std, self.balance_angle = max_torque, gain, noise_std, balance_angle

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        cos, sin, thdot = observation.unbind(-1)
        theta = torch.atan2(sin, cos)
        energy = 0.5 * thdot**2 + 15.0 * cos
        pump = self.max_torque * torch.sign(thdot) * (energy < 15.0).float()
        pump = torch.where(thdot == 0, torch.full_like(pump, self.max_torque), pump)
        balance = -(10.0 * theta + 2.0 * thdot)
        u = torch.where(theta.abs() < self.balance_angle, balance, pump) * self.gain
        if self.noise_std > 0:
            u = u + self.noise_std * self.max_torque * torch.randn_like(u)
        return u.clamp(-self.max_torque, self.max_torque).unsqueeze(-1)


class MountainCarPump(nn.Module):
    """``MountainCarContinuous-v0``: full force along the velocity; obs (position, velocity) -> force [1]."""

    def __init__(self, gain: float = 1.0, noise_std: float = 0.0):
        super().__init__()
        self.gain, self.noise_std = gain, noise_std

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        vel = observation[..., 1]
        u = torch.where(vel >= 0, torch.ones_like(vel), -torch.ones_like(vel)) * self.gain
        if self.noise_std > 0:
            u = u + self.noise_std * torch.randn_like(u)
        return u.clamp(-1.0, 1.0).unsqueeze(-1)


def scripted_expert(name: str, gain: float = 1.0, noise_std: float = 0.0) -> TensorDictModule:
    """The demonstrator of ``name`` as a TensorDictModule (``observation`` -> ``action``)."""
    if name == "Pendulum-v1":
        net: nn.Module = PendulumSwingUp(gain=gain, noise_std=noise_std)
    elif name == "MountainCarContinuous-v0":
        net = MountainCarPump(gain=gain, noise_std=noise_std)
    else:
        raise ValueError(f"no scripted demonstrator for {name!r}; available: {CONTROL_TASKS}")
    return TensorDictModule(net, in_keys=["observation"], out_keys=["action"])


@torch.no_grad()
def collect_demonstrations(env, expert, num_rollouts: int, max_steps: int) -> TensorDict:
    """Roll ``expert`` out ``num_rollouts`` times for ``max_steps`` steps; returns the flat data
    [num_rollouts * num_envs * max_steps] with ``observation``, ``action`` and the per-rollout
    returns in ``("next", "episode_reward")`` at done steps."""
    chunks = []
    with set_exploration_type(ExplorationType.RANDOM):
        for _ in range(num_rollouts):
            chunks.append(env.rollout(max_steps, expert, break_when_any_done=False).reshape(-1))
    return torch.cat(chunks, 0)


def completed_episode_returns(rollout) -> torch.Tensor:
    """Returns of the episodes that ended inside ``rollout`` (flattened, any batch shape)."""
    done = rollout.get(("next", "done")).reshape(-1)
    return rollout.get(("next", "episode_reward")).reshape(-1)[done]
