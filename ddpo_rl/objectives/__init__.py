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


LOSS_OPTIONS: dict[str, dict[str, str]] = {
    "ddpo_is": {"clip_epsilon": "clip_epsilon"},
    "ddpo_sf": {},
    "rwr": {"rwr_mode": "mode", "rwr_temperature": "temperature", "rwr_quantile": "quantile"},
}
"""For each loss, the run settings it takes (setting name -> the loss's keyword)."""


def loss_kwargs(name: str, **settings) -> dict:
    """The keyword arguments of loss ``name`` among a run's loss ``settings`` (those of
    :data:`LOSS_OPTIONS`; the others belong to other losses and are left out)."""
    if name not in LOSS_OPTIONS:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
    return {kw: settings[setting] for setting, kw in LOSS_OPTIONS[name].items() if setting in settings}


def make_loss(name: str, actor, **kwargs):
    """Build a loss by name: "ddpo_is", "ddpo_sf" or "rwr" (``kwargs``: the loss's own, see :func:`loss_kwargs`)."""
    if name == "ddpo_is":
        return make_ddpo_is_loss(actor, **kwargs)
    if name == "ddpo_sf":
        return DDPOSFLoss(actor, **kwargs)
    if name == "rwr":
        return RWRLoss(actor, **kwargs)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


__all__ = [
    "LOSSES", "LOSS_OPTIONS", "RATIO_FORMS", "CriticFreePGLoss", "DDPOSFLoss", "KLToReferenceLoss", "RWRLoss", "make_ddpo_is_loss", "make_dppo_loss",
    "loss_kwargs", "make_loss", "rwr_weights",
]
