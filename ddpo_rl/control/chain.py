"""A diffusion policy for control: K denoising steps inside one environment step (DPPO's two-level MDP).

Ren et al. 2024 ("Diffusion Policy Policy Optimization") see a diffusion policy acting in an
environment as a two-level MDP::

    env step j:      s_j --[ x_K ~ N(0, I) --pi(x_{K-1}|x_K, s_j)--> ... --pi(x_0|x_1, s_j)--> ]--> a_j = x_0
                     s_{j+1}, r_j = env.step(scale(clip(x_0)))
    denoising step k: state (x_k, t_k, s_j), action x_{k-1} ~ N(mu_theta(x_k, t_k, s_j), sigma_k^2 I)

Each denoising step is the DDIM Gaussian of :mod:`ddpo_rl.ddim` with its exact log-prob: the
step policy is an ordinary :class:`~ddpo_rl.policy.DiffusionPolicy` over action vectors
(``event_dim=1``, the observation as its condition). :class:`DenoisingChainActor` runs the
chain for a batch of observations and records it, so the whole chain's probability can be
recomputed under new parameters:

    ``chain``            [*B, K+1, A]  x_K, ..., x_0 (normalised action units, unclipped)
    ``chain_log_prob``   [*B, K]       log pi(x_{k-1} | x_k, t_k, s), one per denoising step
    ``action``           [*B, A]       the env action: clip(x_0, -1, 1) mapped to [low, high]
    ``action_log_prob``  [*B]          the chain's log-prob, the per-step ones reduced over K

Two PPO ratios are offered, both with torchrl's ``ClipPPOLoss`` (see ``recipes/dppo_gym.py``):

- ``"step"`` (DPPO's form, the default there): :func:`flatten_chain` turns every env step into K
  one-step transitions that share the env step's advantage and value target; ``ClipPPOLoss``
  on the step :class:`DiffusionPolicy` then clips each denoising step's ratio separately.
- ``"chain"``: the actor itself is the PPO actor; :meth:`DenoisingChainActor.get_dist` returns
  a :class:`DenoisingChainDistribution` whose ``log_prob(chain)`` is the reduction over the K steps
  (``"sum"``: the chain's joint log-density, the default; ``"mean"``: sum / K). One ratio per
  env step; with "sum" it multiplies K per-step ratios, so its clip range must be smaller.

Within one step the log-density is reduced over the A action dims by the step policy's
``log_prob_reduction``; for action vectors ddpo_rl uses ``"sum"`` (the true density; the
"mean" of the image case exists to tame thousands of latent dims, irrelevant for A <= ~10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.envs.utils import ExplorationType, exploration_type

from ddpo_rl.ddim import LOG_PROB_REDUCTIONS, gaussian_log_prob
from ddpo_rl.keys import KEYS
from ddpo_rl.policy import DiffusionPolicy, inference_timesteps

_NOISELESS = (ExplorationType.DETERMINISTIC, ExplorationType.MODE, ExplorationType.MEAN)


@dataclass(frozen=True)
class ChainKeys:
    """TensorDict keys written by :class:`DenoisingChainActor` and :func:`flatten_chain`."""

    observation: str = "observation"
    """s, the env observation the chain is conditioned on: [*B, O]."""
    chain: str = "chain"
    """x_K..x_0 of the denoising chain, normalised action units: [*B, K+1, A]."""
    chain_log_prob: str = "chain_log_prob"
    """Per-denoising-step log-probs log pi(x_{k-1} | x_k, t_k, s): [*B, K]."""
    action: str = KEYS.action
    """The env action, clip(x_0) scaled to the action bounds: [*B, A]."""
    log_prob: str = KEYS.log_prob
    """The chain's log-prob (per-step log-probs reduced over K): [*B]."""


CHAIN_KEYS = ChainKeys()


