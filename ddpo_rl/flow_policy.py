"""FlowMatchingPolicy: a flow-matching network (SD3's transformer) as a torchrl actor over SDE steps.

One policy step (state -> action), the flow-matching twin of :mod:`ddpo_rl.policy`::

    (x_t, k, c, c_pooled) --velocity model, with classifier-free guidance--> v_theta
                         --Flow-GRPO SDE step as a Gaussian (ddpo_rl.flow_sde)--> N(mu_theta, std_k^2)
                         --sample (random exploration)--> x_{t+dt}, log pi(x_{t+dt} | x_t, c)

The state carries the step index k (``KEYS.step_index``), not the float timestep: the head
looks up t = sigmas[k], t + dt = sigmas[k + 1] and the network's timestep in its own schedule
(exact, no float matching). The env, the collector, :class:`~ddpo_rl.trainer.DDPOTrainer` and
the three losses (DDPO-IS = ClipPPOLoss, DDPO-SF, RWR) see the same TensorDict interface as
with :class:`~ddpo_rl.policy.DiffusionPolicy`: ``loc``, ``scale``, ``action``, ``action_log_prob``
from :class:`~ddpo_rl.distributions.DDIMGaussian` (the one log-prob reduction).

The velocity model is diffusers' ``SD3Transformer2DModel``, a ``UNet2DConditionModel`` trained for the
velocity (the digits-flow model; ``pooled=False``), or any module called as
``model(x, timestep=t, encoder_hidden_states=c, pooled_projections=p)`` (without
``pooled_projections`` when ``pooled=False``) returning the velocity (a tensor, a tuple whose
first item is it, or an object with ``.sample``). LoRA: add a peft adapter to the transformer
(:func:`ddpo_rl.lora.apply_lora` with SD3's attention projections) before building the policy.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ddpo_rl.flow_sde import (
    FlowSchedule,
    check_flow_log_prob_defined,
    flow_mixed_step_gaussian,
    flow_schedule,
    flow_sde_step_gaussian,
    sde_window_mask,
)
from ddpo_rl.keys import KEYS
from ddpo_rl.policy import GaussianStepActor, _prediction, classifier_free_guidance


class FlowSDEHead(nn.Module):
    """(x_t, k, c[, c_pooled]) -> (mu_theta, std_k): the velocity model, then one SDE step as a Gaussian.

    Args:
        velocity_model: the network (see the module docstring). Its parameters are the policy's.
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` (its shift included).
        num_inference_steps: T.
        noise_level: Flow-GRPO's a > 0 (0.7 in the paper): sigma_t = a sqrt(t / (1 - t)).
        guidance_scale: classifier-free guidance w; 1.0 disables it.
        negative_prompt_embeds: the unconditional (empty-prompt) embedding, [1, L, D] or [B, L, D];
            needed when guidance_scale != 1.
        negative_pooled_prompt_embeds: its pooled embedding, [1, D_pooled]; needed with guidance
            when ``pooled`` is True.
        pooled: pass ``pooled_projections`` to the network (SD3: True).
        sde_window_size: None or 0: every step is an SDE step (Flow-GRPO). W > 0: only steps
            ``sde_window_start .. sde_window_start + W - 1`` are (MixGRPO / Flow-GRPO-Fast); the others
            are deterministic Euler ODE steps (std 0), see :func:`ddpo_rl.flow_sde.flow_mixed_step_gaussian`.
        sde_window_start: first step of the window (0 = the noisiest).
    """

    def __init__(
        self,
        velocity_model: nn.Module,
        scheduler,
        num_inference_steps: int,
        noise_level: float = 0.7,
        guidance_scale: float = 1.0,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        pooled: bool = True,
        sde_window_size: int | None = None,
        sde_window_start: int = 0,
    ):
        super().__init__()
        schedule = flow_schedule(scheduler, num_inference_steps)  # checks the scheduler's family
        check_flow_log_prob_defined(schedule, noise_level)
        self.noise_model = velocity_model
        self.noise_level = float(noise_level)
        self.guidance_scale = float(guidance_scale)
        self.num_inference_steps = int(num_inference_steps)
        self.pooled = bool(pooled)
        self.register_buffer("timesteps", schedule.timesteps, persistent=False)
        self.register_buffer("sigmas", schedule.sigmas, persistent=False)
        self.windowed = bool(sde_window_size)
        self.register_buffer(
            "sde_steps", sde_window_mask(self.num_inference_steps, sde_window_size, sde_window_start), persistent=False
        )
        if self.uses_guidance:
            missing = "negative_prompt_embeds" if negative_prompt_embeds is None else None
            if missing is None and self.pooled and negative_pooled_prompt_embeds is None:
                missing = "negative_pooled_prompt_embeds"
            if missing:
                raise ValueError(
                    f"{missing}: guidance_scale={guidance_scale} needs the empty prompt's embeddings; pass "
                    "them, or set guidance_scale=1.0 to disable classifier-free guidance"
                )
        for name, value in (
            ("negative_prompt_embeds", negative_prompt_embeds),
            ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds),
        ):
            self.register_buffer(name, None if value is None else value.detach().clone(), persistent=False)

    @property
    def schedule(self) -> FlowSchedule:
        return FlowSchedule(self.timesteps, self.sigmas)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0

    def _call(self, latents, timestep, prompt_embeds, pooled=None) -> torch.Tensor:
        kwargs = {"pooled_projections": pooled} if self.pooled else {}
        out = self.noise_model(latents, timestep=timestep, encoder_hidden_states=prompt_embeds, **kwargs)
        return _prediction(out)

    def predict(self, latents, step_index, prompt_embeds, pooled_prompt_embeds=None) -> torch.Tensor:
        """The network's guided velocity at x_t (step k of the schedule)."""
        timestep = self.timesteps[step_index]
        conds = (prompt_embeds, pooled_prompt_embeds) if self.pooled else (prompt_embeds,)
        negs = (self.negative_prompt_embeds, self.negative_pooled_prompt_embeds)[: len(conds)]
        return classifier_free_guidance(self._call, latents, timestep, conds, negs, self.guidance_scale)

    def forward(
        self,
        latents: torch.Tensor,
        step_index: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pooled and pooled_prompt_embeds is None:
            raise ValueError(
                f"{KEYS.pooled_prompt_embeds}: the flow policy was built with pooled=True but got no pooled "
                "embedding; the prompt encoder must return it (or build the policy with pooled=False)"
            )
        k = step_index.long()
        velocity = self.predict(latents, k, prompt_embeds, pooled_prompt_embeds)
        sigmas = self.sigmas
        if self.windowed:  # SDE inside the window, Euler ODE (std 0) outside
            return flow_mixed_step_gaussian(
                velocity, sigmas[k], sigmas[k + 1], latents, self.noise_level, self.schedule.sigma_max, self.sde_steps[k]
            )
        return flow_sde_step_gaussian(
            velocity, sigmas[k], sigmas[k + 1], latents, self.noise_level, self.schedule.sigma_max
        )

    @property
    def trained_steps(self) -> tuple[int, ...] | None:
        """The step indices that carry a log-probability (the SDE window), or None when all do."""
        return tuple(torch.nonzero(self.sde_steps.cpu()).flatten().tolist()) if self.windowed else None


def _split_negative(negative_prompt_embeds, negative_pooled_prompt_embeds):
    """Accept the negative embeddings as a mapping of KEYS (what an encoder returns) or as tensors."""
    if isinstance(negative_prompt_embeds, Mapping):
        neg = negative_prompt_embeds
        return neg[KEYS.prompt_embeds], neg.get(KEYS.pooled_prompt_embeds, negative_pooled_prompt_embeds)
    return negative_prompt_embeds, negative_pooled_prompt_embeds


class FlowMatchingPolicy(GaussianStepActor):
    """A flow-matching model as a torchrl actor: TensorDict in, next latent and its log-prob out.

    Reads ``latents``, ``step_index``, ``prompt_embeds`` and (SD3) ``pooled_prompt_embeds`` (see
    :data:`ddpo_rl.keys.KEYS`); writes ``loc``, ``scale``, ``action`` (x_{t+dt}) and
    ``action_log_prob``. Samples at random by default, like :class:`~ddpo_rl.policy.DiffusionPolicy`.

    Args:
        velocity_model: ``SD3Transformer2DModel`` or any module with its call (module docstring).
        scheduler: a ``FlowMatchEulerDiscreteScheduler``; anything else is refused with a one-line error.
        num_inference_steps: T.
        noise_level: Flow-GRPO's a > 0 (0.7 in the paper).
        guidance_scale: classifier-free guidance scale (1.0 = none).
        negative_prompt_embeds: the unconditional embedding (a tensor, or the encoder's mapping
            holding ``prompt_embeds`` and ``pooled_prompt_embeds``), required with guidance.
        negative_pooled_prompt_embeds: the unconditional pooled embedding (if not in the mapping).
        pooled: the network takes ``pooled_projections`` (SD3: True).
        log_prob_reduction: "mean" over latent dims (default, as DDIM's) or "sum".
        sde_window_size, sde_window_start: train only a window of the steps (see :class:`FlowSDEHead`);
            the ODE steps outside it store log-prob 0 and are left out of training
            (:attr:`trained_steps`, read by the recipe's :class:`~ddpo_rl.trainer.TrainConfig`).
        event_dim: trailing dims of one latent (3 for [C, H, W]).
        in_keys: override the (latents, step index, condition[, pooled]) keys.
    """

    def __init__(
        self,
        velocity_model: nn.Module,
        scheduler,
        num_inference_steps: int,
        *,
        noise_level: float = 0.7,
        guidance_scale: float = 1.0,
        negative_prompt_embeds: torch.Tensor | Mapping | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        pooled: bool = True,
        log_prob_reduction: str = "mean",
        sde_window_size: int | None = None,
        sde_window_start: int = 0,
        event_dim: int = 3,
        in_keys: Sequence | None = None,
    ):
        neg, neg_pooled = _split_negative(negative_prompt_embeds, negative_pooled_prompt_embeds)
        head = FlowSDEHead(
            velocity_model,
            scheduler,
            num_inference_steps,
            noise_level=noise_level,
            guidance_scale=guidance_scale,
            negative_prompt_embeds=neg,
            negative_pooled_prompt_embeds=neg_pooled,
            pooled=pooled,
            sde_window_size=sde_window_size,
            sde_window_start=sde_window_start,
        )
        if in_keys is None:
            in_keys = [KEYS.latents, KEYS.step_index, KEYS.prompt_embeds]
            if pooled:
                in_keys.append(KEYS.pooled_prompt_embeds)
        super().__init__(
            head, in_keys, log_prob_reduction=log_prob_reduction, event_dim=event_dim,
            # the ODE steps outside the SDE window are point masses: log-prob 0, not trained
            distribution_kwargs={"point_mass_log_prob": 0.0} if sde_window_size else None,
        )

    @property
    def trained_steps(self) -> tuple[int, ...] | None:
        """The steps to train on: the SDE window's (None: all T steps)."""
        return self.head.trained_steps
