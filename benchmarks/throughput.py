"""Sampling and training throughput of ddpo_rl, side by side with the usual ways, in one process.

    python benchmarks/throughput.py --json OUT.json                       # tiny UNet, CPU
    python benchmarks/throughput.py --model sd15 --device cuda --batch 8 --steps 50 --cfg 7.5 \\
        --dtype bf16 --json sd15.json                                     # the issue's GPU target

Same model, batch, step count, CFG scale and eta=1 for every method:

collection (one batch of B trajectories of T DDIM steps, CFG on; no VAE decode anywhere: the
pipeline runs with output_type="latent", and (a), (c), (d), (e) score x_0 with the same cheap
latent->pixel map and mean-brightness reward)
  (a) baseline_loop     plain eager diffusers loop: UNet with CFG, DDIMScheduler.step(eta=1,
                        variance_noise=z), then the step's log-prob from the scheduler's alphas,
                        as the reference DDPO implementation computes it (host-side alpha lookup)
  (b) diffusers_pipeline StableDiffusionPipeline(..., eta=1, output_type="latent"): NO log-probs
  (c) ddpo_rl_eager     ddpo_rl.collector.collect_trajectories (env.step loop over the DenoisingEnv
                        with the DiffusionPolicy and the reward transform)
  (c0) torchrl_env_rollout the same through torchrl's env.rollout(T, policy) (what the collector
                        used before; its per-step done check syncs with the device)
  (d) ddpo_rl_graphed   ddpo_rl.sampling.FastSampler: CUDA graph on GPU; on CPU it is the same
                        static-buffer step run eagerly (reported as "graphed": false)
  (e) plain_policy_loop the policy math of (c) (DDIMGaussianHead + DDIMGaussian) on plain tensors,
                        no env, no TensorDict: (c) vs (e) is the torchrl env overhead
training (one DDPO-IS pass over B trajectories x T steps, minibatch B, one optimizer step)
  ddpo_trainer          DDPOTrainer + torchrl ClipPPOLoss on the collected TensorDict
  bare_loop             the same forward (CFG UNet, DDIM Gaussian, log-prob, clipped ratio
                        objective) / backward / clip / AdamW step in plain PyTorch

Timings: W warm-up rounds, then R rounds; every round runs every method once, interleaved, so
that load from other jobs on a shared machine hits all methods alike. Medians are reported,
with the per-round paired ratios for the two overhead figures. See benchmarks/README.md for the
JSON schema.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import ddpo_rl  # noqa: E402,F401  (first: torchvision shim on CPU-only torch)
from ddpo_rl.atomic import write_json  # noqa: E402
from ddpo_rl.errors import report_user_errors  # noqa: E402
from ddpo_rl.run_dir import prepare_output_file  # noqa: E402
import torch  # noqa: E402

SCHEMA = "ddpo_rl.benchmarks.throughput/1"
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# Dense (no sparsity) peak tensor throughput, FLOP/s, by device and compute dtype.
# fp32 without TF32 uses the CUDA-core FP32 peak; "tf32" when --tf32 is given.
PEAK_FLOPS = {
    "H100 SXM": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "H100 PCIe": {"fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12},
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "L4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12},
}


# -- small utilities ---------------------------------------------------------------------------


def _console():
    try:
        from rich.console import Console

        return Console(stderr=True, width=max(140, Console(stderr=True).width))
    except ImportError:  # rich is a dependency; keep the script usable without it
        return None


CONSOLE = _console()


def log(msg: str) -> None:
    if CONSOLE is not None:
        CONSOLE.log(msg)
    else:
        print(msg, file=sys.stderr)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class PeakMemory:
    """Peak memory of one call: CUDA max_memory_allocated, or the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs where the kernel allows it; else ru_maxrss, which
    cannot be reset and is then the process-wide peak so far)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_hwm"
        self.resettable = True

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                self.resettable = False
                self.kind = "ru_maxrss_process_peak"
            self.before = self._status("VmRSS") or 0
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status("VmHWM") if self.resettable else None
            if peak is None:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak = peak
        self.delta = self.peak - self.before
        return False


