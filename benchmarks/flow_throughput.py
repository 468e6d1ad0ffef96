"""The flow-matching sampler in the throughput benchmark (``benchmarks/throughput.py --flow``).

Same protocol as the DDIM methods there (same batch, step count, CFG scale; warm-up rounds, then
rounds in which every method runs once, interleaved; medians and per-round paired ratios), on an
``SD3Transformer2DModel`` with random weights (``--model tiny``: a small one, 0.44M parameters, for
the CPU; ``--model sd15``: SD3.5-Medium's architecture, 16 latent channels, for a GPU) and SD3's
``FlowMatchEulerDiscreteScheduler`` (shift 3), noise level a = 0.7:

  (fa) flow_baseline_loop      plain eager loop: transformer with CFG, then Flow-GRPO's SDE step and
                               its log-prob written inline from the scheduler's sigmas, indexed on
                               the host step by step (as Flow-GRPO's reference training script does)
  (fc) flow_ddpo_rl_eager      ddpo_rl.collector.collect_trajectories: the DenoisingEnv with the
                               FlowMatchingPolicy (ddpo_rl.flow_sde) and the reward transform
  (fe) flow_plain_policy_loop  (fc)'s policy math (FlowSDEHead + DDIMGaussian) on plain tensors:
                               (fc) vs (fe) is the torchrl env overhead for this family
  (fw) flow_window_eager       (fc) with an SDE window of T/2 steps (ODE elsewhere): sampling costs
                               the same forwards; the window saves training steps, not sampling

Every method scores x_0 with throughput.py's latent->pixel map and brightness reward. The
FastSampler (CUDA graph) replays DDIM steps only, so the flow family has no graphed method.
"""

from __future__ import annotations

import math
import statistics

import torch

NOISE_LEVEL = 0.7


def build_transformer(model: str, latent_size: int, seed: int = 0):
    """(transformer, latent channels, token dim, pooled dim) with random weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    if model == "tiny":
        kw = dict(in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                  caption_projection_dim=64, pooled_projection_dim=64, out_channels=4)
    else:  # SD3.5 Medium's transformer architecture (dual attention in the first 13 blocks not modelled)
        kw = dict(in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384)
    net = SD3Transformer2DModel(sample_size=latent_size, patch_size=2, **kw)
    return net, kw["in_channels"], kw["joint_attention_dim"], kw["pooled_projection_dim"]


class FlowSetup:
    """The transformer, embeddings, env and policy that the flow methods share."""

    def __init__(self, args, device, prompts, reward, to_images, window: int | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from torchrl.envs import TransformedEnv

        from ddpo_rl.flow_policy import FlowMatchingPolicy
        from ddpo_rl.keys import KEYS
        from ddpo_rl.rewards.transform import RewardTransform
        from envs.denoising import DenoisingEnv

        self.device, self.B, self.T, self.w = device, args.batch, args.steps, args.cfg
        self.prompts, self.reward, self.to_images = prompts, reward, to_images
        self.net, ch, dim, pooled_dim = build_transformer(args.model, args.latent_size)
        self.net.to(device)
        self.latent_shape = (ch, args.latent_size, args.latent_size)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        g = torch.Generator().manual_seed(0)
        tokens = 77
        self.table = torch.randn(len(prompts), tokens, dim, generator=g).to(device)
        self.pooled = torch.randn(len(prompts), pooled_dim, generator=g).to(device)
        self.negative = {
            KEYS.prompt_embeds: torch.randn(1, tokens, dim, generator=g).to(device),
            KEYS.pooled_prompt_embeds: torch.randn(1, pooled_dim, generator=g).to(device),
        }

        def encode(ps):
            idx = torch.tensor([prompts.index(p) for p in ps], device=device)
            return {KEYS.prompt_embeds: self.table[idx], KEYS.pooled_prompt_embeds: self.pooled[idx]}

        def make(window_size):
            policy = FlowMatchingPolicy(
                self.net, self.scheduler, self.T, noise_level=NOISE_LEVEL, guidance_scale=self.w,
                negative_prompt_embeds=self.negative if self.w != 1.0 else None, sde_window_size=window_size,
            ).to(device)
            base = DenoisingEnv(prompts, encode, self.scheduler, self.T, self.latent_shape, self.B, device=device)
            env = TransformedEnv(base, RewardTransform(reward, to_images))
            env.set_seed(0)
            return policy, env

        self.policy, self.env = make(None)
        self.window_policy, self.window_env = make(window or max(1, self.T // 2))


def make_flow_baseline_loop(s: FlowSetup):
    """(fa) An eager loop with Flow-GRPO's SDE step and log-prob written inline."""
    sched = type(s.scheduler).from_config(s.scheduler.config)
    sched.set_timesteps(s.T)
    sigmas = sched.sigmas  # CPU tensor, indexed on the host step by step
    timesteps = sched.timesteps
    sigma_max = sigmas[1]
    cfg = s.w != 1.0

    @torch.no_grad()
    def run():
        ids = torch.randint(len(s.prompts), (s.B,)).to(s.device)
        emb, pooled = s.table[ids], s.pooled[ids]
        if cfg:
            emb = torch.cat([s.negative["prompt_embeds"].expand(s.B, -1, -1), emb])
            pooled = torch.cat([s.negative["pooled_prompt_embeds"].expand(s.B, -1), pooled])
        x = torch.randn(s.B, *s.latent_shape, device=s.device)
        latents, log_probs = [x], []
        for i in range(s.T):
            x_in = torch.cat([x, x]) if cfg else x
            t_in = timesteps[i].to(s.device).expand(x_in.shape[0])
            v = s.net(hidden_states=x_in, timestep=t_in, encoder_hidden_states=emb, pooled_projections=pooled).sample
            if cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + s.w * (v_c - v_u)
            sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
            dt = sigma_next - sigma
            std_t = NOISE_LEVEL * math.sqrt(sigma / (1 - (sigma_max.item() if sigma == 1 else sigma)))
            mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
            std = std_t * math.sqrt(-dt)
            prev = mean + std * torch.randn_like(x)
            lp = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
            log_probs.append(lp.mean(dim=tuple(range(1, lp.ndim))))
            latents.append(prev)
            x = prev
        reward = s.reward(s.to_images(x), [s.prompts[i] for i in ids.tolist()])
        return torch.stack(latents, 1), torch.stack(log_probs, 1), reward

    return run


