"""Sampling DDPO trajectories: the env path (the reference) or static buffers replayed as a CUDA graph.

Two samplers with one interface, ``sampler.sample(num_batches) -> TensorDict [N, T]`` holding
:data:`ddpo_rl.collector.TRAJECTORY_KEYS`, so the trainer consumes either:

- :class:`EnvSampler`: :func:`ddpo_rl.collector.collect_trajectories`, i.e. the torchrl env
  (:class:`envs.denoising.DenoisingEnv` + reward transform) stepped by the policy, under autocast.
- :class:`FastSampler`: the same math, the same random draws, on preallocated buffers::

      once per batch (eager):  env.reset() -> prompt ids, x_T          (the env's RNG)
                               z_k ~ N(0, I), k = 0..T-1, into a buffer (the global RNG, in the
                                                                        order the actor draws them)
      T times (one graph):     mean, std = policy head(x, t_k, c)     (CFG + DDIM Gaussian)
                               a = mean + z_k * std;  log pi(a | x)   (sample, log-prob)
                               trajectory[:, k] <- (x, a, log-prob);  x <- a;  k <- k + 1
      once per batch (eager):  reward = RewardTransform.score(x_0)     (decode + reward model)

  On CUDA the T-step loop is one captured ``torch.cuda.CUDAGraph`` replayed T times; on CPU the
  same step function runs eagerly (so the CPU tests run the code that is captured on GPU).

:func:`make_sampler` builds either from a config's ``sampler`` field (:data:`SAMPLERS`).
Why a raw CUDA graph, and the rules the captured step obeys: benchmarks/README.md, "The graphed
sampler". The graph is never silently stale: before each batch the sampler compares a key of
everything the capture froze (parameter and buffer storages, dtypes and shapes, module modes,
LoRA merge/adapter state, attention processors, CFG scale, eta, the env's shapes) with the key
at capture, and re-captures when it changed. In-place updates (the optimizer's) need none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from tensordict import TensorDict, TensorDictBase

from ddpo_rl.collector import collect_trajectories
from ddpo_rl.ddim import gaussian_log_prob
from ddpo_rl.keys import KEYS
from ddpo_rl.precision import autocast_dtype as _autocast_dtype
from ddpo_rl.rewards.transform import RewardTransform

SAMPLERS = ("auto", "env", "graphed")
"""Values of ``DDPOConfig.sampler``: "auto" = "graphed" on CUDA, "env" elsewhere."""


def resolve_sampler(name: str, device: torch.device | str) -> str:
    """"env" or "graphed" from a :data:`SAMPLERS` value and the sampling device."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}; expected one of {SAMPLERS}")
    if name == "auto":
        return "graphed" if torch.device(device).type == "cuda" else "env"
    return name


@dataclass
class FastSamplingConfig:
    """Options of :class:`FastSampler`.

    Every option is a speed option: with ``autocast_dtype=None`` the samples are those of
    ``collect_trajectories`` (bitwise on CPU).
    """

    cuda_graph: bool = True
    """Capture the step as a CUDA graph when the env is on CUDA (ignored on CPU: eager)."""
    autocast_dtype: torch.dtype | str | None = None
    """Run the policy under autocast in this dtype ("bf16", "fp16"); the DDIM step and the
    log-prob stay float32 (ddpo_rl.ddim upcasts). None: no autocast."""
    channels_last: bool = False
    """Feed the noise model channels_last latents (convert the model itself with
    :func:`ddpo_rl.precision.set_channels_last`)."""
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


