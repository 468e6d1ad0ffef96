"""KL regularisation to the reference policy: a LossModule that adds ``loss_kl`` to any DDPO loss.

    L = L_inner + beta * E_s[ KL(pi_theta(. | s) || pi_ref(. | s)) ]

The reference pi_ref is the model before fine-tuning. At a denoising state s = (x_t, t, c) both
policies are DDIM Gaussians with the same sigma_t (or, for the flow-matching family, Flow-GRPO SDE
Gaussians with the same std sigma_t sqrt(|dt|): it depends on the schedule and the noise level only),
so the KL is ||mu_theta - mu_ref||^2 / (2 sigma_t^2) per latent dim, reduced over the latent dims like
the log-probs (:func:`ddpo_rl.ddim.gaussian_kl`). The head is the policy's own (``DDIMGaussianHead`` or
``FlowSDEHead``), so the reference forward uses the same family's step.

The states s are exactly those at which the inner loss evaluated the policy: a forward hook on the
policy's :class:`~ddpo_rl.policy.DDIMGaussianHead` records its inputs and its (mu_theta, sigma_t)
while the inner loss runs, so mu_theta costs no second forward pass and carries the inner loss's
graph; the reference then runs once on the same inputs, without gradient. This works unchanged for
DDPO-IS (torchrl's ``ClipPPOLoss``), DDPO-SF, RWR and DPPO (``ClipPPOLoss`` on the step policy, or on
the chain actor: the KL is then averaged over the K steps of every chain).

Two references, neither of which is trained:

- ``"adapters"`` (LoRA): the same network with its peft adapters disabled for the reference forward
  (diffusers' ``disable_adapters()`` / ``enable_adapters()``, or peft's ``disable_adapter()`` context
  on a ``PeftModel``). No second copy of the weights.
- ``"copy"`` (full fine-tuning, e.g. the digits preset): a frozen deep copy of the head taken when the
  loss is built. It costs one more copy of the noise model's parameters in memory (the UNet's
  parameter bytes: 4 x 0.8M = 3.2 MB for the digits UNet in float32, 3.4 GB for SD 1.5's UNet).
  Build the loss before loading a checkpoint to resume from, so the copy is the pretrained model.

Outputs: the inner loss's entries plus ``loss_kl`` (= beta * KL, summed into the loss by
:class:`~ddpo_rl.trainer.DDPOTrainer` like every ``loss_*`` entry) and ``kl_to_reference`` (the KL
itself, detached, for logging).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import dispatch
from torch import nn
from torchrl.objectives import LossModule

from ddpo_rl.ddim import gaussian_kl

REFERENCES = ("auto", "adapters", "copy")


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapters (a diffusers model with ``add_adapter``, or a PeftModel)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False)) or callable(getattr(model, "disable_adapter", None))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base network: peft adapters off inside the block, back on after.

    diffusers models (``PeftAdapterMixin``) use ``disable_adapters()`` / ``enable_adapters()``; a peft
    ``PeftModel`` its ``disable_adapter()`` context manager.
    """
    if getattr(model, "_hf_peft_config_loaded", False):
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
    elif callable(getattr(model, "disable_adapter", None)):
        with model.disable_adapter():
            yield model
    else:
        raise TypeError(f"{type(model).__name__} has no peft adapters to disable")


