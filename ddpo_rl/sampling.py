"""Fast trajectory sampling: the DDPO sampling loop on static buffers, replayed as a CUDA graph.

:func:`ddpo_rl.collector.collect_trajectories` runs ``env.rollout(T, policy)``: per denoising
step, torchrl builds TensorDicts, runs the actor's TensorDictModule / distribution machinery,
the env's ``_step`` and the transforms, and stacks the T step TensorDicts at the end. That is
flexible, and on a GPU each of those Python operations launches small kernels and waits on
the interpreter: with a 50-step loop of a UNet the launch overhead and gaps add up.

:class:`FastSampler` computes the SAME thing (same env, same policy parameters, same math, same
random draws) on preallocated buffers::

    once per batch (eager):  env.reset() -> prompt ids, x_T, prompt embeddings   (the env's RNG)
                             T step noises z_k ~ N(0, I) drawn into a static buffer
    T times (one graph):     eps = CFG(noise_model(x, t_k, c))           (policy forward)
                             mean, std = DDIM Gaussian(eps, t_k, x)      (ddpo_rl.ddim)
                             a = mean + z_k * std;  log pi(a | x)        (sample, log-prob)
                             trajectory[:, k] <- (x, a, log-prob);  x <- a;  k <- k + 1  (env step)
    once per batch (eager):  reward = RewardTransform.score(x_0, prompts)  (decode + reward model)

and returns a TensorDict [N, T] with exactly :data:`ddpo_rl.collector.TRAJECTORY_KEYS`, so the
trainer consumes either.

Why a raw ``torch.cuda.CUDAGraph`` (and not tensordict's ``CudaGraphModule`` or
``torch.compile(mode="reduce-overhead")``):

- the whole step, bookkeeping included, reads and writes static buffers only: the step index k
  is a device tensor, the timestep and the noise are gathered with it (``index_select``) and the
  trajectory is written with ``index_copy_``. One ``graph.replay()`` per step is then the only
  host work: no per-step input copies, no Python per step. ``CudaGraphModule`` copies a
  TensorDict of inputs into its static inputs and clones the outputs on every call, which is
  the very per-step overhead we want gone, and it counts warm-up *calls*, which couples it to
  how often the loop has run;
- ``torch.compile(mode="reduce-overhead")`` compiles (minutes for an SD UNet, recompiles when
  guards change) and its cudagraph trees hold their own memory pools and would have to be
  tuned without a GPU to test on: the raw graph is explicit about what is static;
- on CPU the same step function runs eagerly, so the CPU tests exercise exactly the code that
  is captured on GPU (only the capture itself is GPU-only).

Rules the step function obeys so that capture is correct: static shapes (the env's batch size,
T and latent shape are fixed), no host synchronisation (no ``.item()``, no indexing with a
0-dim tensor, no data-dependent Python branches), all randomness pre-drawn outside the graph
into a static buffer, autocast with ``cache_enabled=False`` (a cast cache must not outlive the
capture). The optimizer updates the noise model's parameters IN PLACE, so the graph sees the
new weights at the next replay; if parameters are replaced (``model.to(...)``, re-assigning
``.data`` to a new storage), call :meth:`FastSampler.reset_graph`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from tensordict import TensorDict, TensorDictBase

from ddpo_rl.collector import TRAJECTORY_KEYS
from ddpo_rl.ddim import ddim_step_gaussian, gaussian_log_prob
from ddpo_rl.keys import KEYS
from ddpo_rl.rewards.transform import RewardTransform

_AUTOCAST_DTYPES = {
    None: None,
    "none": None,
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"``/``"fp32"``/None or a torch dtype -> a torch dtype (None = no autocast)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype in (None, torch.float32) else dtype
    try:
        return _AUTOCAST_DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(k for k in _AUTOCAST_DTYPES if k)}") from None


def use_sdpa_attention(model: torch.nn.Module) -> bool:
    """Set diffusers' ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``) on every attention
    layer of ``model``. Returns False if the model has no diffusers attention processors.

    diffusers already defaults to it on torch 2; this pins it (a checkpoint or an earlier
    ``set_attn_processor`` may have set the slower classic processor)."""
    if not hasattr(model, "set_attn_processor"):
        return False
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.set_attn_processor(AttnProcessor2_0())
    return True


@dataclass
class FastSamplingConfig:
    """Options of :class:`FastSampler`.

    Every option is a speed option: with ``autocast_dtype=None`` the samples are those of
    ``collect_trajectories`` to float32 round-off (bitwise on CPU).
    """

    cuda_graph: bool = True
    """Capture the step as a CUDA graph when the env is on CUDA (ignored on CPU: eager)."""
    autocast_dtype: torch.dtype | str | None = None
    """Run the noise model under autocast in this dtype ("bf16", "fp16"); the DDIM step and the
    log-prob stay float32 (ddpo_rl.ddim upcasts). None: no autocast."""
    channels_last: bool = False
    """Convert the noise model to channels_last (IN PLACE: the trained module is the same one)
    and feed it channels_last latents. Helps convolutions on tensor cores."""
    sdpa: bool = True
    """Pin diffusers' SDPA attention processor on the noise model (see :func:`use_sdpa_attention`)."""
    warmup_steps: int = 3
    """Eager steps on a side stream before capture (cuBLAS/cuDNN workspaces, autotuning)."""


