"""DDPO's losses, as torchrl LossModules.

- DDPO-IS: torchrl's ``ClipPPOLoss`` configured critic-free (:func:`make_ddpo_is_loss`);
- DDPO-SF: REINFORCE without a critic (:class:`DDPOSFLoss`);
- RWR: reward-weighted likelihood, exponential or sparse weights (:class:`RWRLoss`);
- DPPO (control): ``ClipPPOLoss`` with a value critic, per-step or per-chain ratios (:func:`make_dppo_loss`);
- any of them plus ``loss_kl``, the KL to the reference model (:class:`KLToReferenceLoss`).

All read the same keys (ddpo_rl.keys.KEYS) and the log-prob of the actor's distribution, so
the log-prob reduction chosen for the actor is the one every loss uses.
"""

from ddpo_rl.objectives.ddpo_is import make_ddpo_is_loss
from ddpo_rl.objectives.dppo import RATIO_FORMS, make_dppo_loss
from ddpo_rl.objectives.kl import KLToReferenceLoss
from ddpo_rl.objectives.reinforce import CriticFreePGLoss, DDPOSFLoss
from ddpo_rl.objectives.rwr import RWRLoss, rwr_weights

LOSSES = ("ddpo_is", "ddpo_sf", "rwr")


def make_loss(name: str, actor, **kwargs):
    """Build a loss by name: "ddpo_is", "ddpo_sf" or "rwr"."""
    if name == "ddpo_is":
        return make_ddpo_is_loss(actor, **kwargs)
    if name == "ddpo_sf":
        return DDPOSFLoss(actor, **kwargs)
    if name == "rwr":
        return RWRLoss(actor, **kwargs)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


__all__ = [
    "LOSSES", "RATIO_FORMS", "CriticFreePGLoss", "DDPOSFLoss", "KLToReferenceLoss", "RWRLoss", "make_ddpo_is_loss", "make_dppo_loss",
    "make_loss", "rwr_weights",
]
