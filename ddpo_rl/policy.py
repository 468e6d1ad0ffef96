"""DiffusionPolicy: a noise-prediction network as a torchrl actor over denoising steps.

One policy step (state -> action)::

    (x_t, t, c) --noise model, with classifier-free guidance--> eps_theta
               --DDIM step as a Gaussian (ddpo_rl.ddim)-------> N(mu_theta, sigma_t^2)
               --sample (random exploration)-----------------> x_{t-1}, log pi(x_{t-1} | x_t, c)

:class:`DDIMGaussianHead` is the deterministic part (an ``nn.Module`` from tensors to
``(loc, scale)``); :class:`DiffusionPolicy` wraps it as a ``ProbabilisticActor`` that reads
:data:`KEYS` from a TensorDict and writes the action and its log-prob, so it plugs into
``env.rollout`` and into torchrl's losses (``ClipPPOLoss`` included) as any actor does.

The noise model is any ``nn.Module`` called as ``model(sample, timestep, encoder_hidden_states=c)``
that returns the prediction (a tensor, a tuple whose first item is it, or an object with
``.sample`` as diffusers' UNet2DConditionModel returns): Stable Diffusion's UNet, the embedded
digits UNet, or a small MLP conditioned on an observation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs.utils import ExplorationType
from torchrl.modules import ProbabilisticActor

from ddpo_rl.ddim import DDIMCoefficients, check_log_prob_defined, ddim_step_gaussian, ddim_timesteps
from ddpo_rl.distributions import DDIMGaussian
from ddpo_rl.keys import KEYS
from ddpo_rl.schedules import inference_timesteps  # noqa: F401  (re-exported: its old home)


def _prediction(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"the noise model returned {type(out).__name__}; expected a tensor, a tuple, or .sample")


def classifier_free_guidance(
    call: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    timestep: torch.Tensor,
    conditions: Sequence[torch.Tensor],
    negative_conditions: Sequence[torch.Tensor] | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The guided prediction ``out_u + w (out_c - out_u)`` (Ho & Salimans 2022), or ``out_c`` when w = 1.

    Shared by every policy head and the reference samplers (``sample_digits``, ``sample_flow_digits``).
    ``call(latents, timestep, *conditions)`` runs the network on one batch; with guidance, the
    unconditional and conditional halves run as ONE batch of 2B (the unconditional first), each
    negative condition ([1, ...] or [B, ...]) expanded to the batch.
    """
    if guidance_scale == 1.0:
        return call(latents, timestep, *conditions)
    b = latents.shape[0]
    both = []
    for cond, neg in zip(conditions, negative_conditions):
        neg = neg.to(cond.dtype)
        neg = neg.expand(b, *neg.shape[1:]) if neg.shape[0] == 1 else neg
        both.append(torch.cat([neg, cond]))
    out = call(torch.cat([latents, latents]), torch.cat([timestep, timestep]), *both)
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class DDIMGaussianHead(nn.Module):
    """(x_t, t, c) -> (mu_theta, sigma_t): the noise model followed by a DDIM step as a Gaussian.

    Args:
        noise_model: the network (see module docstring). Its parameters are the policy's.
        scheduler: a diffusers DDIMScheduler (or one with the same config fields).
        num_inference_steps: T, the number of denoising steps (sets t_prev = t - 1000/T).
        eta: DDIM stochasticity, > 0 (1.0 in the paper).
        guidance_scale: classifier-free guidance w; 1.0 disables it.
        negative_prompt_embeds: the unconditional embedding (the empty prompt's), [1, L, D] or
            [B, L, D]; needed when guidance_scale != 1. Held as a buffer: it is the same for
            every sample, so trajectories do not store it.
        min_std: floor on sigma_t (0 = none, the DDPO default). DPPO (Ren et al. 2024) floors the
            std of every denoising step (0.1 in normalised action units) so that late steps,
            whose DDIM std is tiny, still explore and keep a well-conditioned log-prob. The
            mean is unchanged; sampling and the log-prob use the floored std alike.
    """

    def __init__(
        self,
        noise_model: nn.Module,
        scheduler,
        num_inference_steps: int,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        negative_prompt_embeds: torch.Tensor | None = None,
        min_std: float = 0.0,
    ):
        super().__init__()
        if min_std < 0:
            raise ValueError(f"min_std={min_std} must be >= 0")
        self.noise_model = noise_model
        self.min_std = float(min_std)
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.num_inference_steps = int(num_inference_steps)
        coeffs = DDIMCoefficients.from_scheduler(scheduler, num_inference_steps)
        check_log_prob_defined(coeffs, ddim_timesteps(scheduler, num_inference_steps), eta)
        self._coeff_meta = dict(
            step_ratio=coeffs.step_ratio,
            prediction_type=coeffs.prediction_type,
            clip_sample=coeffs.clip_sample,
            clip_sample_range=coeffs.clip_sample_range,
        )
        self.register_buffer("alphas_cumprod", coeffs.alphas_cumprod, persistent=False)
        self.register_buffer("final_alpha_cumprod", coeffs.final_alpha_cumprod, persistent=False)
        if self.guidance_scale != 1.0 and negative_prompt_embeds is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs negative_prompt_embeds (the embedding of the "
                "empty prompt); pass it, or set guidance_scale=1.0 to disable classifier-free guidance."
            )
        self.register_buffer(
            "negative_prompt_embeds",
            None if negative_prompt_embeds is None else negative_prompt_embeds.detach().clone(),
            persistent=False,
        )

    @property
    def coeffs(self) -> DDIMCoefficients:
        return DDIMCoefficients(self.alphas_cumprod, self.final_alpha_cumprod, **self._coeff_meta)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The network's guided prediction for x_t: eps_u + w (eps_c - eps_u), or eps_c without CFG."""
        return classifier_free_guidance(
            lambda x, t, c: _prediction(self.noise_model(x, t, encoder_hidden_states=c)),
            latents,
            timestep,
            (prompt_embeds,),
            (self.negative_prompt_embeds,),
            self.guidance_scale,
        )

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model_output = self.predict(latents, timestep, prompt_embeds)
        mean, std = ddim_step_gaussian(self.coeffs, model_output, timestep, latents, self.eta)
        if self.min_std > 0:
            std = std.clamp(min=self.min_std)
        return mean, std


