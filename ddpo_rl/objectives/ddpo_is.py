"""DDPO-IS: the clipped importance-sampling policy gradient, through torchrl's ClipPPOLoss.

    r_k(theta) = pi_theta(x_{t-1} | x_t, c) / pi_old(x_{t-1} | x_t, c)
    L = -E[ min(r_k A, clip(r_k, 1 - eps, 1 + eps) A) ]

With no critic and precomputed (per-prompt normalised, clipped) advantages, this is exactly
``ClipPPOLoss`` minus its value and entropy terms. The clip range eps is relative to the scale
of the log-prob: 1e-4 in the paper, for log-probs averaged over latent dims.
"""

from __future__ import annotations

from torchrl.objectives import ClipPPOLoss

from ddpo_rl.keys import KEYS


def make_ddpo_is_loss(actor, clip_epsilon: float = 1e-4, critic_network=None, **kwargs) -> ClipPPOLoss:
    """A critic-free ``ClipPPOLoss`` for DDPO-IS (with ``critic_network``: DPPO's, see objectives.dppo).

    Args:
        actor: a :class:`~ddpo_rl.policy.DiffusionPolicy` (any ProbabilisticActor).
        clip_epsilon: the PPO clip range (1e-4 in the paper, with mean-reduced log-probs).
        critic_network: None for DDPO (advantages are precomputed from terminal rewards).
        **kwargs: passed to ClipPPOLoss (e.g. ``reduction``); ``normalize_advantage`` is off unless given.

    The loss reads ``advantage`` [N, 1], ``action`` and the stored ``action_log_prob``, and
    writes ``loss_objective``, ``clip_fraction``, ``kl_approx`` and ``ESS``. The entropy bonus is
    off: a denoising step's Gaussian has a fixed std, so its entropy does not depend on theta.
    """
    if clip_epsilon <= 0:
        raise ValueError(f"clip_epsilon={clip_epsilon} must be positive")
    kwargs.setdefault("normalize_advantage", False)
    loss = ClipPPOLoss(
        actor_network=actor,
        critic_network=critic_network,
        clip_epsilon=clip_epsilon,
        entropy_bonus=False,
        functional=False,
        **kwargs,
    )
    loss.set_keys(advantage=KEYS.advantage, action=KEYS.action, sample_log_prob=KEYS.log_prob)
    return loss
