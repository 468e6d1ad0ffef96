"""Collect DDPO trajectories: B chains of T denoising steps, under no_grad and random sampling.

The loop is ``env.rollout``'s, minus its per-step done check (see :func:`_rollout_fixed_horizon`).

With an asynchronous reward (a RewardTransform whose reward function has ``submit``), each
rollout only submits its final images; the rewards are awaited once, after the last batch, and
written at each trajectory's last step, so the reward model runs while later batches sample.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp

from ddpo_rl.keys import KEYS

#: What training needs from a trajectory; the rest of the rollout (loc, scale, the copies in
#: "next") is dropped right after sampling to keep the batch small.
TRAJECTORY_KEYS = (
    KEYS.latents,
    KEYS.timestep,
    KEYS.prompt_embeds,
    KEYS.prompt_id,
    KEYS.action,
    KEYS.log_prob,
    ("next", KEYS.reward),
    ("next", KEYS.done),
)


def _async_reward_transforms(env) -> list:
    """The transforms of ``env`` that queue reward futures (RewardTransform with an async reward)."""
    from torchrl.envs.transforms import Compose

    transform = getattr(env, "transform", None)
    if transform is None:
        return []
    transforms = list(transform) if isinstance(transform, Compose) else [transform]
    return [t for t in transforms if getattr(t, "asynchronous", False)]


def _num_steps(env) -> int:
    base = getattr(env, "base_env", env)
    return int(base.num_inference_steps)


def check_same_horizon(env, policy) -> int:
    """T of ``env``, after checking that ``policy`` (when it says) was built for the same T; one-line error."""
    T = _num_steps(env)
    policy_T = getattr(policy, "num_inference_steps", None)
    if policy_T is not None and int(policy_T) != T:
        raise ValueError(
            f"num_inference_steps: the env runs T={T} steps but the policy's schedule has T={policy_T}; "
            "build both from the same num_inference_steps"
        )
    return T


def _rollout_fixed_horizon(env, policy, T: int) -> TensorDictBase:
    """``env.rollout(T, policy, break_when_any_done=False)`` for an MDP whose chains all end at T.

    ``env.rollout`` calls ``step_and_maybe_reset`` after every step, which reads the done flags
    on the host (``any_done`` then ``if any_done``): two device syncs per denoising step on GPU,
    which stop the host from queueing the next UNet call while the current one runs. Every chain
    of a DenoisingEnv is done exactly at step T, so there is nothing to reset mid-rollout: step
    and move to the next state, and stack once at the end (same TensorDict, same random draws).
    """
    # the state-advance env.rollout itself uses (torchrl's _StepMDP); public step_mdp otherwise
    advance = getattr(env, "_step_mdp", None) or (lambda x: step_mdp(x, keep_other=True))
    td = env.reset()
    steps = []
    for k in range(T):
        td = env.step(policy(td))
        steps.append(td)
        if k < T - 1:
            td = advance(td)
    return torch.stack(steps, len(env.batch_size))


@torch.no_grad()
def collect_trajectories(env, policy, num_batches: int = 1, extra_keys=()) -> TensorDictBase:
    """Sample ``num_batches`` batches of trajectories with ``policy`` in ``env``.

    Args:
        env: a :class:`envs.denoising.DenoisingEnv`, usually wrapped with a RewardTransform.
        policy: a :class:`~ddpo_rl.policy.DiffusionPolicy` (any actor writing action and log-prob).
        num_batches: how many env batches to sample (N = num_batches * env.batch_size).
        extra_keys: more keys to keep (e.g. ``("next", "images")``).

    Returns:
        A TensorDict [N, T] holding :data:`TRAJECTORY_KEYS`; the terminal reward of trajectory
        i is ``td["next", "reward"][i, -1]`` (for an asynchronous reward, filled in after the
        last batch; see the module docstring).
    """
    if num_batches <= 0:
        raise ValueError(f"num_batches={num_batches} must be positive")
    T = check_same_horizon(env, policy)
    # what the policy reads (e.g. the flow policy's step index and pooled embeddings) is what its
    # loss re-reads at training time
    keys = list(dict.fromkeys([*TRAJECTORY_KEYS, *getattr(policy, "in_keys", ()), *extra_keys]))
    batches = []
    async_transforms = _async_reward_transforms(env)
    for transform in async_transforms:  # futures left by a rollout run outside this function
        transform.clear_pending()
    try:
        with set_exploration_type(ExplorationType.RANDOM):
            for _ in range(num_batches):
                td = _rollout_fixed_horizon(env, policy, T)
                batches.append(td.select(*keys, strict=False))
        for transform in async_transforms:  # all batches sampled: now wait for their rewards
            rewards = transform.pop_pending()
            if len(rewards) != len(batches):
                raise RuntimeError(f"{len(rewards)} reward batches submitted for {len(batches)} rollouts")
            for td, r in zip(batches, rewards):
                td.get(("next", KEYS.reward))[:, -1] = r.to(td.device).unsqueeze(-1)
    finally:
        for transform in async_transforms:
            transform.clear_pending()
    return torch.cat(batches, 0) if len(batches) > 1 else batches[0]


def terminal_rewards(trajectories: TensorDictBase) -> torch.Tensor:
    """The reward of each trajectory, [N] (read at its last step)."""
    return trajectories.get(("next", KEYS.reward))[:, -1, 0]


def with_advantages(trajectories: TensorDictBase, advantages: torch.Tensor) -> TensorDictBase:
    """Broadcast per-trajectory advantages [N] over the T steps as ``advantage`` [N, T, 1]."""
    N, T = trajectories.shape[:2]
    trajectories.set(KEYS.advantage, advantages.reshape(N, 1, 1).expand(N, T, 1).to(trajectories.device))
    return trajectories


__all__ = ["TRAJECTORY_KEYS", "TensorDict", "collect_trajectories", "terminal_rewards", "with_advantages"]