def make_action_scheduler(num_train_timesteps: int = 100, beta_schedule: str = "squaredcos_cap_v2", **overrides):
    """A DDIMScheduler for normalised actions in [-1, 1].

    ``clip_sample=True`` (range 1) keeps x_0_hat inside the action box, ``set_alpha_to_one=False``
    keeps the last step's std non-zero (its log-prob defined), cosine betas suit short schedules,
    ``timestep_spacing="trailing"`` starts the chain at the last training timestep (pure noise) and
    ends it at alpha_bar_0 (with "leading" spacing and no offset the last step goes from t=0 to
    alpha_bar_0 with std 0, and DiffusionPolicy refuses it).
    """
    from diffusers import DDIMScheduler

    cfg = dict(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=False,
        steps_offset=0,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    cfg.update(overrides)
    return DDIMScheduler(**cfg)


def make_step_policy(
    noise_model: nn.Module,
    scheduler,
    num_inference_steps: int,
    *,
    eta: float = 1.0,
    min_std: float = 0.1,
    observation_key: str = CHAIN_KEYS.observation,
    log_prob_reduction: str = "sum",
) -> DiffusionPolicy:
    """The one-denoising-step policy over action vectors: a :class:`DiffusionPolicy` reading
    (``latents``, ``timestep``, ``observation_key``) with ``event_dim=1``."""
    return DiffusionPolicy(
        noise_model,
        scheduler,
        num_inference_steps,
        eta=eta,
        event_dim=1,
        log_prob_reduction=log_prob_reduction,
        in_keys=(KEYS.latents, KEYS.timestep, observation_key),
        min_std=min_std,
    )


def _reduce_chain(step_log_probs: torch.Tensor, reduction: str) -> torch.Tensor:
    return step_log_probs.sum(-1) if reduction == "sum" else step_log_probs.mean(-1)


class DenoisingChainDistribution:
    """pi_theta(chain | s) = prod_k pi_theta(x_{k-1} | x_k, t_k, s), as ClipPPOLoss needs it.

    Only :meth:`log_prob` is defined (no sampling, no entropy): it is built by
    :meth:`DenoisingChainActor.get_dist` for the loss, which evaluates stored chains.
    """

    def __init__(self, actor: DenoisingChainActor, observation: torch.Tensor):
        self.actor, self.observation = actor, observation

    def log_prob(self, chain: torch.Tensor) -> torch.Tensor:
        """The chain's log-prob [*B] (per-step log-probs reduced over K by the actor's ``chain_reduction``)."""
        return _reduce_chain(self.actor.step_log_probs(self.observation, chain), self.actor.chain_reduction)

    def entropy(self):
        raise NotImplementedError("the denoising chain has no closed-form entropy: build ClipPPOLoss with entropy_bonus=False")


class DenoisingChainActor(TensorDictModuleBase):
    """Samples a K-step denoising chain per observation and writes the env action and log-probs.

    Args:
        step_policy: the one-step :class:`DiffusionPolicy` (see :func:`make_step_policy`); its
            head (noise model + DDIM Gaussian) and distribution settings are used as they are.
        scheduler: the same DDIMScheduler (for the K timesteps the chain visits).
        action_low, action_high: the env's action bounds [A]; x_0 in [-1, 1] is mapped onto them.
        chain_reduction: "sum" (joint log-density of the chain, default) or "mean" over the K steps,
            for ``action_log_prob`` and :class:`DenoisingChainDistribution`.
        keys: :class:`ChainKeys`; its ``observation`` must be the step policy's condition key.

    Sampling is random by default; under ``set_exploration_type(DETERMINISTIC | MODE | MEAN)`` every
    step takes its mean (a deterministic chain from a random x_K), the log-probs still recorded.
    Collect under ``torch.no_grad()``.
    """

    def __init__(
        self,
        step_policy: DiffusionPolicy,
        scheduler,
        action_low,
        action_high,
        chain_reduction: str = "sum",
        keys: ChainKeys = CHAIN_KEYS,
    ):
        super().__init__()
        if chain_reduction not in LOG_PROB_REDUCTIONS:
            raise ValueError(f"chain_reduction must be one of {LOG_PROB_REDUCTIONS}, got {chain_reduction!r}")
        if step_policy.module[0].in_keys[2] != keys.observation:
            raise ValueError(
                f"the step policy reads its condition from {step_policy.module[0].in_keys[2]!r} but the chain "
                f"actor writes observations as {keys.observation!r}: build both with the same observation key"
            )
        self.step_policy = step_policy
        self.keys = keys
        self.chain_reduction = chain_reduction
        self.num_steps = step_policy.head.num_inference_steps
        low = torch.as_tensor(action_low, dtype=torch.float32).reshape(-1)
        high = torch.as_tensor(action_high, dtype=torch.float32).reshape(-1)
        if low.shape != high.shape or not bool((high > low).all()) or not bool(torch.isfinite(high - low).all()):
            raise ValueError(f"action bounds must be finite with high > low, got low={low.tolist()} high={high.tolist()}")
        self.action_dim = low.numel()
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)
        self.register_buffer("timesteps", inference_timesteps(scheduler, self.num_steps))
        dist_kwargs = step_policy.module[-1].distribution_kwargs
        self.event_dim, self.step_reduction = dist_kwargs["event_dim"], dist_kwargs["reduction"]
        if self.event_dim != 1:
            raise ValueError(f"the step policy must have event_dim=1 (action vectors), got {self.event_dim}")
        self.in_keys = [keys.observation]
        self.out_keys = [keys.chain, keys.chain_log_prob, keys.action, keys.log_prob]

    @property
    def head(self):
        """The step policy's :class:`~ddpo_rl.policy.DDIMGaussianHead` (noise model + DDIM Gaussian)."""
        return self.step_policy.head

    def to_env_action(self, x0: torch.Tensor) -> torch.Tensor:
        """clip(x_0, -1, 1) mapped affinely onto [action_low, action_high]."""
        return self.action_low + (x0.clamp(-1, 1) + 1) * (self.action_high - self.action_low) / 2

    def to_normalized_action(self, action: torch.Tensor) -> torch.Tensor:
        """The inverse map (for behaviour cloning targets), clipped to [-1, 1]."""
        return (2 * (action - self.action_low) / (self.action_high - self.action_low) - 1).clamp(-1, 1)

    def sample_chain(
        self, observation: torch.Tensor, generator: torch.Generator | None = None, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the K steps for observations [*B, O]: (chain [*B, K+1, A], step log-probs [*B, K])."""
        batch = observation.shape[:-1]
        obs = observation.reshape(-1, observation.shape[-1])
        n = obs.shape[0]
        x = torch.randn(n, self.action_dim, generator=generator, device=obs.device, dtype=torch.float32)
        chain, log_probs = [x], []
        for k in range(self.num_steps):
            loc, scale = self.head(x, self.timesteps[k].expand(n), obs)
            if deterministic:
                x = loc
            else:
                x = loc + scale * torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
            log_probs.append(gaussian_log_prob(x, loc, scale, event_dim=1, reduction=self.step_reduction))
            chain.append(x)
        chain = torch.stack(chain, dim=-2).reshape(*batch, self.num_steps + 1, self.action_dim)
        return chain, torch.stack(log_probs, dim=-1).reshape(*batch, self.num_steps)

    def step_log_probs(self, observation: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """log pi_theta(x_{k-1} | x_k, t_k, s) of stored chains [*B, K+1, A] under the current parameters: [*B, K].

        All B*K steps go through the noise model in one batched call.
        """
        K = self.num_steps
        if chain.shape[-2:] != (K + 1, self.action_dim):
            raise ValueError(f"chain has shape {tuple(chain.shape)}; expected [..., {K + 1}, {self.action_dim}]")
        batch = chain.shape[:-2]
        x_in = chain[..., :-1, :].reshape(-1, self.action_dim)
        x_out = chain[..., 1:, :].reshape(-1, self.action_dim)
        obs = observation.unsqueeze(-2).expand(*batch, K, observation.shape[-1]).reshape(-1, observation.shape[-1])
        t = self.timesteps.expand(*batch, K).reshape(-1)
        loc, scale = self.head(x_in, t, obs)
        lp = gaussian_log_prob(x_out, loc, scale, event_dim=1, reduction=self.step_reduction)
        return lp.reshape(*batch, K)

    def get_dist(self, tensordict: TensorDictBase) -> DenoisingChainDistribution:
        """The chain distribution given the observations of ``tensordict`` (for ClipPPOLoss)."""
        return DenoisingChainDistribution(self, tensordict.get(self.keys.observation))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        deterministic = exploration_type() in _NOISELESS
        chain, step_lp = self.sample_chain(tensordict.get(self.keys.observation), deterministic=deterministic)
        tensordict.set(self.keys.chain, chain)
        tensordict.set(self.keys.chain_log_prob, step_lp)
        tensordict.set(self.keys.action, self.to_env_action(chain[..., -1, :]))
        tensordict.set(self.keys.log_prob, _reduce_chain(step_lp, self.chain_reduction))
        return tensordict


def flatten_chain(
    tensordict: TensorDictBase,
    num_steps: int,
    keys: ChainKeys = CHAIN_KEYS,
    broadcast_keys=(KEYS.advantage, "value_target"),
    timesteps: torch.Tensor | None = None,
) -> TensorDict:
    """Env-step data [*B] -> one-denoising-step transitions [N*K] for the step :class:`DiffusionPolicy`.

    Each transition k of an env step holds ``latents`` = x_k, ``timestep`` = t_k, the observation,
    ``action`` = x_{k-1} and ``action_log_prob`` = its stored per-step log-prob; the entries of
    ``broadcast_keys`` present (the env step's advantage and value target) are copied to all K.
    This is DPPO's inner MDP, where every denoising step is an action with the env step's advantage.

    Args:
        tensordict: collected data with the :class:`ChainKeys` entries.
        num_steps: K.
        keys: the chain keys.
        broadcast_keys: per-env-step entries to repeat over the K transitions.
        timesteps: the K timesteps [K] (``DenoisingChainActor.timesteps``); required.
    """
    if timesteps is None or timesteps.numel() != num_steps:
        raise ValueError("flatten_chain needs the chain's K timesteps (DenoisingChainActor.timesteps)")
    td = tensordict.reshape(-1)
    n, K = td.shape[0], num_steps
    chain = td.get(keys.chain)
    obs = td.get(keys.observation)
    out = {
        KEYS.latents: chain[:, :-1],
        KEYS.timestep: timesteps.expand(n, K),
        keys.observation: obs.unsqueeze(1).expand(n, K, obs.shape[-1]),
        KEYS.action: chain[:, 1:],
        KEYS.log_prob: td.get(keys.chain_log_prob),
    }
    for key in broadcast_keys:
        value = td.get(key, None)
        if value is not None:
            out[key] = value.unsqueeze(1).expand(n, K, *value.shape[1:])
    return TensorDict(out, batch_size=[n, K]).reshape(-1)