def peak_flops(device: torch.device, dtype_name: str, tf32: bool, override_tflops: float | None):
    """(peak FLOP/s, basis string) for the device, or (None, reason)."""
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops}"
    if device.type != "cuda":
        return None, "CPU: no peak figure (fraction not computed)"
    name = torch.cuda.get_device_name(device)
    key = dtype_name if dtype_name != "fp32" else ("tf32" if tf32 else "fp32")
    for dev, table in PEAK_FLOPS.items():
        parts = dev.split()
        if parts[0] in name and (len(parts) == 1 or parts[1] in name or (parts[1] == "SXM" and "PCIe" not in name)):
            return table[key], f"{dev} dense {key} peak ({name})"
    return None, f"unknown device {name!r}: pass --peak-tflops"


# -- models, env, policy -----------------------------------------------------------------------


def build_unet(model: str, latent_size: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    from ddpo_rl.models.tiny import tiny_unet

    if model == "tiny":
        return tiny_unet(sample_size=latent_size, cross_attention_dim=32, seed=seed), 32
    if model == "sd15":
        torch.manual_seed(seed)
        # Stable Diffusion 1.5's UNet architecture (these are also UNet2DConditionModel's defaults,
        # spelled out), random weights: 860M parameters.
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        return unet, 768
    raise ValueError(f"unknown --model {model!r}")


def build_vae_for_pipeline(model: str):
    """The pipeline only reads the VAE's scale factor (output_type="latent": no decode)."""
    from ddpo_rl.models.tiny import tiny_vae

    return tiny_vae(block_out_channels=(16, 32) if model == "tiny" else (16, 16, 16, 16))


def latent_to_images(latents: torch.Tensor) -> torch.Tensor:
    """The stand-in decoder of every method: first 3 latent channels, [-1, 1] -> [0, 1]."""
    return (latents[:, :3].float() / 2 + 0.5).clamp(0, 1)


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


PROMPTS = ["a cat", "a dog", "a horse", "a photo of a lighthouse", "an oil painting of a ship", "a red bicycle"]


class Setup:
    """Everything the methods share: the UNet, embeddings, env, policy, scheduler."""

    def __init__(self, args, device: torch.device, unet: torch.nn.Module | None = None, cond_dim: int = 32):
        """``args``: batch, steps, cfg, latent_size and (unless ``unet`` is given) model.
        ``unet``: a stand-in noise model (env_overhead.py's near-free one) taking ``cond_dim``-wide
        prompt embeddings, instead of :func:`build_unet`."""
        from torchrl.envs import TransformedEnv

        from ddpo_rl.models.tiny import sd_ddim_scheduler
        from ddpo_rl.policy import DiffusionPolicy
        from ddpo_rl.rewards.transform import RewardTransform
        from envs.denoising import DenoisingEnv

        self.args, self.device = args, device
        self.B, self.T, self.w, self.eta = args.batch, args.steps, args.cfg, 1.0
        self.unet, dim = build_unet(args.model, args.latent_size) if unet is None else (unet, cond_dim)
        self.unet.to(device)
        self.latent_shape = (4, args.latent_size, args.latent_size)
        self.scheduler = sd_ddim_scheduler()
        g = torch.Generator().manual_seed(0)
        # Random prompt embeddings stand in for a text encoder (the same for every method).
        table = torch.randn(len(PROMPTS), 77, dim, generator=g)
        self.negative = torch.randn(1, 77, dim, generator=g).to(device)
        self.encode = lambda prompts: table[[PROMPTS.index(p) for p in prompts]]
        self.policy = DiffusionPolicy(
            self.unet,
            self.scheduler,
            self.T,
            eta=self.eta,
            guidance_scale=self.w,
            negative_prompt_embeds=self.negative if self.w != 1.0 else None,
        ).to(device)
        base = DenoisingEnv(PROMPTS, self.encode, self.scheduler, self.T, self.latent_shape, self.B, device=device)
        self.env = TransformedEnv(base, RewardTransform(brightness, latent_to_images))
        self.env.set_seed(0)
        self.table = table.to(device)  # what the env's encoder returns for each prompt


# -- collection methods --------------------------------------------------------------------------


def make_baseline_loop(s: Setup):
    """(a) The usual eager loop: diffusers' DDIMScheduler.step plus a reference-DDPO-style log-prob."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(s.scheduler.config)
    sched.set_timesteps(s.T, device=s.device)
    ac = sched.alphas_cumprod  # CPU tensor: indexed on the host, step by step, as the reference does
    step_ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    cfg = s.w != 1.0

    @torch.no_grad()
    def run():
        ids = torch.randint(len(PROMPTS), (s.B,))
        emb = s.table[ids.to(s.device)]
        if cfg:
            emb = torch.cat([s.negative.expand(s.B, -1, -1), emb])
        x = torch.randn(s.B, *s.latent_shape, device=s.device) * sched.init_noise_sigma
        latents, log_probs = [x], []
        for t in sched.timesteps:
            x_in = torch.cat([x, x]) if cfg else x
            x_in = sched.scale_model_input(x_in, t)
            eps = s.unet(x_in, t, encoder_hidden_states=emb).sample
            if cfg:
                e_u, e_c = eps.chunk(2)
                eps = e_u + s.w * (e_c - e_u)
            z = torch.randn_like(x)
            out = sched.step(eps, t, x, eta=s.eta, variance_noise=z)
            prev = out.prev_sample
            # log pi(x_{t-1} | x_t): the Gaussian's mean and std from the scheduler's alphas
            ti = int(t)
            prev_t = ti - step_ratio
            a_t = ac[ti]
            a_prev = ac[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            std = s.eta * (((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)).sqrt()
            std = std.to(s.device)
            mean = a_prev.sqrt().to(s.device) * out.pred_original_sample + (1 - a_prev.to(s.device) - std**2).sqrt() * eps
            lp = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - HALF_LOG_2PI
            log_probs.append(lp.mean(dim=tuple(range(1, lp.ndim))))
            latents.append(prev)
            x = prev
        latents_t = torch.stack(latents, 1)
        log_probs_t = torch.stack(log_probs, 1)
        prompts = [PROMPTS[i] for i in ids.tolist()]
        reward = brightness(latent_to_images(x), prompts)
        return latents_t, log_probs_t, reward

    return run


def make_pipeline(s: Setup):
    """(b) diffusers' StableDiffusionPipeline, output_type="latent", no log-probs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=build_vae_for_pipeline(s.args.model).to(s.device),
        text_encoder=None,
        tokenizer=None,
        unet=s.unet,
        scheduler=DDIMScheduler.from_config(s.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    size = s.args.latent_size * pipe.vae_scale_factor

    @torch.no_grad()
    def run():
        ids = torch.randint(len(PROMPTS), (s.B,))
        return pipe(
            prompt_embeds=s.table[ids.to(s.device)],
            negative_prompt_embeds=s.negative.expand(s.B, -1, -1),
            height=size,
            width=size,
            num_inference_steps=s.T,
            guidance_scale=s.w,
            eta=s.eta,
            output_type="latent",
        ).images

    return run


def make_ddpo_eager(s: Setup):
    """(c) ddpo_rl.collector.collect_trajectories: env.rollout with the DiffusionPolicy."""
    from ddpo_rl.collector import collect_trajectories

    return lambda: collect_trajectories(s.env, s.policy)


def make_torchrl_rollout(s: Setup):
    """(c0) The plain torchrl way: env.rollout(T, policy) (per-step done checks included)."""
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from ddpo_rl.collector import TRAJECTORY_KEYS

    @torch.no_grad()
    def run():
        with set_exploration_type(ExplorationType.RANDOM):
            td = s.env.rollout(s.T, s.policy, auto_reset=True, break_when_any_done=False)
        return td.select(*TRAJECTORY_KEYS, strict=False)

    return run


def make_ddpo_graphed(s: Setup, autocast_dtype):
    """(d) ddpo_rl.sampling.FastSampler (CUDA graph on GPU, eager static-buffer loop on CPU)."""
    from ddpo_rl.precision import set_channels_last
    from ddpo_rl.sampling import FastSampler, FastSamplingConfig

    if s.args.channels_last:  # the model (shared by every method, as the recipe's option does)
        set_channels_last(s.unet)
    sampler = FastSampler(
        s.env,
        s.policy,
        FastSamplingConfig(cuda_graph=True, autocast_dtype=autocast_dtype, channels_last=s.args.channels_last),
    )
    return sampler, sampler.sample


def make_plain_policy_loop(s: Setup):
    """(e) The policy math of (c) without env or TensorDict: DDIMGaussianHead + DDIMGaussian."""
    from ddpo_rl.distributions import DDIMGaussian

    head = s.policy.head
    base = s.env.base_env
    transform = s.env.transform
    timesteps = base.timesteps

    @torch.no_grad()
    def run():
        ids = base.prompt_source.sample(s.B, generator=base._rng, device=s.device)
        x = torch.randn(s.B, *s.latent_shape, generator=base._rng, device=s.device) * base.init_noise_sigma
        emb = s.table[ids]
        latents, actions, log_probs = [], [], []
        for k in range(s.T):
            t = timesteps[k].expand(s.B)
            loc, scale = head(x, t, emb)
            dist = DDIMGaussian(loc, scale, event_dim=3, reduction="mean")
            a = dist.rsample()
            latents.append(x)
            actions.append(a)
            log_probs.append(dist.log_prob(a))
            x = a
        reward, _ = transform.score(x, base.prompts_of(ids))
        return torch.stack(latents, 1), torch.stack(actions, 1), torch.stack(log_probs, 1), reward

    return run


# -- training methods ----------------------------------------------------------------------------


def make_training(s: Setup, batch, autocast_dtype, optimizer_impl: str):
    """(DDPOTrainer step, bare PyTorch step, optimizer) on the same trajectories, model and optimizer.

    Both use the recipe's options: ``ddpo_rl.precision.make_adamw`` (``optimizer_impl``), autocast
    in ``autocast_dtype``, and a GradScaler for fp16 (bf16 needs none)."""
    from ddpo_rl import precision
    from ddpo_rl.collector import with_advantages
    from ddpo_rl.ddim import ddim_step_gaussian, gaussian_log_prob
    from ddpo_rl.keys import KEYS
    from ddpo_rl.objectives import make_loss
    from ddpo_rl.trainer import DDPOTrainer, TrainConfig

    B, T = batch.shape[:2]
    adv = torch.randn(B, generator=torch.Generator().manual_seed(0))
    batch = with_advantages(batch, adv)
    optimizer = precision.make_adamw(s.unet.parameters(), optimizer_impl, lr=1e-7)  # tiny lr: speed, not learning
    loss = make_loss("ddpo_is", s.policy, clip_epsilon=1e-4)
    fp16 = autocast_dtype == torch.float16

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(s.device.type, dtype=autocast_dtype)

    trainer = DDPOTrainer(
        loss, optimizer, TrainConfig(minibatch_size=B, max_grad_norm=1.0), autocast=autocast,
        grad_scaler=torch.amp.GradScaler(s.device.type) if fp16 else None,
    )

    def ddpo_trainer():
        return trainer.train(batch)

    head = s.policy.head
    coeffs = head.coeffs
    params = [p for p in s.unet.parameters() if p.requires_grad]
    lat, ts, emb = batch[KEYS.latents], batch[KEYS.timestep], batch[KEYS.prompt_embeds]
    act, old_lp = batch[KEYS.action], batch[KEYS.log_prob]
    adv_d = adv.to(s.device)
    neg = s.negative.expand(B, -1, -1) if s.w != 1.0 else None
    eps_clip = 1e-4
    scaler = torch.amp.GradScaler(s.device.type, enabled=fp16)

    def bare_loop():
        optimizer.zero_grad(set_to_none=True)
        for j in range(T):
            x, t, c = lat[:, j], ts[:, j], emb[:, j]
            with autocast():
                if neg is not None:
                    e_u, e_c = s.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([neg, c])).sample.chunk(2)
                    eps = e_u + s.w * (e_c - e_u)
                else:
                    eps = s.unet(x, t, encoder_hidden_states=c).sample
            mean, std = ddim_step_gaussian(coeffs, eps, t, x, s.eta)
            lp = gaussian_log_prob(act[:, j], mean, std)
            ratio = torch.exp(lp - old_lp[:, j])
            obj = torch.minimum(adv_d * ratio, adv_d * ratio.clamp(1 - eps_clip, 1 + eps_clip))
            scaler.scale(-obj.mean() / T).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return ddpo_trainer, bare_loop, optimizer


# -- FLOPs -------------------------------------------------------------------------------------


def count_flops(s: Setup, autocast_dtype, train_batch=None) -> dict:
    """UNet FLOPs of one sampling forward (CFG batch) and of one training step (fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 2 * s.B if s.w != 1.0 else s.B
    x = torch.randn(n, *s.latent_shape, device=s.device)
    t = torch.full((n,), 500, device=s.device, dtype=torch.long)
    c = s.table[torch.zeros(n, dtype=torch.long, device=s.device)]
    ctx = torch.autocast(s.device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(s.device.type, enabled=False)
    with torch.no_grad(), ctx, FlopCounterMode(display=False) as fc:
        s.unet(x, t, encoder_hidden_states=c)
    fwd = fc.get_total_flops()
    with ctx, FlopCounterMode(display=False) as fc2:
        s.unet(x, t, encoder_hidden_states=c).sample.float().mean().backward()
    s.unet.zero_grad(set_to_none=True)
    return {"unet_forward_flops": fwd, "unet_forward_batch": n, "unet_fwd_bwd_flops": fc2.get_total_flops()}


# -- the run -----------------------------------------------------------------------------------


def time_interleaved(methods: dict, device, warmup: int, repeats: int, progress_label: str) -> dict:
    """{name: [seconds per round]}, methods interleaved within each round."""
    times = {k: [] for k in methods}
    total = (warmup + repeats) * len(methods)
    progress = None
    try:
        from rich.progress import Progress

        progress = Progress(console=CONSOLE, transient=True)
    except ImportError:
        pass
    with progress if progress is not None else _Null() as p:
        task = p.add_task(progress_label, total=total) if progress is not None else None
        for r in range(warmup + repeats):
            for name, fn in methods.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
                if progress is not None:
                    p.update(task, advance=1, description=f"{progress_label}: {name}")
    return times


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def summarize(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": [round(t, 6) for t in times],
    }


def paired_overhead_pct(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of (slow/fast - 1), in percent."""
    return 100 * statistics.median(a / b - 1 for a, b in zip(slow, fast))


def profile_call(fn, top: int = 25) -> str:
    """cProfile one call; the top functions by total (self) time."""
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


COLLECTION_LABELS = {
    "baseline_loop": "(a) eager diffusers loop + log-probs",
    "diffusers_pipeline": "(b) StableDiffusionPipeline, no log-probs",
    "ddpo_rl_eager": "(c) ddpo_rl collect_trajectories (env.step loop)",
    "torchrl_env_rollout": "(c0) torchrl env.rollout(T, policy)",
    "ddpo_rl_graphed": "(d) ddpo_rl FastSampler",
    "plain_policy_loop": "(e) same policy math, plain tensors",
}

# The targets (GPU, SD-1.5 UNet, batch 8, 50 steps, CFG): see benchmarks/README.md.
TARGETS = {
    "collection_vs_baseline": (">=", 2.0),
    "collection_vs_pipeline": (">=", 1.2),
    "env_overhead_pct": ("<", 3.0),
    "trainer_overhead_pct": ("<", 10.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    from ddpo_rl.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny", help="random-weight model to build")
    ap.add_argument("--latent-size", type=int, default=None, help="latent H=W (default 8 tiny, 64 sd15)")
    ap.add_argument("--batch", type=int, default=8, help="trajectories sampled in parallel")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps T")
    ap.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype of every method")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convs (fp32 runs on GPU)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last UNet in the graphed sampler")
    ap.add_argument("--optimizer", default="auto", choices=["auto", "fused", "foreach", "for-loop"],
                    help="AdamW implementation of the training step")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each method")
    ap.add_argument("--train-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--skip-training", action="store_true", help="time sampling only")
    ap.add_argument("--skip-pipeline", action="store_true", help="do not time the diffusers pipeline baseline")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the FLOP/s fraction")
    ap.add_argument("--profile", action="store_true", help="cProfile one env.rollout and one plain loop (printed, and in the JSON)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--flow", action="store_true", help="also time the flow-matching sampler (benchmarks/flow_throughput.py)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.latent_size is None:
        args.latent_size = 8 if args.model == "tiny" else 64
    return args


def configure(args) -> tuple[torch.device, torch.dtype | None]:
    """Threads, device, TF32; returns (device, autocast dtype or None)."""
    from ddpo_rl import precision

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.model == "sd15" and device.type != "cuda":
        log("[yellow]--model sd15 on CPU: expect minutes per collection[/yellow]")
    if args.tf32:
        precision.set_tf32(True)
    return device, precision.autocast_dtype(args.dtype)


def collection_methods(s: Setup, autocast_dtype) -> tuple[dict, object]:
    """{method key: zero-argument callable}, and the FastSampler of (d)."""

    def with_autocast(fn):
        if autocast_dtype is None:
            return fn
        return lambda: _autocast_call(fn, s.device, autocast_dtype)

    sampler, graphed_fn = make_ddpo_graphed(s, autocast_dtype)
    methods = {"baseline_loop": with_autocast(make_baseline_loop(s))}
    if not s.args.skip_pipeline:
        methods["diffusers_pipeline"] = with_autocast(make_pipeline(s))
    methods["ddpo_rl_eager"] = with_autocast(make_ddpo_eager(s))
    methods["torchrl_env_rollout"] = with_autocast(make_torchrl_rollout(s))
    methods["ddpo_rl_graphed"] = graphed_fn  # autocast inside (UNet only)
    methods["plain_policy_loop"] = with_autocast(make_plain_policy_loop(s))
    return methods, sampler


def run_collection(s: Setup, args, methods: dict, sampler, flops: dict) -> dict:
    """Time the collection methods (interleaved), then one call each for peak memory."""
    log("collection: warm-up and timed rounds")
    times = time_interleaved(methods, s.device, args.warmup, args.repeats, "collection")
    mem = {}
    for name, fn in methods.items():
        with PeakMemory(s.device) as pm:
            fn()
        mem[name] = pm
    peak = flops["peak_flops"]
    collection = {}
    base_med = statistics.median(times["baseline_loop"])
    pipe_med = statistics.median(times["diffusers_pipeline"]) if "diffusers_pipeline" in times else None
    for name, ts in times.items():
        med = statistics.median(ts)
        fwd_flops = flops["unet_forward_flops"] * args.steps
        label = COLLECTION_LABELS[name]
        if name == "ddpo_rl_graphed":
            label += " (CUDA graph)" if sampler.graphed else " (CPU: eager fallback)"
        entry = {
            "label": label,
            **summarize(ts),
            "samples_per_s": args.batch / med,
            "computes_log_probs": name != "diffusers_pipeline",
            "ratio_to_baseline": base_med / med,
            "ratio_to_pipeline": (pipe_med / med) if pipe_med else None,
            "paired_ratio_to_baseline": statistics.median(b / a for a, b in zip(ts, times["baseline_loop"])),
            "peak_mem_bytes": mem[name].peak,
            "peak_mem_delta_bytes": mem[name].delta,
            "achieved_unet_flops_per_s": fwd_flops / med,
            "unet_flops_fraction_of_peak": (fwd_flops / med / peak) if peak else None,
        }
        if name == "ddpo_rl_graphed":
            entry["graphed"] = sampler.graphed
            if not sampler.graphed:
                entry["note"] = "no CUDA: the static-buffer step runs eagerly (the code that is captured on GPU)"
        collection[name] = entry
    return {"collection": collection, "env_overhead": env_overhead_figures(times, args.steps)}


def env_overhead_figures(times: dict, steps: int) -> dict:
    """(c) and (c0) against (e): the torchrl env's share of a sampling loop."""
    eo = {
        "env_rollout_median_s": statistics.median(times["ddpo_rl_eager"]),
        "plain_loop_median_s": statistics.median(times["plain_policy_loop"]),
        "torchrl_env_rollout_median_s": statistics.median(times["torchrl_env_rollout"]),
    }
    eo["overhead_pct"] = 100 * (eo["env_rollout_median_s"] / eo["plain_loop_median_s"] - 1)
    eo["overhead_pct_paired_median"] = paired_overhead_pct(times["ddpo_rl_eager"], times["plain_policy_loop"])
    eo["per_step_overhead_ms"] = 1e3 * (eo["env_rollout_median_s"] - eo["plain_loop_median_s"]) / steps
    eo["torchrl_env_rollout_overhead_pct"] = 100 * (eo["torchrl_env_rollout_median_s"] / eo["plain_loop_median_s"] - 1)
    eo["torchrl_env_rollout_overhead_pct_paired_median"] = paired_overhead_pct(
        times["torchrl_env_rollout"], times["plain_policy_loop"]
    )
    return eo


def run_training(s: Setup, args, autocast_dtype, flops: dict) -> dict:
    """DDPOTrainer vs the bare loop on one collected batch, interleaved; then peak memory."""
    log("training: DDPOTrainer vs bare loop")
    from ddpo_rl.collector import collect_trajectories

    batch = collect_trajectories(s.env, s.policy)
    trainer_fn, bare_fn, optimizer = make_training(s, batch, autocast_dtype, args.optimizer)
    t_times = time_interleaved(
        {"ddpo_trainer": trainer_fn, "bare_loop": bare_fn}, s.device, args.warmup, args.train_repeats or args.repeats, "training"
    )
    peak = flops["peak_flops"]
    training = {}
    train_step_flops = flops["unet_fwd_bwd_flops"] * args.steps  # one (sample x timestep) pass over B x T
    for name, ts in t_times.items():
        with PeakMemory(s.device) as pm:
            (trainer_fn if name == "ddpo_trainer" else bare_fn)()
        med = statistics.median(ts)
        training[name] = {
            **summarize(ts),
            "sample_timesteps_per_s": args.batch * args.steps / med,
            "peak_mem_bytes": pm.peak,
            "peak_mem_delta_bytes": pm.delta,
            "achieved_unet_flops_per_s": train_step_flops / med,
            "unet_flops_fraction_of_peak": (train_step_flops / med / peak) if peak else None,
        }
    training["trainer_overhead_pct"] = 100 * (training["ddpo_trainer"]["median_s"] / training["bare_loop"]["median_s"] - 1)
    training["trainer_overhead_pct_paired_median"] = paired_overhead_pct(t_times["ddpo_trainer"], t_times["bare_loop"])
    training["optimizer"] = type(optimizer).__name__
    training["optimizer_impl"] = args.optimizer
    training["optimizer_fused"] = bool(optimizer.defaults.get("fused"))
    return training


def evaluate_targets(args, device, collection: dict, env_overhead: dict, training: dict | None) -> dict:
    """Each target of :data:`TARGETS` with the measured value; ``applies`` only in the issue's setting."""
    is_target_setting = (
        device.type == "cuda" and args.model == "sd15" and args.batch == 8 and args.steps == 50 and args.cfg != 1.0
    )
    measured = {
        "collection_vs_baseline": collection["ddpo_rl_graphed"]["ratio_to_baseline"],
        "collection_vs_pipeline": collection["ddpo_rl_graphed"]["ratio_to_pipeline"],
        "env_overhead_pct": env_overhead["overhead_pct"],
        "trainer_overhead_pct": training["trainer_overhead_pct"] if training else None,
    }
    targets = {
        "applies": is_target_setting,
        "note": "the issue's targets are for GPU, SD-1.5 UNet, batch 8, 50 steps, CFG; other settings are indicative only",
    }
    for key, (op, bound) in TARGETS.items():
        value = measured[key]
        met = None if value is None else (value >= bound if op == ">=" else value < bound)
        targets[key] = {"target": f"{op} {bound}", "measured": value, "met": met}
    return targets


def run_config(args, s: Setup, device) -> dict:
    return {
        "model": args.model,
        "unet_params": sum(p.numel() for p in s.unet.parameters()),
        "latent_size": args.latent_size,
        "batch": args.batch,
        "steps": args.steps,
        "cfg": args.cfg,
        "eta": 1.0,
        "dtype": args.dtype,
        "tf32": args.tf32,
        "channels_last": args.channels_last,
        "device": str(device),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "vae_decode": "skipped by every method (pipeline output_type='latent'; others: latent->pixel map + brightness reward)",
    }


def machine_info(device, load_start) -> dict:
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "python": platform.python_version(),
        "versions": _versions(),
    }


def run_flow_collection(args, device) -> dict:
    """The flow-matching family, same protocol (its own model: an SD3 transformer; benchmarks/flow_throughput.py)."""
    from flow_throughput import flow_collection

    log("flow-matching collection: warm-up and timed rounds")
    return flow_collection(args, device, PROMPTS, brightness, latent_to_images, time_interleaved, summarize, paired_overhead_pct)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.json:
        prepare_output_file(args.json, "json")  # before measuring: a bad path loses nothing
    device, autocast_dtype = configure(args)
    load_start = loadavg()
    log(f"building {args.model} (latent {args.latent_size}, batch {args.batch}, {args.steps} steps, cfg {args.cfg}) on {device}")
    s = Setup(args, device)
    methods, sampler = collection_methods(s, autocast_dtype)
    flops = count_flops(s, autocast_dtype)
    flops["peak_flops"], flops["peak_basis"] = peak_flops(device, args.dtype, args.tf32, args.peak_tflops)
    collected = run_collection(s, args, methods, sampler, flops)
    training = None if args.skip_training else run_training(s, args, autocast_dtype, flops)
    profile = None
    if args.profile:
        profile = {name: profile_call(methods[name]) for name in ("ddpo_rl_eager", "plain_policy_loop")}
    flow = run_flow_collection(args, device) if args.flow else None
    result = {
        "schema": SCHEMA,
        "config": run_config(args, s, device),
        "machine": machine_info(device, load_start),
        **collected,
        "training": training,
        "flops": flops,
        "targets": evaluate_targets(args, device, collected["collection"], collected["env_overhead"], training),
        "profile": profile,
        "flow_collection": flow,
    }
    _print_tables(result)
    if profile:
        for k, v in profile.items():
            print(f"\n===== cProfile: {k} =====\n{v}", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
        log(f"wrote {args.json}")
    return result


def _autocast_call(fn, device, dtype):
    with torch.autocast(device.type, dtype=dtype):
        return fn()


def _versions() -> dict:
    out = {}
    for mod in ("torch", "torchrl", "tensordict", "diffusers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def _fmt_bytes(n):
    return f"{n / 2**20:,.1f} MiB" if n is not None else "-"


def _print_tables(r: dict) -> None:
    c = r["config"]
    head = (
        f"{c['model']} UNet ({c['unet_params'] / 1e6:.1f}M), latent {c['latent_size']}, batch {c['batch']}, "
        f"{c['steps']} steps, cfg {c['cfg']}, {c['dtype']}, {c['device']} ({r['machine']['device_name']}), "
        f"load {r['machine']['loadavg_start']} -> {r['machine']['loadavg_end']}"
    )
    try:
        from rich.table import Table
    except ImportError:
        print(json.dumps({k: r[k] for k in ("collection", "env_overhead", "training")}, indent=1), file=sys.stderr)
        return
    t = Table(title=f"Collection: {head}")
    for col in ("method", "median s", "samples/s", "x (a)", "x (b)", "peak mem", "+ during", "UNet FLOP/s", "of peak"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for name, e in r["collection"].items():
        t.add_row(
            e["label"].split(" ")[0] + " " + name + (" (graph)" if e.get("graphed") else ""),
            f"{e['median_s']:.3f}",
            f"{e['samples_per_s']:.2f}",
            f"{e['ratio_to_baseline']:.2f}",
            f"{e['ratio_to_pipeline']:.2f}" if e["ratio_to_pipeline"] else "-",
            _fmt_bytes(e["peak_mem_bytes"]),
            _fmt_bytes(e["peak_mem_delta_bytes"]),
            f"{e['achieved_unet_flops_per_s'] / 1e9:,.1f} G",
            f"{100 * e['unet_flops_fraction_of_peak']:.1f}%" if e["unet_flops_fraction_of_peak"] else "-",
        )
    CONSOLE.print(t)
    CONSOLE.print("(a) eager diffusers loop + log-probs; (b) StableDiffusionPipeline, no log-probs; (c) collect_trajectories; (c0) env.rollout; "
                  "(d) FastSampler (CUDA graph on GPU, eager on CPU); (e) (c)'s policy math on plain tensors")
    eo = r["env_overhead"]
    CONSOLE.print(
        f"env overhead of collect_trajectories vs (e): {eo['overhead_pct']:.1f}% (paired median {eo['overhead_pct_paired_median']:.1f}%), "
        f"{eo['per_step_overhead_ms']:.2f} ms per step; of torchrl env.rollout: {eo['torchrl_env_rollout_overhead_pct']:.1f}% "
        f"(paired median {eo['torchrl_env_rollout_overhead_pct_paired_median']:.1f}%)"
    )
    if r["training"]:
        tr = r["training"]
        t2 = Table(title="Training (one DDPO-IS pass over batch x steps)")
        for col in ("method", "median s", "(sample x timestep)/s", "peak mem", "+ during", "UNet FLOP/s", "of peak"):
            t2.add_column(col, justify="right" if col != "method" else "left")
        for name in ("ddpo_trainer", "bare_loop"):
            e = tr[name]
            t2.add_row(
                name,
                f"{e['median_s']:.3f}",
                f"{e['sample_timesteps_per_s']:.1f}",
                _fmt_bytes(e["peak_mem_bytes"]),
                _fmt_bytes(e["peak_mem_delta_bytes"]),
                f"{e['achieved_unet_flops_per_s'] / 1e9:,.1f} G",
                f"{100 * e['unet_flops_fraction_of_peak']:.1f}%" if e["unet_flops_fraction_of_peak"] else "-",
            )
        CONSOLE.print(t2)
        CONSOLE.print(
            f"trainer overhead vs bare loop: {tr['trainer_overhead_pct']:.1f}% (paired median {tr['trainer_overhead_pct_paired_median']:.1f}%)"
        )
    if r.get("flow_collection"):
        fl = r["flow_collection"]
        CONSOLE.print(
            "flow matching (SD3 transformer, SDE a=0.7): "
            + ", ".join(f"{k} {v['median_s']:.3f} s ({v['ratio_to_baseline']:.2f}x (fa))" for k, v in fl["methods"].items())
            + f"; env overhead {fl['env_overhead_pct']:.1f}%"
        )
    tg = r["targets"]
    CONSOLE.print(f"targets apply to this setting: {tg['applies']} ({tg['note']})")


if __name__ == "__main__":
    with report_user_errors():
        main()
