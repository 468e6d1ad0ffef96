"""Denoising as a torchrl environment: the DDPO MDP.

    state  s_k = (x_t, t, c)    t = timesteps[k], k = 0..T-1; c = prompt embedding
    action a_k = x_{t-1}        (sampled by the policy from the DDIM Gaussian)
    step       x <- a_k, k <- k + 1; done when k = T (x is then x_0, the sample)
    reward     0 until the last step; the last one comes from a reward transform
               (ddpo_rl.rewards.transform.RewardTransform), so one env serves every reward.

The env is batched [B] and all B chains move in lockstep: reset draws B prompts and B
Gaussian latents x_T; every step advances all of them. Prompt embeddings are computed once
per prompt at construction (the prompt set is finite), so reset is an index lookup.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from ddpo_rl.keys import KEYS
from ddpo_rl.policy import inference_timesteps
from ddpo_rl.prompts import PromptSource


class DenoisingEnv(EnvBase):
    """Sampling from a diffusion model as a T-step MDP with terminal reward.

    Args:
        prompts: a :class:`~ddpo_rl.prompts.PromptSource` (or a list of prompt strings).
        encode_prompts: a callable ``list[str] -> Tensor [N, L, D]`` (e.g.
            :class:`ddpo_rl.text.PromptEncoder`), called once on all prompts.
        scheduler: the diffusers DDIMScheduler whose timesteps the chain visits.
        num_inference_steps: T.
        latent_shape: (C, H, W) of one latent.
        batch_size: B, the number of chains sampled at once.
        device: where the latents live.
        latent_dtype: dtype of the latents (float32, or half on GPU).
        init_noise_sigma: scale of x_T (the scheduler's ``init_noise_sigma``, 1.0 for DDIM).
        prompt_order: "random" (uniform draws, for training) or "cycle" (chain i gets prompt
            i mod N, for evaluation grids with fixed prompts).
    """

    def __init__(
        self,
        prompts: PromptSource | Sequence[str],
        encode_prompts: Callable[[list[str]], torch.Tensor],
        scheduler,
        num_inference_steps: int,
        latent_shape: Sequence[int],
        batch_size: int,
        device: torch.device | str = "cpu",
        latent_dtype: torch.dtype = torch.float32,
        init_noise_sigma: float | None = None,
        prompt_order: str = "random",
    ):
        if prompt_order not in ("random", "cycle"):
            raise ValueError(f"prompt_order={prompt_order!r}; expected 'random' or 'cycle'")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be positive")
        super().__init__(batch_size=torch.Size([batch_size]), device=device)
        self.prompt_source = prompts if isinstance(prompts, PromptSource) else PromptSource(prompts)
        self.num_inference_steps = int(num_inference_steps)
        self.prompt_order = prompt_order
        self.latent_shape = torch.Size(latent_shape)
        self.latent_dtype = latent_dtype
        self.init_noise_sigma = float(
            init_noise_sigma if init_noise_sigma is not None else getattr(scheduler, "init_noise_sigma", 1.0)
        )
        self.timesteps = inference_timesteps(scheduler, num_inference_steps).to(self.device)
        with torch.no_grad():
            table = encode_prompts(self.prompt_source.prompts)
        self.prompt_embeds_table = table.detach().to(self.device)
        self._rng = torch.Generator(device=self.device)
        self._rng.seed()
        self._k = 0  # host-side step counter; all chains move in lockstep
        self._make_specs()

    # -- specs -------------------------------------------------------------------------------
    def _make_specs(self) -> None:
        B, T = self.batch_size, self.num_inference_steps
        latent = Unbounded(shape=B + self.latent_shape, dtype=self.latent_dtype, device=self.device)
        self.observation_spec = Composite(
            {
                KEYS.latents: latent,
                KEYS.timestep: Unbounded(shape=B, dtype=torch.int64, device=self.device),
                KEYS.step_index: Bounded(0, T, shape=B, dtype=torch.int64, device=self.device),
                KEYS.prompt_embeds: Unbounded(
                    shape=B + self.prompt_embeds_table.shape[1:],
                    dtype=self.prompt_embeds_table.dtype,
                    device=self.device,
                ),
                KEYS.prompt_id: Categorical(len(self.prompt_source), shape=B, dtype=torch.int64, device=self.device),
            },
            shape=B,
            device=self.device,
        )
        self.action_spec = latent.clone()
        self.reward_spec = Unbounded(shape=B + (1,), dtype=torch.float32, device=self.device)

    # -- MDP ---------------------------------------------------------------------------------
    @property
    def at_final_step(self) -> bool:
        """True right after the step that produced x_0 (host-side, no device sync)."""
        return self._k >= self.num_inference_steps

    def prompts_of(self, prompt_ids: torch.Tensor) -> list[str]:
        return self.prompt_source.lookup(prompt_ids)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        B = self.batch_size
        if self.prompt_order == "cycle":
            ids = torch.arange(B[0], device=self.device) % len(self.prompt_source)
        else:
            ids = self.prompt_source.sample(B[0], generator=self._rng, device=self.device)
        latents = torch.randn(
            B + self.latent_shape, generator=self._rng, device=self.device, dtype=self.latent_dtype
        ) * self.init_noise_sigma
        self._k = 0
        return TensorDict(
            {
                KEYS.latents: latents,
                KEYS.timestep: self.timesteps[0].expand(B).clone(),
                KEYS.step_index: torch.zeros(B, dtype=torch.int64, device=self.device),
                KEYS.prompt_embeds: self.prompt_embeds_table[ids],
                KEYS.prompt_id: ids,
                KEYS.done: torch.zeros(B + (1,), dtype=torch.bool, device=self.device),
                KEYS.terminated: torch.zeros(B + (1,), dtype=torch.bool, device=self.device),
            },
            batch_size=B,
            device=self.device,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        B, T = self.batch_size, self.num_inference_steps
        self._k += 1
        k = tensordict[KEYS.step_index] + 1
        done = (k >= T).unsqueeze(-1)
        return TensorDict(
            {
                KEYS.latents: tensordict[KEYS.action].to(self.latent_dtype),
                KEYS.timestep: self.timesteps[k.clamp(max=T - 1)],
                KEYS.step_index: k,
                KEYS.prompt_embeds: tensordict[KEYS.prompt_embeds],
                KEYS.prompt_id: tensordict[KEYS.prompt_id],
                KEYS.reward: torch.zeros(B + (1,), dtype=torch.float32, device=self.device),
                KEYS.done: done,
                KEYS.terminated: done.clone(),
            },
            batch_size=B,
            device=self.device,
        )

    def _set_seed(self, seed: int | None) -> None:
        if seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(int(seed))
