"""The image-denoising MDP as a ``gymnasium.Env``, for users of other RL libraries.

    obs  = {"latents": x_t [C, H, W] float32, "timestep": t () int64, "step_index": k (Discrete(T+1)),
            "prompt_embeds": c [L, D] float32, "prompt_id": Discrete(num_prompts)}
    action = x_{t-1} [C, H, W] float32 (the next latent; sample it from the DDIM Gaussian)
    reward = 0 until the T-th step, then the reward transform's score of x_0; terminated at step T.

:class:`DenoisingGymEnv` wraps a torchrl :class:`~envs.denoising.DenoisingEnv` of batch size 1,
usually inside a ``TransformedEnv`` with its :class:`~ddpo_rl.rewards.transform.RewardTransform`
(without one, every reward is 0). It converts numpy <-> torch at the boundary and nothing else:
the dynamics, prompt sampling and reward are the torchrl env's.

Vectorisation: the adapter is single-env (gymnasium's convention). For B chains at once either
use ``gymnasium.vector.SyncVectorEnv`` over several adapters (each with its own encoder copy of
the prompt table: cheap for the tiny/CPU case), or, better, the torchrl env directly with
``batch_size=[B]`` -- it steps all B chains in one batched call.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from tensordict import TensorDictBase
from torchrl.envs.utils import step_mdp

from ddpo_rl.keys import KEYS
from envs.denoising import DenoisingEnv


def _base(env) -> DenoisingEnv:
    base = getattr(env, "base_env", env)
    if not isinstance(base, DenoisingEnv):
        raise TypeError(f"DenoisingGymEnv wraps a DenoisingEnv (optionally transformed), got {type(base).__name__}")
    return base


class DenoisingGymEnv(gym.Env):
    """gymnasium view of a torchrl denoising env with ``batch_size=[1]``.

    Args:
        env: ``DenoisingEnv`` or ``TransformedEnv(DenoisingEnv(..., batch_size=1), RewardTransform(...))``.

    ``reset(seed=s)`` reseeds the torchrl env (prompt draw and x_T), so equal seeds give equal
    episodes. ``info`` holds the episode's ``prompt`` (a string) at reset and at every step.
    """

    metadata = {"render_modes": []}

    def __init__(self, env):
        super().__init__()
        base = _base(env)
        if tuple(base.batch_size) != (1,):
            raise ValueError(
                f"DenoisingGymEnv needs a torchrl env with batch_size=[1], got {list(base.batch_size)}; for several "
                "chains at once use gymnasium.vector over adapters, or the batched torchrl env directly"
            )
        self._env, self._base_env = env, base
        shape = tuple(base.latent_shape)
        latent_dtype = np.float32 if base.latent_dtype == torch.float32 else np.float16
        embeds_shape = tuple(base.observation_spec[KEYS.prompt_embeds].shape[1:])
        self.observation_space = spaces.Dict(
            {
                KEYS.latents: spaces.Box(-np.inf, np.inf, shape, dtype=latent_dtype),
                KEYS.timestep: spaces.Box(0, np.iinfo(np.int64).max, (), dtype=np.int64),
                KEYS.step_index: spaces.Discrete(base.num_inference_steps + 1),
                KEYS.prompt_embeds: spaces.Box(-np.inf, np.inf, embeds_shape, dtype=np.float32),
                KEYS.prompt_id: spaces.Discrete(len(base.prompt_source)),
            }
        )
        self.action_space = spaces.Box(-np.inf, np.inf, shape, dtype=latent_dtype)
        self._td: TensorDictBase | None = None
        self._done = True

    # -- conversion ----------------------------------------------------------------------------
    def _obs(self, td: TensorDictBase) -> dict[str, Any]:
        """Fresh numpy arrays (never views of the env's tensors: users keep what they are given)."""
        return {
            KEYS.latents: np.array(td[KEYS.latents][0].detach().cpu(), dtype=self.action_space.dtype),
            KEYS.timestep: np.asarray(int(td[KEYS.timestep][0]), dtype=np.int64),
            KEYS.step_index: np.int64(td[KEYS.step_index][0]),
            KEYS.prompt_embeds: np.array(td[KEYS.prompt_embeds][0].detach().float().cpu(), dtype=np.float32),
            KEYS.prompt_id: np.int64(td[KEYS.prompt_id][0]),
        }

    def _info(self, td: TensorDictBase) -> dict[str, Any]:
        return {"prompt": self._base_env.prompts_of(td[KEYS.prompt_id])[0]}

    # -- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.set_seed(int(seed))
        self._td = self._env.reset()
        self._done = False
        return self._obs(self._td), self._info(self._td)

    def step(self, action):
        if self._td is None or self._done:
            raise RuntimeError("step() called before reset() or after the episode ended: call reset() first")
        action = np.asarray(action, dtype=self.action_space.dtype)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action has shape {action.shape}; expected {self.action_space.shape}")
        td = self._td.clone(False)
        td.set(KEYS.action, torch.as_tensor(action, device=self._base_env.device).unsqueeze(0))
        td = self._env.step(td)
        nxt = td["next"]
        reward = float(nxt[KEYS.reward][0, 0])
        terminated = bool(nxt[KEYS.terminated][0, 0])
        self._td = step_mdp(td, keep_other=True, exclude_action=True)
        self._done = terminated
        return self._obs(nxt), reward, terminated, False, self._info(nxt)

    def close(self):
        self._td = None
