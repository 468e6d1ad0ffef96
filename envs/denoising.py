"""Denoising as a torchrl environment: the DDPO MDP.

    state  s_k = (x_t, t, k, c) t = timesteps[k], k = 0..T-1; c = prompt embedding(s)
    action a_k = x_{t-1}        (sampled by the policy: a DDIM Gaussian, or a flow-matching SDE step)
    step       x <- a_k, k <- k + 1; done when k = T (x is then x_0, the sample)
    reward     0 until the last step; the last one comes from a reward transform
               (ddpo_rl.rewards.transform.RewardTransform), so one env serves every reward.

The env is batched [B] and all B chains move in lockstep: reset draws B prompts and B
Gaussian latents x_T; every step advances all of them. The schedule (the timesteps) is the
scheduler family's (:func:`ddpo_rl.schedules.inference_timesteps`: DDIM or flow matching), the
same function the policy uses.

Prompt embeddings are encoded at reset, in batches, for the prompts drawn, and kept in a bounded
LRU cache (:class:`ddpo_rl.text.PromptEmbeddingCache`): prompt sets of tens of thousands of
prompts need memory for ``prompt_cache_size`` prompts only. Reset reads the drawn prompt ids
on the host once (to look the strings up); the steps never do. The encoder may return one
tensor (``prompt_embeds``) or a mapping of keys (SD3: ``prompt_embeds`` and
``pooled_prompt_embeds``); the env carries every key it returns, unchanged, through the chain.

GRPO-style groups: with ``group_size`` G > 1, reset draws B / G prompts and gives each to G
consecutive chains, so every batch holds whole groups (see :func:`ddpo_rl.advantages.group_advantages`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from ddpo_rl.keys import KEYS
from ddpo_rl.prompts import PromptSource
from ddpo_rl.schedules import inference_timesteps
from ddpo_rl.text import PromptEmbeddingCache


class DenoisingEnv(EnvBase):
    """Sampling from a diffusion model as a T-step MDP with terminal reward.

    Args:
        prompts: a :class:`~ddpo_rl.prompts.PromptSource` (or a list of prompt strings).
        encode_prompts: a callable ``list[str] -> Tensor [N, L, D]`` (e.g.
            :class:`ddpo_rl.text.PromptEncoder`) or ``-> {key: Tensor [N, ...]}`` (SD3: prompt and
            pooled embeddings), called at reset on the drawn prompts missing from the cache.
        scheduler: the diffusers scheduler whose timesteps the chain visits (DDIMScheduler or
            FlowMatchEulerDiscreteScheduler): the policy's.
        num_inference_steps: T.
        latent_shape: (C, H, W) of one latent.
        batch_size: B, the number of chains sampled at once.
        device: where the latents live.
        latent_dtype: dtype of the latents (float32, or half on GPU).
        init_noise_sigma: scale of x_T (the scheduler's ``init_noise_sigma``, 1.0 for DDIM).
        prompt_order: "random" (uniform draws, for training) or "cycle" (chain i gets prompt
            i mod N, for evaluation grids with fixed prompts).
        group_size: G; each drawn prompt goes to G consecutive chains (1 = off). Must divide B.
        prompt_cache_size: the most prompts whose embeddings are kept (LRU).
        encode_batch_size: prompts per call to ``encode_prompts``.
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
        group_size: int | None = 1,
        prompt_cache_size: int = 1024,
        encode_batch_size: int = 64,
    ):
        group_size = int(group_size or 1)
        if group_size < 1 or batch_size % group_size:
            raise ValueError(
                f"group_size: {group_size} must be >= 1 and divide the batch size {batch_size} (every batch "
                "holds whole groups of samples of one prompt)"
            )
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
        self.group_size = group_size
        self.latent_shape = torch.Size(latent_shape)
        self.latent_dtype = latent_dtype
        self.init_noise_sigma = float(
            init_noise_sigma if init_noise_sigma is not None else getattr(scheduler, "init_noise_sigma", 1.0)
        )
        self.timesteps = inference_timesteps(scheduler, num_inference_steps).to(self.device)
        self.prompt_cache = PromptEmbeddingCache(
            encode_prompts, capacity=prompt_cache_size, batch_size=encode_batch_size, device=self.device
        )
        example = self.prompt_cache(self.prompt_source.prompts[:1])  # the condition's keys, shapes, dtypes
        self.condition_keys = tuple(example)
        self._condition_example = {k: v[0] for k, v in example.items()}
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
                KEYS.timestep: Unbounded(shape=B, dtype=self.timesteps.dtype, device=self.device),
                KEYS.step_index: Bounded(0, T, shape=B, dtype=torch.int64, device=self.device),
                **{
                    key: Unbounded(shape=B + ex.shape, dtype=ex.dtype, device=self.device)
                    for key, ex in self._condition_example.items()
                },
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

    def embed_prompts(self, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{key: Tensor [n, ...]}``: the condition (prompt embeddings, pooled ones if any) of prompt ids [n],
        from the cache (encoding the missing ones). One host read of the ids."""
        return self.prompt_cache(self.prompts_of(prompt_ids))

    def _draw_prompt_ids(self) -> torch.Tensor:
        n = self.batch_size[0] // self.group_size
        if self.prompt_order == "cycle":
            ids = torch.arange(n, device=self.device) % len(self.prompt_source)
        else:
            ids = self.prompt_source.sample(n, generator=self._rng, device=self.device)
        return ids.repeat_interleave(self.group_size) if self.group_size > 1 else ids

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        B = self.batch_size
        ids = self._draw_prompt_ids()
        latents = torch.randn(
            B + self.latent_shape, generator=self._rng, device=self.device, dtype=self.latent_dtype
        ) * self.init_noise_sigma
        self._k = 0
        return TensorDict(
            {
                KEYS.latents: latents,
                KEYS.timestep: self.timesteps[0].expand(B).clone(),
                KEYS.step_index: torch.zeros(B, dtype=torch.int64, device=self.device),
                **self.embed_prompts(ids),
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
                **{key: tensordict[key] for key in self.condition_keys},
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