@dataclass
class SamplingNoise:
    """All the randomness of one batch of trajectories, drawn before the loop.

    ``prompt_ids`` [B] int64, ``init_latents`` x_T [B, C, H, W] (already scaled by the env's
    ``init_noise_sigma``), ``step_noise`` z [T, B, C, H, W] float32: step k samples
    ``a_k = mean_k + z_k * std_k``.
    """

    prompt_ids: torch.Tensor
    init_latents: torch.Tensor
    step_noise: torch.Tensor


def _unwrap_env(env):
    """(base DenoisingEnv, its RewardTransform or None); refuses transforms it cannot replay."""
    base = getattr(env, "base_env", env)
    transforms = []
    t = getattr(env, "transform", None)
    if t is not None:
        transforms = list(t) if hasattr(t, "__iter__") else [t]
    reward = [x for x in transforms if isinstance(x, RewardTransform)]
    others = [type(x).__name__ for x in transforms if not isinstance(x, RewardTransform)]
    if others:
        raise NotImplementedError(
            f"FastSampler replays a DenoisingEnv with a RewardTransform only; this env also has {others}. "
            "Use ddpo_rl.collector.collect_trajectories for it."
        )
    if len(reward) > 1:
        raise NotImplementedError("FastSampler supports one RewardTransform")
    for name in ("num_inference_steps", "latent_shape", "timesteps", "embed_prompts", "latent_dtype"):
        if not hasattr(base, name):
            raise TypeError(f"FastSampler needs a DenoisingEnv (or a TransformedEnv of one); got {type(base).__name__}")
    return base, (reward[0] if reward else None)