def reference_memory_bytes(head: nn.Module) -> int:
    """Bytes a frozen copy of ``head`` costs (its parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in list(head.parameters()) + list(head.buffers()))


class KLToReferenceLoss(LossModule):
    """Wrap a loss module: add ``loss_kl = kl_coef * KL(pi_theta || pi_ref)`` to its output.

    Args:
        loss_module: the inner loss (DDPO-IS ``ClipPPOLoss``, ``DDPOSFLoss``, ``RWRLoss``, DPPO's
            ``ClipPPOLoss``): any LossModule that evaluates the policy's head once per call.
        head: the policy's :class:`~ddpo_rl.policy.DDIMGaussianHead` (``DiffusionPolicy.head``, or
            ``DenoisingChainActor.head``), called by the inner loss as ``head(x_t, t, c)``.
        kl_coef: beta >= 0. With 0 the reference never runs (no copy is made) and ``loss_kl`` is 0
            (the paper's setting; the recipes then do not wrap the loss at all).
        reference: "adapters" (LoRA: disable them for the reference), "copy" (a frozen copy of the
            head, made now) or "auto" (adapters when the noise model has peft adapters, else copy).
        event_dim: latent dims of one sample (3 for [C, H, W], 1 for action vectors).
        reduction: "mean" or "sum" over the latent dims: the policy's log-prob reduction.
        sigma_scale: s >= 0. 0: the penalty is the exact KL. s > 0: each step's KL is weighted by
            ``1 + sigma_t^2 / s^2`` (see :meth:`step_weights`).

    ``on_policy`` and ``prepare_batch`` are those of the inner loss, so the trainer treats the
    wrapped loss as it treats the inner one.
    """

    @dataclass
    class _AcceptedKeys:
        """No keys of its own: the KL is taken at the states the inner loss reads."""

    default_keys = _AcceptedKeys

    def __init__(
        self,
        loss_module: LossModule,
        head: nn.Module,
        kl_coef: float,
        reference: str = "auto",
        event_dim: int = 3,
        reduction: str = "mean",
        sigma_scale: float = 0.0,
    ):
        super().__init__()
        if not sigma_scale >= 0:
            raise ValueError(f"sigma_scale={sigma_scale} must be >= 0")
        self.sigma_scale = float(sigma_scale)
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef={kl_coef} must be >= 0")
        if reference not in REFERENCES:
            raise ValueError(f"reference={reference!r}; expected one of {REFERENCES}")
        self.loss_module = loss_module
        self.kl_coef = float(kl_coef)
        self.event_dim, self.reduction = int(event_dim), reduction
        self.on_policy = bool(getattr(loss_module, "on_policy", False))
        self._head = [head]  # not a submodule: its parameters belong to the policy (and the inner loss)
        if reference == "auto":
            reference = "adapters" if has_adapters(head.noise_model) else "copy"
        self.reference = reference
        self.reference_head = None
        if reference == "copy" and self.kl_coef > 0:
            self.reference_head = copy.deepcopy(head).requires_grad_(False).eval()
        elif reference == "adapters" and not has_adapters(head.noise_model):
            raise ValueError("reference='adapters' needs a noise model with peft (LoRA) adapters; use 'copy'")
        self._calls: list[tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = []
        self._recording = False
        self._hook = head.register_forward_hook(self._record)

    @property
    def head(self) -> nn.Module:
        return self._head[0]

    def _record(self, module, args, output) -> None:
        if self._recording:
            self._calls.append((args, output))

    @property
    def in_keys(self):
        return self.loss_module.in_keys

    @property
    def out_keys(self):
        return [*self.loss_module.out_keys, "loss_kl", "kl_to_reference"]

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def prepare_batch(self, batch: TensorDictBase) -> TensorDictBase:
        prepare = getattr(self.loss_module, "prepare_batch", None)
        return prepare(batch) if prepare is not None else batch

    @torch.no_grad()
    def reference_mean(self, *head_inputs) -> torch.Tensor:
        """mu_ref at the head's inputs (x_t, t, c): the pre-fine-tuning model's DDIM mean."""
        if self.reference == "adapters":
            with adapters_disabled(self.head.noise_model):
                return self.head(*head_inputs)[0]
        if self.reference_head is None:
            raise RuntimeError("no reference copy: the loss was built with kl_coef=0")
        return self.reference_head(*head_inputs)[0]

    def kl(self, loc: torch.Tensor, scale: torch.Tensor, head_inputs) -> torch.Tensor:
        """KL(pi_theta || pi_ref) [N] at the states ``head_inputs``, given pi_theta's (loc, scale) there."""
        ref = self.reference_mean(*head_inputs)
        return gaussian_kl(loc, ref, scale, self.event_dim, self.reduction)

    def step_weights(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights [N] of the KL in the penalty: ``1 + sigma_t^2 / s^2`` (None when s = 0).

        The exact KL weighs the squared mean difference by 1 / (2 sigma_t^2): the last, nearly
        deterministic steps dominate it (digits, DDIM T=10, eta 1: sigma_t falls from 0.91 to 0.0074,
        a factor ~10^4 in weight) and the early steps, which decide what the image shows, are barely
        held. The weight adds ``||mu_theta - mu_ref||^2 / (2 s^2)``: the same pull at every step, which
        dominates where sigma_t > s. Not a KL any more (a weighted sum of per-step KLs, as the chain
        KL bounds of DPOK-style regularisers are); ``kl_to_reference`` still logs the exact KL.
        """
        if self.sigma_scale == 0:
            return None
        var = scale.float().expand_as(loc) ** 2  # sigma_t^2: the same for every latent dim of a sample
        return 1 + var.flatten(loc.dim() - self.event_dim).amax(-1) / self.sigma_scale**2

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._calls = []
        self._recording = self.kl_coef > 0
        try:
            out = self.loss_module(tensordict)
        finally:
            self._recording = False
        calls, self._calls = self._calls, []
        if self.kl_coef == 0:  # off: no reference forward, nothing to log
            out.set("loss_kl", torch.zeros((), device=next(iter(self.head.buffers())).device))
            return out
        if not calls:
            raise RuntimeError(
                f"{type(self.loss_module).__name__} did not evaluate the policy head: the KL to the "
                "reference needs the head the inner loss calls (pass DiffusionPolicy.head)"
            )
        kls, penalties = [], []
        for args, (loc, scale) in calls:
            kl = self.kl(loc, scale, args)
            w = self.step_weights(loc, scale)
            kls.append(kl.reshape(-1))
            penalties.append((kl if w is None else kl * w).reshape(-1))
        kl, penalty = torch.cat(kls).mean(), torch.cat(penalties).mean()
        out.set("loss_kl", self.kl_coef * penalty)
        out.set("kl_to_reference", kl.detach())  # the exact KL, whatever the weights
        return out