class FastSampler:
    """Collect DDPO trajectories on static buffers; on CUDA the T-step loop replays a CUDA graph.

    Args:
        env: the :class:`envs.denoising.DenoisingEnv` (optionally a ``TransformedEnv`` with a
            :class:`~ddpo_rl.rewards.transform.RewardTransform`) that ``collect_trajectories``
            would use: its batch size, T, timesteps, prompts, embeddings, RNG and reward.
        policy: the :class:`~ddpo_rl.policy.DiffusionPolicy` (its head: noise model, CFG scale,
            negative embedding, DDIM coefficients, eta, min_std; its log-prob reduction).
        config: :class:`FastSamplingConfig`.
        graph_pool: a ``torch.cuda.graph_pool_handle()`` shared by samplers that are never
            replayed concurrently (the recipe's training and evaluation samplers), so their
            graphs share one memory pool for the UNet's intermediates. None: a private pool.

    Call :meth:`sample` instead of ``collect_trajectories(env, policy)``. The random draws are
    the env path's: prompt ids and x_T from ``env.reset()`` (the env's generator), the step
    noise from ``generator`` (default: the global torch RNG, which is what the actor's
    ``rsample`` uses), one [B, C, H, W] draw per step in step order. So with the same seeds and
    ``autocast_dtype=None`` the trajectories equal the env path's. An asynchronous reward
    (``RewardTransform.asynchronous``) is submitted per batch and awaited after the last one,
    as the collector does.
    """

    def __init__(self, env, policy, config: FastSamplingConfig | None = None, graph_pool=None):
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
        self.autocast_dtype = _autocast_dtype(self.config.autocast_dtype)
        self.graph_pool = graph_pool
        self.rebuilds = 0
        """How many times the buffers and graph were (re)built because the key changed."""
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key = None

    # -- setup -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device(self.base_env.device)

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

    def _graph_key(self) -> tuple:
        """Everything the buffers and a captured graph depend on, other than tensor VALUES.

        Host-side metadata only (storage pointers, shapes, flags): no device sync. Parameters
        updated in place keep their key; replaced ones (``.to(dtype)``, ``p.data = ...``), a
        LoRA merge or adapter switch, a new attention processor, a mode change or a new env
        batch shape change it."""
        head, env = self.head, self.base_env
        # storages and layouts (a replaced or re-laid-out tensor gets a new data_ptr)
        tensors = tuple((t.data_ptr(), t.dtype, t.shape) for t in (*head.parameters(), *head.buffers()))
        # structure, modes, attention processors, peft adapter state; read from __dict__ (plain
        # attributes: Module.__getattr__ would be slow for the many modules that lack them)
        modules = tuple(
            (
                id(m),
                d["training"],
                id(d.get("processor")),
                tuple(d.get("merged_adapters") or ()),
                repr(d.get("_active_adapter")),
                d.get("_disable_adapters"),
            )
            for m in head.modules()
            for d in (m.__dict__,)
        )
        scalars = (head.guidance_scale, head.eta, head.min_std, self.event_dim, self.reduction)
        shapes = (
            tuple(env.batch_size), env.num_inference_steps, tuple(env.latent_shape), env.latent_dtype,
            tuple(env.observation_spec[KEYS.prompt_embeds].shape), env.observation_spec[KEYS.prompt_embeds].dtype,
            str(env.device),
            env.timesteps.data_ptr(),
        )
        return tensors, modules, scalars, shapes, self.autocast_dtype, self.config.channels_last

    def _prepare(self) -> None:
        """(Re)allocate the buffers and drop the graph if the key changed since the last batch."""
        key = self._graph_key()
        if key != self._key:
            self._graph = None
            self._alloc_buffers()
            self._key = key
            self.rebuilds += 1

    def _alloc_buffers(self) -> None:
        env, dev = self.base_env, self.device
        B, T, shape = self.batch_size, self.num_steps, tuple(self.base_env.latent_shape)
        emb_spec = env.observation_spec[KEYS.prompt_embeds]
        emb_shape, emb_dtype = tuple(emb_spec.shape[1:]), emb_spec.dtype
        self._k = torch.zeros(1, dtype=torch.int64, device=dev)
        self._t_table = env.timesteps.to(dev).long()[:, None].expand(T, B).contiguous()  # [T, B]
        self._x = torch.zeros((B, *shape), dtype=env.latent_dtype, device=dev)
        self._noise = torch.zeros((T, B, *shape), dtype=torch.float32, device=dev)
        self._traj_latents = torch.zeros((B, T, *shape), dtype=env.latent_dtype, device=dev)
        self._traj_actions = torch.zeros((B, T, *shape), dtype=torch.float32, device=dev)
        self._traj_log_prob = torch.zeros((B, T), dtype=torch.float32, device=dev)
        self._cond_emb = torch.zeros((B, *emb_shape), dtype=emb_dtype, device=dev)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no cast cache: cached low-precision copies of the weights must not outlive the capture
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    # -- the step: static buffers in, static buffers out ------------------------------------------
    def _step(self) -> None:
        """One denoising step on the static buffers. Captured as-is on CUDA; run as-is on CPU.

        No host sync, no data-dependent Python branch: the step index k is a device tensor, the
        timestep and the noise are gathered with it, the trajectory is written with index_copy_."""
        k = self._k
        t = self._t_table.index_select(0, k)[0]  # [B]
        z = self._noise.index_select(0, k)[0]
        x = self._x
        x_in = x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x
        with self._autocast():
            mean, std = self.head(x_in, t, self._cond_emb)  # the policy's CFG, DDIM Gaussian, min_std
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
        x0 = self._x.clone()
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
            with torch.cuda.graph(graph, pool=self.graph_pool):
                self._step()
        self._graph = graph
        self._k.zero_()
        self._x.copy_(x0)

    # -- randomness --------------------------------------------------------------------------
    def draw_noise(self, generator: torch.Generator | None = None) -> SamplingNoise:
        """Prompt ids and x_T from ``env.reset()``; T step noises from ``generator`` (default: global).

        The step noise is drawn one step at a time, [B, C, H, W] each, in the order the actor's
        ``rsample`` draws it during ``env.rollout``: the same seed gives the same noise."""
        reset = self.base_env.reset()
        shape = (self.num_steps, self.batch_size, *self.base_env.latent_shape)
        noise = torch.empty(shape, dtype=torch.float32, device=self.device)
        for k in range(self.num_steps):
            noise[k].normal_(generator=generator)
        return SamplingNoise(reset[KEYS.prompt_id], reset[KEYS.latents], noise)

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, noise: SamplingNoise) -> TensorDictBase:
        """One batch of trajectories (an asynchronous reward is left pending, see :meth:`sample`)."""
        self._prepare()
        B, T, env = self.batch_size, self.num_steps, self.base_env
        ids = noise.prompt_ids.to(self.device)
        self._noise.copy_(noise.step_noise)
        self._x.copy_(noise.init_latents)
        self._cond_emb.copy_(env.embed_prompts(ids)[KEYS.prompt_embeds])
        self._k.zero_()
        if self.graphed:
            if self._graph is None:
                self._capture()
            for _ in range(T):
                self._graph.replay()
        else:
            for _ in range(T):
                self._step()
        x0 = self._x.clone()
        reward = torch.zeros((B, T, 1), dtype=torch.float32, device=self.device)
        if self.reward_transform is not None:
            prompts = env.prompts_of(ids)
            if self.reward_transform.asynchronous:
                self.reward_transform.submit(x0, prompts)  # awaited in sample(), after the last batch
            else:
                rewards, _ = self.reward_transform.score(x0, prompts)
                reward[:, -1, 0] = rewards.to(self.device)
        done = torch.zeros((B, T, 1), dtype=torch.bool, device=self.device)
        done[:, -1] = True
        emb = self._cond_emb
        td = TensorDict(
            {
                KEYS.latents: self._traj_latents.clone(),
                KEYS.timestep: self._t_table.t().clone(),
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
        """``num_batches`` batches of trajectories: a TensorDict [N, T] with :data:`ddpo_rl.collector.TRAJECTORY_KEYS`.

        Args:
            num_batches: batches of ``env.batch_size`` chains (ignored when ``noise`` is given).
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
        transform = self.reward_transform
        if transform is not None and transform.asynchronous:
            transform.clear_pending()  # futures left by a rollout run elsewhere
        try:
            for nz in noises:
                batches.append(self._run(nz if nz is not None else self.draw_noise(generator)))
            if transform is not None and transform.asynchronous:  # all sampled: wait for the rewards
                for td, r in zip(batches, transform.pop_pending()):
                    td.get(("next", KEYS.reward))[:, -1] = r.to(td.device).unsqueeze(-1)
        finally:
            if transform is not None and transform.asynchronous:
                transform.clear_pending()
        return torch.cat(batches, 0) if len(batches) > 1 else batches[0]

    __call__ = sample


class EnvSampler:
    """The reference sampler: :func:`~ddpo_rl.collector.collect_trajectories` under autocast.

    Same interface as :class:`FastSampler` (``sample(num_batches)``), no static state."""

    graphed = False

    def __init__(self, env, policy, autocast_dtype: torch.dtype | str | None = None):
        self.env, self.policy = env, policy
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        self.device = torch.device(getattr(env, "device", None) or "cpu")

    def sample(self, num_batches: int = 1) -> TensorDictBase:
        if self.autocast_dtype is None:
            return collect_trajectories(self.env, self.policy, num_batches=num_batches)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return collect_trajectories(self.env, self.policy, num_batches=num_batches)

    __call__ = sample


def make_sampler(
    name: str,
    env,
    policy,
    *,
    autocast_dtype: torch.dtype | str | None = None,
    channels_last: bool = False,
    graph_pool=None,
) -> EnvSampler | FastSampler:
    """The sampler a config's ``sampler`` field names (:data:`SAMPLERS`), on ``env``'s device.

    "auto" is the env path for a policy FastSampler cannot replay (not a DDIM policy); "graphed"
    refuses one."""
    kind = resolve_sampler(name, getattr(env, "device", None) or "cpu")
    if name == "auto" and not hasattr(getattr(policy, "head", None), "coeffs"):
        kind = "env"  # FastSampler replays DDIM steps only (a flow-matching policy samples on the env path)
    if kind == "env":
        return EnvSampler(env, policy, autocast_dtype)
    config = FastSamplingConfig(autocast_dtype=autocast_dtype, channels_last=channels_last)
    return FastSampler(env, policy, config, graph_pool=graph_pool)


__all__ = [
    "SAMPLERS",
    "EnvSampler",
    "FastSampler",
    "FastSamplingConfig",
    "SamplingNoise",
    "make_sampler",
    "resolve_sampler",
]
