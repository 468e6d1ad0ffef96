"""The reward transform: at the last denoising step, decode x_0 and score it.

    next latents x_0 --decode (VAE, or pixels)--> images in [0, 1] --reward_fn(images, prompts)--> r

It is a torchrl ``Transform`` appended to a :class:`envs.denoising.DenoisingEnv`; it does
nothing on the T-1 intermediate steps (their reward stays 0), so the sampling loop pays for
the decoder and the reward model once per trajectory. Which step is last is read from the
env's host-side step counter: no device sync.

Asynchronous rewards: when ``reward_fn`` has a ``submit(images, prompts) -> Future`` method
(:class:`ddpo_rl.rewards.async_reward.AsyncReward`), the last step decodes x_0, submits the images
and returns at once, leaving the reward 0; the future is queued on the transform. The reward
model then runs in a background thread while the sampler goes on with the next batch.
:func:`ddpo_rl.collector.collect_trajectories` waits for the queued futures after its last batch
(:meth:`RewardTransform.pop_pending`) and writes the rewards at the last step. A rollout run
outside the collector must do the same, or its rewards stay 0.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from typing import Callable

import torch
from tensordict import TensorDictBase
from torchrl.envs.transforms import Transform

from ddpo_rl.keys import KEYS
from ddpo_rl.rewards.base import RewardFn

ON_INVALID = ("raise", "drop")


class RewardError(RuntimeError):
    """A reward function returned something that cannot be trained on, or raised."""


def _name(fn) -> str:
    """The reward function's name, through wrappers that keep it as ``reward_fn`` (AsyncReward)."""
    while getattr(fn, "reward_fn", None) is not None and not hasattr(fn, "__name__"):
        fn = fn.reward_fn
    return getattr(fn, "__name__", type(fn).__name__)


def one_per_image(values, batch_size: int, what: str) -> torch.Tensor:
    """``values`` as a tensor, or a :class:`RewardError` naming ``what`` (a reward function, a monitor)
    unless it holds one scalar per image, shape ``(batch_size,)``."""
    values = torch.as_tensor(values)
    if values.shape != (batch_size,):
        raise RewardError(
            f"{what} returned shape {tuple(values.shape)} for {batch_size} images; "
            f"it must return one scalar per image, shape ({batch_size},)"
        )
    return values


def validate_rewards(rewards, batch_size: int, reward_fn, on_invalid: str = "raise") -> torch.Tensor:
    """Check a reward function's output: a tensor [B] of finite values.

    With ``on_invalid="drop"``, non-finite entries are kept as NaN with a warning; the
    advantage computation gives those samples zero weight (see ddpo_rl.advantages). A wrong
    shape always raises.
    """
    name = _name(reward_fn)
    rewards = one_per_image(rewards, batch_size, f"reward function {name}").float()
    bad = ~torch.isfinite(rewards)
    if bad.any():
        n = int(bad.sum())
        if on_invalid == "raise":
            raise RewardError(
                f"reward function {name} returned {n} non-finite value(s) (NaN/inf) out of {batch_size}; "
                "fix the reward, or set on_invalid='drop' (recipes: --on-invalid-reward drop) to train without those samples"
            )
        warnings.warn(f"reward function {name}: dropping {n}/{batch_size} samples with non-finite reward")
        rewards = torch.where(bad, torch.full_like(rewards, float("nan")), rewards)
    return rewards


class RewardTransform(Transform):
    """Write ``("next", "reward")`` at the last denoising step from ``reward_fn(decode(x_0), prompts)``.

    Args:
        reward_fn: a :class:`~ddpo_rl.rewards.base.RewardFn` (images [B,3,H,W] in [0,1], prompts -> [B]).
            If it has a ``submit`` method (an ``AsyncReward``) the rewards are computed in the
            background and filled in by the collector (see the module docstring).
        decode: latents -> images in [0, 1] (a VAE decoder, or a pixel-space mapping).
        keep_images: also write the decoded images to ``("next", "images")`` (for logging).
        on_invalid: "raise" (default) on NaN/inf rewards, or "drop" those samples with a warning.
    """

    def __init__(
        self,
        reward_fn: RewardFn,
        decode: Callable[[torch.Tensor], torch.Tensor],
        keep_images: bool = False,
        on_invalid: str = "raise",
    ):
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid={on_invalid!r}; expected one of {ON_INVALID}")
        super().__init__(in_keys=[KEYS.latents], out_keys=[KEYS.reward])
        self.reward_fn = reward_fn
        self.decode = decode
        self.keep_images = keep_images
        self.on_invalid = on_invalid
        self._pending: list[tuple[Future, int]] = []

    @property
    def asynchronous(self) -> bool:
        """Whether rewards are submitted to a background pool rather than computed in the step."""
        return callable(getattr(self.reward_fn, "submit", None))

    def pop_pending(self) -> list[torch.Tensor]:
        """Wait for the rewards submitted since the last call: one validated float32 [B] tensor per
        rollout, in submission order. The queue is empty afterwards, even if a reward raised."""
        pending, self._pending = self._pending, []
        rewards = []
        for future, batch_size in pending:
            try:
                value = future.result()
            except Exception as err:
                raise RewardError(f"reward function {_name(self.reward_fn)} raised: {err!r}") from err
            rewards.append(validate_rewards(value, batch_size, self.reward_fn, self.on_invalid))
        return rewards

    def clear_pending(self) -> None:
        """Drop queued futures (after a failed rollout), cancelling those not started yet."""
        pending, self._pending = self._pending, []
        for future, _ in pending:
            future.cancel()

    def _base_env(self):
        parent = self.parent
        return getattr(parent, "base_env", parent)

    def score(self, latents: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and reward a batch of final latents: (rewards [B] float32, images)."""
        with torch.no_grad():
            images = self.decode(latents)
            try:
                rewards = self.reward_fn(images, prompts)
            except Exception as err:  # a named error, never a silent failure
                raise RewardError(f"reward function {_name(self.reward_fn)} raised: {err!r}") from err
        return validate_rewards(rewards, latents.shape[0], self.reward_fn, self.on_invalid), images

    def submit(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Decode a batch of final latents and queue their reward future (asynchronous rewards;
        collect with :meth:`pop_pending`). Returns the images."""
        with torch.no_grad():
            images = self.decode(latents)
        self._pending.append((self.reward_fn.submit(images, prompts), latents.shape[0]))
        return images

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        env = self._base_env()
        if not env.at_final_step:
            return next_tensordict
        latents = next_tensordict[KEYS.latents]
        prompts = env.prompts_of(next_tensordict[KEYS.prompt_id])
        if self.asynchronous:  # submit and go on; the collector fills the reward in
            images = self.submit(latents, prompts)
            if self.keep_images:
                next_tensordict.set(KEYS.images, images)
            return next_tensordict
        rewards, images = self.score(latents, prompts)
        next_tensordict.set(KEYS.reward, rewards.to(next_tensordict.device).unsqueeze(-1))
        if self.keep_images:
            next_tensordict.set(KEYS.images, images)
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Score the ``latents`` of a TensorDict of final states (outside an env)."""
        raise NotImplementedError("RewardTransform runs inside an env; use .score(latents, prompts) directly")