class GaussianStepActor(ProbabilisticActor):
    """A head (state -> ``(loc, scale)`` of the next latent) as a torchrl actor: samples the action
    from :class:`~ddpo_rl.distributions.DDIMGaussian` (the one log-prob reduction) and writes it
    with its log-prob. The base of :class:`DiffusionPolicy` and
    :class:`~ddpo_rl.flow_policy.FlowMatchingPolicy`, which only build their head.

    Args:
        head: an ``nn.Module`` called on the tensors of ``in_keys``, returning ``(loc, scale)``; it
            holds the network as ``noise_model`` and the chain length as ``num_inference_steps``.
        in_keys: the state's keys, in the head's argument order.
        log_prob_reduction: "mean" over the latent dims (default) or "sum".
        event_dim: trailing dims of one latent.
        distribution_kwargs: further :class:`~ddpo_rl.distributions.DDIMGaussian` arguments.
    """

    def __init__(
        self,
        head: nn.Module,
        in_keys: Sequence,
        *,
        log_prob_reduction: str = "mean",
        event_dim: int = 3,
        distribution_kwargs: dict | None = None,
    ):
        module = TensorDictModule(head, in_keys=list(in_keys), out_keys=[KEYS.loc, KEYS.scale])
        super().__init__(
            module,
            in_keys=[KEYS.loc, KEYS.scale],
            out_keys=[KEYS.action],
            distribution_class=DDIMGaussian,
            distribution_kwargs={"event_dim": event_dim, "reduction": log_prob_reduction, **(distribution_kwargs or {})},
            return_log_prob=True,
            log_prob_key=KEYS.log_prob,
            default_interaction_type=ExplorationType.RANDOM,
        )
        self.log_prob_reduction = log_prob_reduction

    @property
    def head(self) -> nn.Module:
        return self.module[0].module

    @property
    def num_inference_steps(self) -> int:
        """T, the chain length this policy's schedule was built for (checked against the env's)."""
        return self.head.num_inference_steps

    @property
    def noise_model(self) -> nn.Module:
        """The network (a flow policy's velocity model is named so too: recipes save either the same way)."""
        return self.head.noise_model


class DiffusionPolicy(GaussianStepActor):
    """A diffusion model as a torchrl actor: TensorDict in, next latent and its log-prob out.

    Reads ``latents``, ``timestep``, ``prompt_embeds`` (see :data:`ddpo_rl.keys.KEYS`), writes
    ``loc``, ``scale``, ``action`` (x_{t-1}) and ``action_log_prob``. Samples at random by
    default (``ExplorationType.RANDOM``): a rollout under ``torch.no_grad()`` collects DDPO
    trajectories with no further setting.

    Args:
        noise_model: the network (diffusers UNet2DConditionModel or any module with its call).
        scheduler: a DDIMScheduler; its config sets the alphas and the prediction type.
        num_inference_steps: T.
        eta: DDIM eta > 0.
        guidance_scale: classifier-free guidance scale (1.0 = none).
        negative_prompt_embeds: the unconditional prompt embedding, required with guidance.
        log_prob_reduction: "mean" over latent dims (the paper's, default) or "sum".
        event_dim: trailing dims of one latent (3 for [C, H, W]; 1 for an action vector).
        in_keys: override the (latents, timestep, condition) keys, e.g. for an observation key.
        min_std: floor on sigma_t (see :class:`DDIMGaussianHead`; 0 = none).
    """

    def __init__(
        self,
        noise_model: nn.Module,
        scheduler,
        num_inference_steps: int,
        *,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        negative_prompt_embeds: torch.Tensor | None = None,
        log_prob_reduction: str = "mean",
        event_dim: int = 3,
        in_keys: Sequence = (KEYS.latents, KEYS.timestep, KEYS.prompt_embeds),
        min_std: float = 0.0,
    ):
        head = DDIMGaussianHead(
            noise_model,
            scheduler,
            num_inference_steps,
            eta=eta,
            guidance_scale=guidance_scale,
            negative_prompt_embeds=negative_prompt_embeds,
            min_std=min_std,
        )
        super().__init__(head, in_keys, log_prob_reduction=log_prob_reduction, event_dim=event_dim)