def _prediction(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


class FastSampler:
    """Collect DDPO trajectories on static buffers; on CUDA the T-step loop replays a CUDA graph.

    Args:
        env: the :class:`envs.denoising.DenoisingEnv` (optionally a ``TransformedEnv`` with a
            :class:`~ddpo_rl.rewards.transform.RewardTransform`) that ``collect_trajectories``
            would use: its batch size, T, timesteps, prompts, embeddings, RNG and reward.
        policy: the :class:`~ddpo_rl.policy.DiffusionPolicy` (its head: noise model, CFG scale,
            negative embedding, DDIM coefficients, eta; its log-prob reduction).
        config: :class:`FastSamplingConfig`.

    Call :meth:`sample` (or the sampler itself) instead of ``collect_trajectories(env, policy)``.
    The random draws are the env path's: prompt ids and x_T from ``env.reset()`` (the env's
    generator), the step noise from ``generator`` (default: the global torch RNG, which is what
    the actor's ``rsample`` uses), one [B, C, H, W] draw per step in step order. So with the same
    seeds and ``autocast_dtype=None`` the trajectories equal the env path's.
    """

    def __init__(self, env, policy, config: FastSamplingConfig | None = None):
        self.env = env
        self.policy = policy
        self.config = config or FastSamplingConfig()
        self.base_env, self.reward_transform = _unwrap_env(env)
        head = getattr(policy, "head", None)
        if head is None:
            raise TypeError("FastSampler needs a ddpo_rl.policy.DiffusionPolicy (an actor with .head)")
        if not hasattr(head, "coeffs"):  # e.g. ddpo_rl.flow_policy.FlowMatchingPolicy
            raise NotImplementedError(
                f"FastSampler replays DDIM steps; {type(policy).__name__} is not a DDIM policy: use "
                "ddpo_rl.collector.collect_trajectories for it"
            )
        self.head = head
        kw = {}
        for m in policy.modules():
            if hasattr(m, "distribution_kwargs"):
                kw = m.distribution_kwargs
                break
        self.event_dim = int(kw.get("event_dim", len(self.base_env.latent_shape)))
        self.reduction = kw.get("reduction", getattr(policy, "log_prob_reduction", "mean"))
        self.autocast_dtype = resolve_dtype(self.config.autocast_dtype)
        self.device = torch.device(self.base_env.device)
        if self.config.sdpa:
            use_sdpa_attention(self.head.noise_model)
        if self.config.channels_last:
            self.head.noise_model.to(memory_format=torch.channels_last)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._alloc_buffers()

    # -- setup -------------------------------------------------------------------------------
    @property
    def graphed(self) -> bool:
        """True when the loop runs as a CUDA graph (CUDA env and ``config.cuda_graph``)."""
        return self.device.type == "cuda" and self.config.cuda_graph

    @property
    def batch_size(self) -> int:
        return int(self.base_env.batch_size[0])

    @property
    def num_steps(self) -> int:
        return int(self.base_env.num_inference_steps)

    def _alloc_buffers(self) -> None:
        env, dev = self.base_env, self.device
        B, T, shape = self.batch_size, self.num_steps, tuple(self.base_env.latent_shape)
        emb_spec = env.observation_spec[KEYS.prompt_embeds]
        emb_shape, emb_dtype = tuple(emb_spec.shape[1:]), emb_spec.dtype
        self._k = torch.zeros(1, dtype=torch.int64, device=dev)
        ts = env.timesteps.to(dev).long()
        self._t_table = ts[:, None].expand(T, B).contiguous()  # [T, B]
        self._x = torch.zeros((B, *shape), dtype=env.latent_dtype, device=dev)
        self._noise = torch.zeros((T, B, *shape), dtype=torch.float32, device=dev)
        self._traj_latents = torch.zeros((B, T, *shape), dtype=env.latent_dtype, device=dev)
        self._traj_actions = torch.zeros((B, T, *shape), dtype=torch.float32, device=dev)
        self._traj_log_prob = torch.zeros((B, T), dtype=torch.float32, device=dev)
        if self.head.uses_guidance:
            neg = self.head.negative_prompt_embeds.to(device=dev, dtype=emb_dtype)
            neg = neg.expand(B, *neg.shape[1:]) if neg.shape[0] == 1 else neg
            # [uncond; cond] embeddings, as DDIMGaussianHead.predict concatenates them each step
            self._emb = torch.cat([neg, torch.zeros((B, *emb_shape), dtype=emb_dtype, device=dev)]).contiguous()
            self._cond_emb = self._emb[B:]
            self._t_table = torch.cat([self._t_table, self._t_table], 1)  # [T, 2B]
        else:
            self._emb = torch.zeros((B, *emb_shape), dtype=emb_dtype, device=dev)
            self._cond_emb = self._emb
        self._coeffs = self.head.coeffs

    def reset_graph(self) -> None:
        """Drop the captured graph (re-captured at the next call): after the noise model's
        parameters were replaced rather than updated in place, or its attention processor changed."""
        self._graph = None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    # -- the step: static buffers in, static buffers out ------------------------------------------
    def _step(self) -> None:
        """One denoising step on the static buffers. Captured as-is on CUDA; run as-is on CPU."""
        B = self.batch_size
        k = self._k
        t_in = self._t_table.index_select(0, k)[0]  # [B] (or [2B] with CFG)
        t = t_in[:B]
        z = self._noise.index_select(0, k)[0]
        x = self._x
        x_in = x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x
        with self._autocast():
            if self.head.uses_guidance:
                out = _prediction(self.head.noise_model(torch.cat([x_in, x_in]), t_in, encoder_hidden_states=self._emb))
                uncond, cond = out.chunk(2)
                eps = uncond + self.head.guidance_scale * (cond - uncond)
            else:
                eps = _prediction(self.head.noise_model(x_in, t, encoder_hidden_states=self._emb))
        mean, std = ddim_step_gaussian(self._coeffs, eps, t, x, self.head.eta)
        if self.head.min_std > 0:  # the head's floor on sigma_t (DDIMGaussianHead.forward)
            std = std.clamp(min=self.head.min_std)
        action = mean + z * std  # = Normal.rsample: loc + eps * scale
        log_prob = gaussian_log_prob(action, mean, std, self.event_dim, self.reduction)
        self._traj_latents.index_copy_(1, k, x.unsqueeze(1))
        self._traj_actions.index_copy_(1, k, action.unsqueeze(1))
        self._traj_log_prob.index_copy_(1, k, log_prob.unsqueeze(1))
        self._x.copy_(action)  # env step: next latents = action (in the env's latent dtype)
        self._k.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one step into a CUDA graph."""
        dev = self.device
        with torch.no_grad():
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(max(1, self.config.warmup_steps)):
                    self._k.zero_()
                    self._step()
            torch.cuda.current_stream(dev).wait_stream(side)
            self._k.zero_()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
        self._graph = graph

    # -- randomness --------------------------------------------------------------------------
    def draw_noise(self, generator: torch.Generator | None = None) -> SamplingNoise:
        """Prompt ids and x_T from ``env.reset()``; T step noises from ``generator`` (default: global).

        The step noise is drawn one step at a time, [B, C, H, W] each, in the order the actor's
        ``rsample`` draws it during ``env.rollout``: the same seed gives the same noise."""
        reset = self.base_env.reset()
        noise = torch.empty_like(self._noise)
        for k in range(self.num_steps):
            noise[k].normal_(generator=generator)
        return SamplingNoise(reset[KEYS.prompt_id], reset[KEYS.latents], noise)

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, noise: SamplingNoise) -> TensorDictBase:
        B, T, env = self.batch_size, self.num_steps, self.base_env
        ids = noise.prompt_ids.to(self.device)
        self._noise.copy_(noise.step_noise)
        self._x.copy_(noise.init_latents)
        self._cond_emb.copy_(env.embed_prompts(ids)[KEYS.prompt_embeds])
        self._k.zero_()
        if self.graphed:
            if self._graph is None:
                self._capture()
                self._k.zero_()
                self._x.copy_(noise.init_latents)
            for _ in range(T):
                self._graph.replay()
        else:
            for _ in range(T):
                self._step()
        x0 = self._x.clone()
        reward = torch.zeros((B, T, 1), dtype=torch.float32, device=self.device)
        if self.reward_transform is not None:
            rewards, _ = self.reward_transform.score(x0, env.prompts_of(ids))
            reward[:, -1, 0] = rewards.to(self.device)
        done = torch.zeros((B, T, 1), dtype=torch.bool, device=self.device)
        done[:, -1] = True
        emb = self._cond_emb
        td = TensorDict(
            {
                KEYS.latents: self._traj_latents.clone(),
                KEYS.timestep: env.timesteps.to(self.device).long().expand(B, T).clone(),
                KEYS.prompt_embeds: emb.unsqueeze(1).expand(B, T, *emb.shape[1:]).clone(),
                KEYS.prompt_id: ids.unsqueeze(1).expand(B, T).clone(),
                KEYS.action: self._traj_actions.clone(),
                KEYS.log_prob: self._traj_log_prob.clone(),
                "next": TensorDict({KEYS.reward: reward, KEYS.done: done}, batch_size=[B, T], device=self.device),
            },
            batch_size=[B, T],
            device=self.device,
        )
        return td

    def sample(
        self,
        num_batches: int = 1,
        noise: SamplingNoise | Sequence[SamplingNoise] | None = None,
        generator: torch.Generator | None = None,
    ) -> TensorDictBase:
        """``num_batches`` batches of trajectories: a TensorDict [N, T] with :data:`TRAJECTORY_KEYS`.

        Args:
            num_batches: batches of ``env.batch_size`` chains (ignored when ``noise`` is a list).
            noise: the randomness to use (one :class:`SamplingNoise` per batch); default: drawn
                with :meth:`draw_noise` right before each batch.
            generator: for the step noise when ``noise`` is None (default: the global RNG).
        """
        if noise is not None:
            noises = [noise] if isinstance(noise, SamplingNoise) else list(noise)
        else:
            if num_batches <= 0:
                raise ValueError(f"num_batches={num_batches} must be positive")
            noises = [None] * num_batches
        batches = []
        for nz in noises:
            batches.append(self._run(nz if nz is not None else self.draw_noise(generator)))
        out = torch.cat(batches, 0) if len(batches) > 1 else batches[0]
        assert set(out.keys(True, True)) == {k if isinstance(k, str) else tuple(k) for k in TRAJECTORY_KEYS}
        return out

    __call__ = sample


def fast_collect_trajectories(env, policy, num_batches: int = 1, config: FastSamplingConfig | None = None):
    """One-shot :class:`FastSampler` (a new graph per call: keep a FastSampler to reuse it)."""
    if config is not None and config.cuda_graph and torch.device(getattr(env, "device", "cpu")).type == "cuda":
        warnings.warn("fast_collect_trajectories captures a new CUDA graph per call; keep a FastSampler instead")
    return FastSampler(env, policy, config).sample(num_batches)


__all__ = [
    "FastSampler",
    "FastSamplingConfig",
    "SamplingNoise",
    "fast_collect_trajectories",
    "resolve_dtype",
    "use_sdpa_attention",
]
