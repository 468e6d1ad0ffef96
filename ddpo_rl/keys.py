"""Every TensorDict key that ddpo_rl reads or writes, in one place.

One denoising step of the MDP, as the env and the policy see it::

    state s_t  = (x_t, t, c)    -> KEYS.latents, KEYS.timestep (and KEYS.step_index), KEYS.prompt_embeds
                                   (+ KEYS.pooled_prompt_embeds for SD3-style models)
    action a_t = x_{t-1}        -> KEYS.action
    pi(a_t|s_t)                 -> KEYS.loc, KEYS.scale (the DDIM Gaussian), KEYS.log_prob
    reward r(x_0, c)            -> ("next", KEYS.reward), non-zero at the last step only

Envs, policies, losses, the trainer and the recipes import :data:`KEYS` rather than
spelling strings, so a renamed key is renamed everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DDPOKeys:
    """Names of the entries of a denoising trajectory."""

    latents: str = "latents"
    """x_t, the noisy latent the step starts from: [B, C, H, W]."""
    timestep: str = "timestep"
    """t, the scheduler's timestep of x_t: int64 [B] for DDIM; float32 [B] (sigma * 1000) for flow matching."""
    step_index: str = "step_index"
    """Position k of the step in the sampling chain, 0..T-1 (T when done): int64 [B]."""
    prompt_embeds: str = "prompt_embeds"
    """c, the text encoder's embedding of the prompt: [B, L, D]."""
    pooled_prompt_embeds: str = "pooled_prompt_embeds"
    """The text encoders' pooled embedding of the prompt, [B, D_pooled]: SD3's ``pooled_projections``
    (its two CLIP encoders' pooled outputs, concatenated). Present only when the encoder returns it."""
    prompt_id: str = "prompt_id"
    """Index of the prompt in the env's prompt list, for per-prompt statistics: int64 [B]."""
    action: str = "action"
    """x_{t-1}, the next latent the policy samples: [B, C, H, W]."""
    loc: str = "loc"
    """Mean of the DDIM Gaussian pi(x_{t-1} | x_t, c)."""
    scale: str = "scale"
    """Standard deviation sigma_t of the DDIM Gaussian, broadcastable to the latent."""
    log_prob: str = "action_log_prob"
    """log pi(x_{t-1} | x_t, c), reduced over latent dims (see ddpo_rl.distributions)."""
    reward: str = "reward"
    """Scalar reward [B, 1]; written in ("next", reward) by the reward transform."""
    done: str = "done"
    terminated: str = "terminated"
    advantage: str = "advantage"
    """Per-sample advantage [B, 1] (broadcast over steps), after per-prompt normalisation."""
    images: str = "images"
    """Decoded images in [0, 1], [B, 3, H, W], when the reward transform keeps them."""


KEYS = DDPOKeys()
