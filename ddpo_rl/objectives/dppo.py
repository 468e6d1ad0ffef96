"""DPPO's loss: torchrl's ClipPPOLoss with a value critic, on a diffusion policy over actions.

Two ratio forms (Ren et al. 2024, "Diffusion Policy Policy Optimization"):

- ``"step"``: one ratio per denoising step, pi_theta(a_{k-1} | a_k, s) / pi_old(...), on the step
  policy (a :class:`~ddpo_rl.policy.DiffusionPolicy`) and one-step transitions;
- ``"chain"``: one ratio per env step, the whole chain's probability (the product of the K step
  ratios with ``chain_reduction="sum"``), on the :class:`~ddpo_rl.control.chain.DenoisingChainActor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchrl.modules import ValueOperator
from torchrl.objectives import ClipPPOLoss

from ddpo_rl.objectives.ddpo_is import make_ddpo_is_loss

if TYPE_CHECKING:
    from ddpo_rl.control.chain import DenoisingChainActor

RATIO_FORMS = ("step", "chain")


def make_dppo_loss(
    chain_actor: DenoisingChainActor,
    critic: ValueOperator,
    ratio: str = "step",
    clip_epsilon: float = 0.01,
    critic_coeff: float = 0.5,
    normalize_advantage: bool = True,
) -> ClipPPOLoss:
    """torchrl's ``ClipPPOLoss`` with a value critic, on the step policy or on the whole chain.

    The entropy bonus is off (the chain has no closed-form entropy; exploration comes from the
    denoising noise and its std floor). ``clip_epsilon`` acts on per-step ratios for "step" and
    on the chain ratio (a product of K per-step ratios with "sum") for "chain".
    """
    if ratio not in RATIO_FORMS:
        raise ValueError(f"ratio={ratio!r}; expected one of {RATIO_FORMS}")
    actor = chain_actor.step_policy if ratio == "step" else chain_actor
    loss = make_ddpo_is_loss(
        actor, clip_epsilon, critic_network=critic, critic_coeff=critic_coeff, loss_critic_type="l2",
        normalize_advantage=normalize_advantage,
    )
    if ratio == "chain":
        loss.set_keys(action=chain_actor.keys.chain)
    loss.ratio_form = ratio
    return loss