def make_flow_ddpo_eager(s: FlowSetup, window: bool = False):
    """(fc) collect_trajectories with the FlowMatchingPolicy; (fw) the same with an SDE window."""
    from ddpo_rl.collector import collect_trajectories

    if window:
        return lambda: collect_trajectories(s.window_env, s.window_policy)
    return lambda: collect_trajectories(s.env, s.policy)


def make_flow_plain_policy_loop(s: FlowSetup):
    """(fe) (fc)'s policy math on plain tensors: FlowSDEHead + DDIMGaussian, no env, no TensorDict."""
    from ddpo_rl.distributions import DDIMGaussian

    head, base, transform = s.policy.head, s.env.base_env, s.env.transform

    @torch.no_grad()
    def run():
        ids = base.prompt_source.sample(s.B, generator=base._rng, device=s.device)
        x = torch.randn(s.B, *s.latent_shape, generator=base._rng, device=s.device)
        emb, pooled = s.table[ids], s.pooled[ids]
        latents, actions, log_probs = [], [], []
        for k in range(s.T):
            loc, scale = head(x, torch.full((s.B,), k, device=s.device), emb, pooled)
            dist = DDIMGaussian(loc, scale, event_dim=3, reduction="mean")
            a = dist.sample()
            latents.append(x)
            actions.append(a)
            log_probs.append(dist.log_prob(a))
            x = a
        reward, _ = transform.score(x, base.prompts_of(ids))
        return torch.stack(latents, 1), torch.stack(actions, 1), torch.stack(log_probs, 1), reward

    return run


def flow_collection(args, device, prompts, reward, to_images, time_interleaved, summarize, paired_overhead_pct) -> dict:
    """Time the flow methods (interleaved rounds, as the DDIM methods) and summarise them."""
    s = FlowSetup(args, device, prompts, reward, to_images)
    methods = {
        "flow_baseline_loop": make_flow_baseline_loop(s),
        "flow_ddpo_rl_eager": make_flow_ddpo_eager(s),
        "flow_plain_policy_loop": make_flow_plain_policy_loop(s),
        "flow_window_eager": make_flow_ddpo_eager(s, window=True),
    }
    times = time_interleaved(methods, device, args.warmup, args.repeats, "flow collection")
    base = times["flow_baseline_loop"]
    out = {
        "transformer_params": sum(p.numel() for p in s.net.parameters()),
        "latent_shape": list(s.latent_shape),
        "noise_level": NOISE_LEVEL,
        "sde_window_steps": int(s.window_policy.head.sde_steps.sum()),
        "methods": {},
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        out["methods"][name] = {
            **summarize(ts),
            "samples_per_s": args.batch / med,
            "ratio_to_baseline": statistics.median(base) / med,
            "paired_ratio_to_baseline": statistics.median(b / a for a, b in zip(ts, base)),
        }
    out["env_overhead_pct"] = 100 * (
        statistics.median(times["flow_ddpo_rl_eager"]) / statistics.median(times["flow_plain_policy_loop"]) - 1
    )
    out["env_overhead_pct_paired_median"] = paired_overhead_pct(times["flow_ddpo_rl_eager"], times["flow_plain_policy_loop"])
    return out
