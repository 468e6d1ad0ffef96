"""Run configuration: one dataclass, named presets, and a command line that can set any field.

``DDPOConfig`` holds everything a recipe needs; every field has a docstring. Presets are
partial overrides of the defaults. On the command line (built by tyro, see ddpo_rl.cli)::

    python recipes/ddpo_is.py --preset digits --reward jpeg_compressibility --epochs 50 \
        --seed 1 --output-dir runs/x --learning-rate 1e-4 --guidance-scale 2

``--NAME VALUE`` (or ``--NAME=VALUE``) sets any field (dashes or underscores); an unknown
name, a value of the wrong type or an impossible setting stops the run with a one-line
error naming the field and the fix, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal

from ddpo_rl.atomic import write_json
from ddpo_rl.ddim import LOG_PROB_REDUCTIONS
from ddpo_rl.loggers import LOGGERS
from ddpo_rl.objectives import LOSS_OPTIONS, LOSSES
from ddpo_rl.objectives.rwr import RWR_MODES
from ddpo_rl.precision import MIXED_PRECISION_MODES, OPTIMIZER_IMPLS
from ddpo_rl.rewards.transform import ON_INVALID
from ddpo_rl.sampling import SAMPLERS

ALGORITHMS = LOSSES
"""The algorithms a recipe runs: one per loss of ddpo_rl.objectives."""

# choice fields: their allowed values are the constants of the code that uses them
Algorithm = Literal[LOSSES]
LogProbReduction = Literal[LOG_PROB_REDUCTIONS]
MixedPrecision = Literal[MIXED_PRECISION_MODES]
OnInvalidReward = Literal[ON_INVALID]
RWRMode = Literal[RWR_MODES]
LoggerKind = Literal[LOGGERS]
Sampler = Literal[SAMPLERS]
OptimizerImpl = Literal[OPTIMIZER_IMPLS]


class ConfigError(ValueError):
    """A configuration that cannot run, with the field and the fix in its message."""


@dataclass
class DDPOConfig:
    """Everything a DDPO run needs. Defaults are the digits preset (CPU, minutes)."""

    # --- what to run -----------------------------------------------------------------------
    preset: str = "digits"
    """Name of the preset these values started from (informational once loaded)."""
    algorithm: Algorithm = "ddpo_is"
    """Policy-gradient variant: "ddpo_is" (clipped importance sampling), "ddpo_sf" (REINFORCE) or "rwr"."""
    seed: int = 0
    """Seed of every random stream (sampling noise, prompts, shuffles). Same seed + config = same run on CPU."""
    epochs: int = 48
    """Number of epochs (one epoch = sample a batch of trajectories, then train on it)."""
    output_dir: str = "outputs/ddpo"
    """Where config.json, metrics.jsonl, sample grids, curves and checkpoints go."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""

    # --- model -----------------------------------------------------------------------------
    model: str = "digits-flow"
    """"digits-flow" (the default: the embedded digits UNet pretrained with the flow-matching objective,
    sampled with Flow-GRPO's SDE), "digits" (the same UNet pretrained for epsilon, sampled with DDIM;
    the digits-ddim preset), "tiny" (random tiny SD, tests), "flow-digits" (the embedded SD3-style
    flow-matching model); each embedded model is trained on first use if its committed checkpoint is
    missing. Or a directory of a digits / digits-flow / flow-digits model saved by the
    project (e.g. `recipes/pretrain_digits.py --out DIR`; its defaults are the embedded model's), or
    a Stable Diffusion / SD3 hub id or local pipeline directory (e.g. runwayml/stable-diffusion-v1-5,
    stabilityai/stable-diffusion-3.5-medium)."""
    revision: str | None = None
    """Hub revision of an SD model (None = default branch)."""
    use_lora: bool = False
    """Train LoRA adapters on the UNet (peft) instead of all its weights."""
    lora_rank: int = 4
    """LoRA rank r (with use_lora; set on the command line without it, refused)."""
    lora_alpha: float = 4.0
    """LoRA alpha (scale = alpha / r; with use_lora, like lora_rank)."""
    mixed_precision: MixedPrecision = "auto"
    """"auto" (bf16 on CUDA, "no" on CPU), "no", "fp16" or "bf16": autocast of the UNet in sampling
    and training (both samplers); trainable weights and the optimizer state stay float32, and on
    CUDA the frozen weights (text encoder, VAE, the UNet base under LoRA) are stored in this dtype
    (SD-1.5 UNet base: 1.7 GB instead of 3.4 GB). "fp16" adds a GradScaler. Not measured: no GPU
    was lent when this was written (benchmarks/gpu_check.sh measures it)."""
    allow_tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass (less memory, ~30% slower)."""

    # --- sampling (the MDP) -----------------------------------------------------------------
    num_inference_steps: int = 10
    """T, the number of DDIM steps per sample (50 in the paper)."""
    eta: float = 1.0
    """DDIM eta, in (0, 1]: > 0 so that each step is a Gaussian with a log-prob; 1 (the paper's) is the
    DDPM posterior's variance, the most a DDIM step allows."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale (5.0 in the paper; 1.0 disables it)."""
    sample_batch_size: int = 32
    """Trajectories sampled in parallel (the env's batch size)."""
    num_batches_per_epoch: int = 2
    """Batches sampled per epoch: sample_batch_size x num_batches_per_epoch trajectories per epoch."""
    log_prob_reduction: LogProbReduction = "mean"
    """Reduce per-dim log-densities by "mean" (the paper's scale, default) or "sum". The clip range depends on it."""

    # --- flow matching, GRPO groups, large prompt sets ---------------------------------------
    noise_level: float = 0.7
    """Flow-matching models only: Flow-GRPO's SDE noise level a > 0 (sigma_t = a sqrt(t / (1 - t)); 0.7 in the paper).
    Any a > 0 is a Gaussian policy, but the SDE is discretised in num_inference_steps steps: large values
    ruin the samples (flow-digits at 10 steps, a = 5: the base model draws no digits, P(prompted digit)
    0.12 against 0.93 at 0.7, on the training prompts); the base evaluation shows it."""
    group_size: int | None = 4
    """GRPO: sample each prompt this many times per batch and standardise the rewards within each group
    (replaces per-prompt statistics). Must divide sample_batch_size. None, 0 or 1: off."""
    sde_window_size: int | None = None
    """Flow-matching models only: sample with the SDE (and train) on this many consecutive steps only, and
    with the deterministic Euler ODE step elsewhere (MixGRPO / Flow-GRPO-Fast): fewer trained steps per
    epoch. None or 0: every step is an SDE step and trainable (Flow-GRPO)."""
    sde_window_start: int = 0
    """First step (0 = the noisiest) of the SDE window of `sde_window_size` steps."""
    prompt_cache_size: int = 1024
    """Prompts whose embeddings are kept (LRU) by each env; prompts are encoded at reset, in batches. SD3 with
    T5 holds ~2.7 MB per prompt."""

    # --- prompts and reward -----------------------------------------------------------------
    prompts: str = "digits:0-4"
    """Training prompts: "digits:A-B" (digits A..B), a prompt-set name (simple_animals, imagenet_animals,
    animal_activities) or a text file with one prompt per line."""
    eval_prompts: str = "digits:5-9"
    """Held-out prompts for evaluation (generalisation), same forms as `prompts`."""
    reward: str = "jpeg_compressibility"
    """Reward function name (see ddpo_rl.rewards.registry)."""
    reward_kwargs: dict = field(default_factory=lambda: {"resize": 32})
    """Keyword arguments of the reward function. The digits default upscales the 8x8 images to 32x32
    (nearest) before JPEG: at 8x8 one JPEG block holds the whole image and the size barely varies."""
    reward_async: bool = False
    """Compute rewards in a background thread (ddpo_rl.rewards.async_reward.AsyncReward): each batch's
    images are submitted at its last step and scored while the next batch samples; the collector
    waits for all rewards after the epoch's last batch. For slow reward models (VLMs). A reward that
    is already asynchronous (e.g. vlm_alignment with {"asynchronous": true}) is used as is."""
    on_invalid_reward: OnInvalidReward = "raise"
    """NaN/inf rewards: "raise" a named error, or "drop" those samples with a warning (left out of the
    update and of the statistics; metrics.jsonl and eval.jsonl count the samples kept, `num_samples` /
    `eval_num_samples`, and eval.jsonl the ones left out, `train_left_out` / `eval_left_out`)."""

    # --- advantages and loss ----------------------------------------------------------------
    per_prompt_stat_tracking: bool = True
    """Normalise rewards per prompt (True) or over the batch (False)."""
    stat_buffer_size: int = 32
    """Recent rewards kept per prompt for its statistics."""
    stat_min_count: int = 16
    """Below this many rewards for a prompt, use the batch statistics."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    clip_epsilon: float = 1e-4
    """PPO clip range epsilon of DDPO-IS (torchrl's ClipPPOLoss name; the paper's "clip_range", 1e-4 for
    mean-reduced log-probs)."""
    rwr_mode: RWRMode = "exponential"
    """RWR weights: "exponential" (softmax of A / temperature) or "sparse" (top quantile)."""
    rwr_temperature: float = 1.0
    """RWR temperature beta."""
    rwr_quantile: float = 0.9
    """Sparse RWR: fraction of samples given weight 0."""

    # --- optimisation -----------------------------------------------------------------------
    learning_rate: float = 5e-4
    """AdamW learning rate."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the gradient's norm to this before each optimizer step; 0 turns clipping off (as in
    transformers' Trainer)."""
    minibatch_size: int = 32
    """Trajectories per training forward pass."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step (timesteps are always accumulated). DDPO-SF ignores it: being
    on-policy, it accumulates the whole epoch's batch into one optimizer step."""
    num_inner_epochs: int = 1
    """Passes over each epoch's batch (DDPO-IS and RWR; DDPO-SF needs 1)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on."""

    # --- staying close to the pretrained model: KL, monitors, alarm, best checkpoint ---------
    kl_coef: float = 0.03
    """beta of the KL(pi_theta || pi_ref) penalty to the model before fine-tuning, per denoising step and
    reduced over latent dims like the log-probs (0 = off: the paper's setting, no reference forward; the
    SD presets, tiny, digits-alignment and digits-incompressibility use 0; digits 0.03, digits-ddim 0.1,
    flow-digits 0.015, measured in the README: they keep the digits, 0 erases them).
    With LoRA the reference is the UNet with its adapters disabled (no copy); without LoRA it is a frozen
    copy of the UNet (its parameter bytes again in memory)."""
    kl_sigma_scale: float = 0.0
    """0: the KL penalty is the exact per-step KL, which weighs the squared mean difference by
    1/(2 sigma_t^2), so the last, nearly deterministic steps dominate it. s > 0: each step's KL is
    weighted by 1 + sigma_t^2/s^2, adding the squared mean distance / (2 s^2) at every step, which holds
    the early steps (those that decide what the image shows) too. kl_to_reference logs the exact KL.
    Measured on digits (docs/results/digits_search.md): s 0.2-0.3 moves along the same reward/digit
    trade-off as the exact KL, so the presets keep 0."""
    reference_interpolation: float = 0.85
    """lambda of the weights every evaluation, sample grid, final/ and best/ use: theta_ref + lambda
    (theta - theta_ref), the trained weights interpolated back towards the model before fine-tuning
    (WiSE-FT; LITI in WARP). 1 = the trained weights (off; every preset but digits). Training and
    checkpoints are unchanged, so a run's final numbers at another lambda can be measured afterwards
    (recipes/interpolate.py). Without LoRA it keeps a copy of the trainable weights
    (ddpo_rl/interpolation.py); with LoRA it scales the adapters' update. digits: 0.85, measured with
    kl_coef 0.03 (docs/results/digits_interpolation.md): it gives up about a tenth of the reward gain
    for a classifier ratio higher by about 0.04, a better trade than stopping earlier."""
    monitor_rewards: list[str] = field(default_factory=lambda: ["digit_alignment", "digit_realism"])
    """Rewards computed on every evaluation's samples and never trained on (reward names, as for
    `reward`), to see what fine-tuning costs. Default: follows `reward` and `model` (digits: the digit
    classifier, or sample_diversity when training digit_alignment, and digit_realism, the closeness to
    real digits, which sees artefacts the classifier does not; SD: aesthetic, or vlm_alignment when
    training aesthetic). [] for none."""
    monitor_reward_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the monitors, by monitor name, e.g. {"digit_alignment": {"C": 1.0}}."""
    monitor_tolerance: float = 1.5
    """A monitor more than this many base std below its base value (on the training or the held-out
    prompts) counts as over-optimisation: logged once; such evaluations are not candidates for best/.
    (digits: the classifier's base std is about 0.10, so 1.5 is about 0.83 x its base value; digits-ddim:
    0.077 and 0.045 on the training and held-out prompts, digit_realism's 0.21 and 0.11, tolerance 1.)"""
    stop_on_monitor_drop: bool = False
    """End the run (with a checkpoint and final/) at the first evaluation whose monitors fall out of tolerance."""

    # --- speed and memory (measured effects: benchmarks/README.md) ---------------------------
    sampler: Sampler = "auto"
    """How trajectories are sampled, for training and evaluation: "env" (the torchrl env stepped by
    the policy: ddpo_rl.collector, the reference), "graphed" (ddpo_rl.sampling.FastSampler: the same
    math and random draws on static buffers, the T-step loop replayed as one CUDA graph on CUDA,
    run eagerly on CPU) or "auto" (graphed on CUDA, env on CPU). On CPU both give bitwise the same
    run, and the graphed one is no faster there (1.05x the env path's sampling time, paired rounds,
    tiny UNet batch 32 x 10 steps), hence auto = env on CPU. GPU: not measured (no GPU was lent)."""
    threads: int = 0
    """CPU threads of torch's intra-op pool. 0 = follow the machine's load: the cores the other
    processes leave free (between 1 and one per core), looked at after set-up, between an epoch's
    sampling and training, after each optimizer step and after each epoch;
    metrics.jsonl records sampling_threads / training_threads. N > 0 = exactly N (also what an
    OMP_NUM_THREADS in the environment does): set it for bitwise-reproducible runs, since the thread
    count changes float round-off. Measured, digits run on 2 cores, s/epoch alone / beside one busy
    process: 2 threads 5.7 / 20.7, 1 thread 10.6 / 11.9 (benchmarks/README.md "CPU threads", with
    the figures of 0; ddpo_rl/threads.py)."""
    channels_last: bool = False
    """Store the UNet's conv weights and feed its inputs in channels_last (tensor-core convs on GPU).
    On CPU (digits run) within the noise: 0.96x sampling, 0.97x training time. GPU: not measured."""
    sdpa_attention: bool = True
    """Pin diffusers' SDPA attention processor (flash / memory-efficient kernels on GPU) on the UNet.
    It is diffusers' default on torch 2 already, so on CPU it changes nothing (bitwise the same)."""
    optimizer_impl: OptimizerImpl = "auto"
    """AdamW implementation: "fused" (one kernel), "foreach", "for-loop", or "auto" (fused on CUDA,
    foreach on CPU). On CPU (digits run) fused vs foreach: 0.99x training time (noise; the update
    is a small part of a step). GPU: not measured."""

    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_every: int = 12
    """Evaluate (held-out reward, sample grid) every this many epochs, and at the first and last."""
    eval_num_samples: int = 128
    """Samples per evaluation, for each of the train and held-out prompt sets (>= 128 for the reported result)."""
    grid_samples_per_prompt: int = 4
    """Columns of the sample grid (one row per eval prompt, fixed seeds)."""
    save_every: int = 12
    """Write a checkpoint every this many epochs (and at the end, and on SIGINT/SIGTERM)."""
    resume: str | None = None
    """A run directory (or its checkpoint) to continue from; the run continues in that directory
    (output_dir follows it). Fields outside CHANGEABLE_ON_RESUME must stay as the run had them."""
    overwrite: bool = False
    """Replace an earlier run found in output_dir (its config, logs, samples, checkpoints, weights).
    Without it a fresh run into a directory holding a run stops with an error."""
    progress: bool = True
    """Show the rich progress display."""
    logger: LoggerKind = "none"
    """Also send metrics, eval rewards and images to a torchrl logger: "csv", "tensorboard", "wandb" or
    "mlflow" (files under output_dir/logs). "none": only the run directory's own files (metrics.jsonl etc.)."""
    logger_kwargs: dict = field(default_factory=dict)
    """Options of the logger's constructor, e.g. {"project": "ddpo", "offline": true} for W&B."""

    # ----------------------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        return self.sample_batch_size * self.num_batches_per_epoch

    def validate(self) -> DDPOConfig:
        """Raise :class:`ConfigError` on any setting that cannot run; returns self."""

        def need(cond: bool, field_name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{field_name}: {msg}")

        check_finite_floats(self)
        expand_user_paths(self)
        if self.resume is not None:  # a resumed run continues in its own directory
            from ddpo_rl.checkpoint import run_dir_of

            run_dir = run_dir_of(self.resume)
            default_out = PRESETS.get(self.preset, {}).get("output_dir", DDPOConfig.output_dir)
            if os.path.abspath(self.output_dir) not in (run_dir, os.path.abspath(default_out)):
                raise ConfigError(
                    f"output_dir: --resume continues the run in its own directory ({run_dir}), not in "
                    f"{self.output_dir}; drop --output-dir (or give that same directory)"
                )
            self.output_dir = run_dir
        for name, choices in _choice_fields(type(self)).items():
            need(getattr(self, name) in choices, name, f"{getattr(self, name)!r} is not one of {choices}")
        for name in (
            "epochs", "num_inference_steps", "sample_batch_size", "num_batches_per_epoch", "minibatch_size",
            "gradient_accumulation_steps", "num_inner_epochs", "eval_every", "save_every", "eval_num_samples",
            "stat_buffer_size", "stat_min_count", "lora_rank", "grid_samples_per_prompt",
        ):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        # torch's generators take 0 .. 2**64 - 1, and the evaluations seed seed + a few million
        need(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        need(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        need(self.eta > 0, "eta", f"eta={self.eta}: DDPO's log-probs need eta > 0 (the paper uses 1.0)")
        need(self.eta <= 1, "eta", f"eta={self.eta}: DDIM's eta is at most 1 (the DDPM posterior's variance; "
             "above it a step's noise can exceed what the schedule allows, and diffusers' step returns NaN)")
        need(self.guidance_scale >= 1.0, "guidance_scale", "must be >= 1.0 (1.0 disables guidance)")
        need(0 < self.learning_rate <= 1, "learning_rate",
             f"must be in (0, 1], got {self.learning_rate}: an AdamW step moves each weight by about the learning rate")
        for name in ("adam_beta1", "adam_beta2"):
            need(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        need(self.adam_epsilon > 0, "adam_epsilon", f"must be positive, got {self.adam_epsilon}")
        need(self.adam_weight_decay >= 0, "adam_weight_decay", f"must be >= 0, got {self.adam_weight_decay}")
        need(self.rwr_temperature > 0, "rwr_temperature", f"must be positive, got {self.rwr_temperature}")
        need(0 <= self.rwr_quantile < 1, "rwr_quantile", f"must be in [0, 1), got {self.rwr_quantile}")
        need(not self.per_prompt_stat_tracking or self.group_size not in (None, 0, 1)
             or self.stat_min_count <= self.stat_buffer_size, "stat_min_count",
             f"{self.stat_min_count} is more than stat_buffer_size {self.stat_buffer_size}: a prompt's buffer "
             "would never hold enough rewards, and every advantage would use the batch statistics")
        need(self.clip_epsilon > 0, "clip_epsilon", "must be positive")
        need(self.adv_clip_max > 0, "adv_clip_max", "must be positive")
        need(0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]")
        need(self.kl_coef >= 0, "kl_coef", f"must be >= 0 (0 disables the KL penalty), got {self.kl_coef}")
        need(self.kl_sigma_scale >= 0, "kl_sigma_scale", f"must be >= 0 (0 = the exact KL), got {self.kl_sigma_scale}")
        need(0 < self.reference_interpolation <= 1, "reference_interpolation",
             f"must be in (0, 1] (1 = the trained weights, smaller = closer to the base model), got {self.reference_interpolation}")
        need(self.monitor_tolerance > 0, "monitor_tolerance", f"must be positive (in base std), got {self.monitor_tolerance}")
        need(isinstance(self.monitor_rewards, list) and all(isinstance(m, str) and m.strip() for m in self.monitor_rewards),
             "monitor_rewards", f"must be a list of reward names, got {self.monitor_rewards!r}")
        need(len(set(self.monitor_rewards)) == len(self.monitor_rewards), "monitor_rewards", f"{self.monitor_rewards} repeats a name")
        stray = sorted(set(self.monitor_reward_kwargs) - set(self.monitor_rewards))
        need(not stray, "monitor_reward_kwargs", f"has kwargs for {stray[:1]}, not in monitor_rewards {self.monitor_rewards}")
        need(all(isinstance(v, dict) for v in self.monitor_reward_kwargs.values()), "monitor_reward_kwargs",
             'must map monitor names to keyword dicts, e.g. {"digit_alignment": {"C": 1.0}}')
        need(not self.stop_on_monitor_drop or bool(self.monitor_rewards), "stop_on_monitor_drop",
             "needs at least one monitor: set monitor_rewards (e.g. --monitor-rewards digit_alignment)")
        need(self.threads >= 0, "threads", f"must be >= 0 (0 = follow the machine's load), got {self.threads}")
        need(self.algorithm != "ddpo_sf" or self.num_inner_epochs == 1, "num_inner_epochs",
             "DDPO-SF is on-policy (one optimizer step per epoch's batch): use 1, or --algorithm ddpo_is")
        need(self.noise_level > 0, "noise_level", f"{self.noise_level}: the flow-matching SDE needs a > 0 (0.7 in Flow-GRPO)")
        window = self.sde_window_size or 0
        need(0 <= window <= self.num_inference_steps, "sde_window_size",
             f"{self.sde_window_size} must be in [0, num_inference_steps={self.num_inference_steps}]")
        need(self.sde_window_start >= 0 and (not window or self.sde_window_start + window <= self.num_inference_steps),
             "sde_window_start", f"{self.sde_window_start}: the window [{self.sde_window_start}, "
             f"{self.sde_window_start + window}) must lie within the {self.num_inference_steps} sampling steps")
        need(self.prompt_cache_size > 0, "prompt_cache_size", f"must be positive, got {self.prompt_cache_size}")
        group = self.group_size or 1
        need(group >= 1 and self.sample_batch_size % group == 0, "group_size",
             f"{self.group_size} must be >= 0 and divide sample_batch_size={self.sample_batch_size} (whole groups per batch)")
        per_step = self.minibatch_size * self.gradient_accumulation_steps
        need(
            self.samples_per_epoch % per_step == 0,
            "minibatch_size",
            f"{self.samples_per_epoch} samples per epoch (sample_batch_size x num_batches_per_epoch) is not "
            f"divisible by minibatch_size x gradient_accumulation_steps = {per_step}; change one of them",
        )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str) -> None:
        """The fields as JSON, written atomically (:func:`ddpo_rl.atomic.write_json`)."""
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> DDPOConfig:
        """A config from a dict of fields (a config.json's ``history`` entry is not a field: ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {RENAMED_FIELDS.get(k, k): v for k, v in d.items() if k != "history"}
        unknown = sorted(set(d) - names)
        if unknown:
            from ddpo_rl.cli import unknown_field_message

            raise ConfigError(f"{unknown[0]}: {unknown_field_message(cls, unknown[0])}")
        return cls(**d)


RENAMED_FIELDS = {"clip_range": "clip_epsilon"}
"""Old field name -> new name: config.json files and checkpoints of earlier versions still load."""


# Fields that may differ when a run is resumed; each is applied for real and recorded in config.json's
# history. ANY OTHER FIELD IS FIXED ON RESUME (a new field is fixed until it is added here): the
# algorithm, model, LoRA, sizes the optimizer or the reward statistics depend on, seed, reward, prompts...
CHANGEABLE_ON_RESUME = frozenset({
    "epochs", "eval_every", "save_every", "eval_num_samples", "grid_samples_per_prompt",  # cadence
    "learning_rate",  # set on the optimizer's param groups after its state is loaded
    "max_grad_norm", "on_invalid_reward", "reward_async", "progress", "device", "prompt_cache_size",  # execution
    "logger", "logger_kwargs", "stop_on_monitor_drop",  # reporting
    "threads", "sampler", "channels_last", "sdpa_attention",  # speed: the same math (see their docstrings)
    "output_dir", "resume", "overwrite",  # where the run lives (output_dir follows resume)
})


def check_finite_floats(cfg) -> None:
    """ConfigError naming the first float field of dataclass ``cfg`` holding NaN or +-inf."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "float" in str(hints.get(f.name)) and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}: must be a finite number, got {value}")


def expand_user_paths(cfg) -> None:
    """Expand a leading ``~`` in every string field of dataclass ``cfg`` (paths; other values never start with it)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(cfg, f.name, os.path.expanduser(value))


def _choice_fields(cls: type) -> dict[str, tuple]:
    """{field: allowed values} for the fields typed ``Literal[...]``."""
    hints = typing.get_type_hints(cls)
    return {n: typing.get_args(t) for n, t in hints.items() if typing.get_origin(t) is Literal}


# DDPO on the DDIM digits model (the default run until the digits-flow model, and still the paper's
# MDP exactly): DDPO-IS with per-prompt statistics, KL 0.1; every field the digits preset sets otherwise
# (docs/results/kl_front_digits-ddim.md measures it).
_DIGITS_DDIM = dict(
    model="digits", group_size=None, learning_rate=3e-4, kl_coef=0.1, reference_interpolation=1.0, monitor_tolerance=1.0,
    epochs=30, eval_every=10, save_every=10,
)

# Partial overrides of DDPOConfig's defaults. "digits" is the defaults themselves: DDPO-IS on the
# digits-flow model (Flow-GRPO's SDE, groups of 4, KL 0.03, the weights it evaluates and saves
# interpolated 0.85 of the way from the base model to the trained ones), chosen by measurement (README,
# "What the default run shows"; docs/results/kl_front_digits.md, digits_interpolation.md). A preset
# states every field it relies on that the digits preset sets for its own model (model, groups,
# learning rate, KL, interpolation, tolerance, cadence).
PRESETS: dict[str, dict] = {
    "digits": {},
    "digits-ddim": dict(_DIGITS_DDIM, output_dir="outputs/digits-ddim"),
    "digits-alignment": dict(
        _DIGITS_DDIM, reward="digit_alignment", reward_kwargs={}, monitor_rewards=["sample_diversity", "digit_realism"],
        kl_coef=0.0, guidance_scale=1.0, epochs=40, output_dir="outputs/digits-alignment"
    ),
    "digits-incompressibility": dict(
        _DIGITS_DDIM, reward="jpeg_incompressibility", kl_coef=0.0, output_dir="outputs/digits-incompressibility"
    ),
    # Flow-GRPO on the embedded flow-matching digits model (recipes/flow_grpo.py's default; values
    # chosen by measurement, README "Flow-matching policies"). monitor_tolerance 1.5 base std of the
    # digit classifier (~0.12, i.e. ~0.87 x its base value) is a little stricter than the 0.85 x bar.
    "flow-digits": dict(
        model="flow-digits", group_size=4, noise_level=0.7, guidance_scale=5.0, learning_rate=5e-4, epochs=60,
        eval_every=12, save_every=12, kl_coef=0.015, reference_interpolation=1.0, monitor_tolerance=1.5,
        output_dir="outputs/flow-digits",
    ),
    # tiny random model: for smoke tests of the plumbing, not for learning
    "tiny": dict(
        model="tiny", group_size=None, learning_rate=3e-4, monitor_tolerance=1.0, prompts="digits:0-4", eval_prompts="digits:5-9", epochs=2, num_inference_steps=3,
        sample_batch_size=4, num_batches_per_epoch=1, minibatch_size=4, eval_every=1, save_every=1,
        eval_num_samples=4, grid_samples_per_prompt=2, reward="jpeg_compressibility", monitor_rewards=[],
        kl_coef=0.0, reference_interpolation=1.0, output_dir="outputs/tiny",
    ),
}

# The paper's Stable Diffusion settings (Black et al. 2024, appendix; one GPU: batch x accumulation).
_SD15 = dict(
    model="runwayml/stable-diffusion-v1-5", use_lora=True, lora_rank=4, lora_alpha=4.0, mixed_precision="auto",
    num_inference_steps=50, eta=1.0, guidance_scale=5.0, sample_batch_size=8, num_batches_per_epoch=32,
    minibatch_size=8, gradient_accumulation_steps=8, num_inner_epochs=1, timestep_fraction=1.0,
    learning_rate=3e-4, clip_epsilon=1e-4, adv_clip_max=5.0, max_grad_norm=1.0, per_prompt_stat_tracking=True,
    stat_buffer_size=16, stat_min_count=16, epochs=100, eval_every=10, save_every=10, eval_num_samples=64,
    prompts="simple_animals", eval_prompts="imagenet_animals", adam_weight_decay=1e-4, monitor_rewards=["aesthetic"],
    kl_coef=0.0, reference_interpolation=1.0, group_size=None, monitor_tolerance=1.0,
)
PRESETS.update(
    {
        "sd15-aesthetic": dict(_SD15, reward="aesthetic", reward_kwargs={}, monitor_rewards=["vlm_alignment"], epochs=200, output_dir="outputs/sd15-aesthetic"),
        "sd15-compressibility": dict(_SD15, reward="jpeg_compressibility", reward_kwargs={"resize": 512},
                                     output_dir="outputs/sd15-compressibility"),
        "sd15-incompressibility": dict(_SD15, reward="jpeg_incompressibility", reward_kwargs={"resize": 512},
                                       output_dir="outputs/sd15-incompressibility"),
        "sd15-alignment": dict(_SD15, reward="vlm_alignment", reward_kwargs={}, reward_async=True, prompts="animal_activities",
                               eval_prompts="animal_activities", output_dir="outputs/sd15-alignment"),
    }
)


# Flow-GRPO's Stable Diffusion 3.5 Medium settings (Liu et al. 2025; github.com/yifan123/flow_grpo,
# config/base.py, config/grpo.py, scripts/train_sd3.py), scaled to one GPU: 10 SDE steps per sample
# (40 deterministic steps in its evaluation), CFG 4.5, noise level a = 0.7, 512 px (the SD3 loader's
# default), LoRA r=32 / alpha=64 on the joint-attention projections (ddpo_rl.lora.DEFAULT_SD3_LORA_TARGETS),
# PPO clip 1e-4, timestep_fraction 0.99, groups of G images per prompt with group-standardised
# advantages (24 in the paper on 32 GPUs; 8 here), two optimiser steps per epoch. Its KL coefficient
# (0 for compressibility, 0.01-0.04 for PickScore/GenEval) is kl_coef (0 here). Registered in PRESETS
# below, for recipes/flow_grpo.py (docs/stable_diffusion_3.md); each entry is a valid DDPOConfig
# (tests/models/test_sd3.py).
_SD35 = dict(
    model="stabilityai/stable-diffusion-3.5-medium", use_lora=True, lora_rank=32, lora_alpha=64.0,
    mixed_precision="fp16", num_inference_steps=10, guidance_scale=4.5, noise_level=0.7, group_size=8,
    sample_batch_size=8, num_batches_per_epoch=12, minibatch_size=4, gradient_accumulation_steps=12,
    num_inner_epochs=1, timestep_fraction=0.99, learning_rate=3e-4, clip_epsilon=1e-4, adv_clip_max=5.0,
    max_grad_norm=1.0, adam_weight_decay=1e-4, per_prompt_stat_tracking=True, epochs=100, eval_every=10,
    save_every=10, eval_num_samples=64, prompts="simple_animals", eval_prompts="imagenet_animals",
    kl_coef=0.0, reference_interpolation=1.0, monitor_tolerance=1.0,
)
FLOW_PRESETS: dict[str, dict] = {
    "sd35-compressibility": dict(_SD35, reward="jpeg_compressibility", reward_kwargs={"resize": 512},
                                 monitor_rewards=["aesthetic"], output_dir="outputs/sd35-compressibility"),
    "sd35-aesthetic": dict(_SD35, reward="aesthetic", reward_kwargs={}, monitor_rewards=["vlm_alignment"], epochs=200,
                           output_dir="outputs/sd35-aesthetic"),
}
PRESETS.update(FLOW_PRESETS)


# Defaults that belong to another field's value: when the user changes the owner (reward or model)
# and not the dependent field, the dependent field takes the default for the new owner value
# instead of keeping the preset's (which belonged to the preset's reward or model).
_JPEG_REWARDS = ("jpeg_compressibility", "compressibility", "jpeg_incompressibility", "incompressibility")
_DIGIT_ALIGNMENT = ("digit_alignment", "alignment")
_AESTHETIC = ("aesthetic", "laion_aesthetic")
DEPENDENT_FIELDS: dict[str, tuple[str, ...]] = {
    "reward_kwargs": ("reward", "model"),
    "monitor_rewards": ("reward", "model"),
    "monitor_reward_kwargs": ("reward", "model", "monitor_rewards"),
}
"""dependent field -> the fields whose value its default belongs to."""


def _reward_key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def default_reward_kwargs(reward: str, model: str) -> dict:
    """The reward_kwargs that suit ``reward`` on ``model``: JPEG rewards are measured on 32x32 images
    for the 8x8 models (one JPEG block would hold a whole 8x8 image) and at 512 for Stable Diffusion."""
    from ddpo_rl.models.loading import DIGIT_FAMILIES, model_family  # a saved digits directory counts as "digits"

    if _reward_key(reward) in _JPEG_REWARDS:  # the digit models and tiny make 8x8 images
        return {"resize": 32 if model_family(model) in (*DIGIT_FAMILIES, "tiny") else 512}
    return {}


def default_monitor_rewards(reward: str, model: str) -> list[str]:
    """The monitors that show what training ``reward`` on ``model`` costs.

    digits: the digit classifier (is it still the prompted digit?), or, when that is the training
    reward, the sample diversity of each prompt's samples (its failure is mode collapse); and in both
    cases the closeness to real digits (``digit_realism``: artefacts a linear classifier keeps, such
    as bright edge columns, move an image away from every real digit). Stable
    Diffusion: the aesthetic score, or the VLM alignment when training the aesthetic score. The tiny
    random model (plumbing tests) has none.
    """
    from ddpo_rl.models.loading import DIGIT_FAMILIES, model_family  # a saved digits directory counts as "digits"

    key, family = _reward_key(reward), model_family(model)
    if family == "tiny":
        return []
    if family in DIGIT_FAMILIES:
        return ["sample_diversity" if key in _DIGIT_ALIGNMENT else "digit_alignment", "digit_realism"]
    return ["vlm_alignment"] if key in _AESTHETIC else ["aesthetic"]


def _dependent_default(field_name: str, values: dict) -> typing.Any:
    if field_name == "reward_kwargs":
        return default_reward_kwargs(values["reward"], values["model"])
    if field_name == "monitor_rewards":
        return default_monitor_rewards(values["reward"], values["model"])
    return {}  # monitor_reward_kwargs: the monitors' own defaults


def preset_config(name: str, **overrides) -> DDPOConfig:
    """The config of preset ``name`` with ``overrides`` (the fields the user set explicitly).

    A preset value that belongs to another field's value (:data:`DEPENDENT_FIELDS`: reward_kwargs
    belongs to the reward, the monitors to the reward and the model) follows that field: when an
    override changes the owner and leaves the dependent field alone, the dependent field gets the
    default for the new value (``--reward alignment`` on the digits preset drops the JPEG resize).
    A dependent value given explicitly is kept as given (and checked when the run is set up).
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"preset: unknown preset {name!r}{hint}; choose from {', '.join(PRESETS)}")
    preset = {**DDPOConfig().to_dict(), **PRESETS[name]}
    values = dict(preset, preset=name)
    values.update(overrides)
    changed = {k for k in overrides if k in preset and overrides[k] != preset[k]}
    for dependent, owners in DEPENDENT_FIELDS.items():  # in order: monitor kwargs follow the monitors
        if dependent not in overrides and changed & set(owners):
            values[dependent] = _dependent_default(dependent, values)
            if values[dependent] != preset[dependent]:
                changed.add(dependent)
    return DDPOConfig.from_dict(values)


def parse_cli(argv: list[str] | None = None, **defaults) -> DDPOConfig:
    """Build a validated config from ``argv``: ``--preset NAME`` and any ``--field value``.

    The preset's values apply first (``--preset``, else ``defaults["preset"]``, the script's default
    preset, else "digits"), then ``defaults`` (the script's own, e.g. ``algorithm="rwr"``),
    then the fields given on the command line: ``preset_config`` receives those explicit fields
    only. ``--help`` lists every field with its docstring (tyro's help).
    """

    argv = list(sys.argv[1:] if argv is None else argv)
    parsed, given, preset, preset_given = _read_cli(argv, defaults)
    base = resume_base(given["resume"]) if given.get("resume") else None
    if base is not None:  # --resume RUN_DIR: the run's own config, then what this command sets
        out = given.get("output_dir")
        if out is not None and os.path.abspath(os.path.expanduser(out)) != base["output_dir"]:
            raise ConfigError(
                f"output_dir: --resume continues the run in its own directory ({base['output_dir']}), not in "
                f"{out}; drop --output-dir (or give that same directory)"
            )
        explicit = {**defaults, **given, **({"preset": parsed.preset} if preset_given else {})}
        return DDPOConfig.from_dict({**base, **explicit}).validate()
    cfg = preset_config(preset, **{**defaults, **given}).validate()
    unused = unused_fields(cfg)
    for name in given:
        if name in unused:
            raise ConfigError(f"{name}: set, but {unused[name]}")
    return cfg


def unused_fields(cfg: DDPOConfig) -> dict[str, str]:
    """The fields ``cfg``'s run does not read, each with why and what to do instead. Given on the command
    line they are refused (:func:`parse_cli`): a setting that silently does nothing (a temperature for
    a loss that has none, a KL weighting with no KL term) is a trap. A preset may hold them (the
    digits preset's RWR settings under DDPO-IS): defaults, not the user's word."""
    unused = {}

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if not cfg.use_lora:
        for name in ("lora_rank", "lora_alpha"):
            unused[name] = ("use_lora is false, so the run would fine-tune every weight of the network; add "
                            f"--use-lora true, or drop {flag(name)}")
    for loss, options in LOSS_OPTIONS.items():
        for name in options:
            if name not in LOSS_OPTIONS[cfg.algorithm]:
                unused.setdefault(name, f"algorithm {cfg.algorithm} does not use it (a setting of {loss}); use "
                                        f"--algorithm {loss}, or drop {flag(name)}")
    if cfg.kl_coef == 0:
        unused["kl_sigma_scale"] = ("kl_coef is 0: there is no KL term for it to weight; set --kl-coef, or drop "
                                    "--kl-sigma-scale")
    if not cfg.per_prompt_stat_tracking or cfg.group_size not in (None, 0, 1):
        why = ("per_prompt_stat_tracking is false" if not cfg.per_prompt_stat_tracking
               else f"group_size {cfg.group_size} normalises each group by itself")
        for name in ("stat_buffer_size", "stat_min_count"):
            unused[name] = f"{why}, so no per-prompt reward buffer is kept; drop {flag(name)}"
    if not cfg.monitor_rewards:
        unused["monitor_tolerance"] = ("monitor_rewards is empty: no monitor to hold within it; set "
                                       "--monitor-rewards, or drop --monitor-tolerance")
    # the sampler's own settings: the model's kind, as the loader will decide it (nothing is loaded)
    from ddpo_rl.models.loading import FLOW_MATCHING_KINDS, model_kind

    if model_kind(cfg.model) in FLOW_MATCHING_KINDS:
        unused["eta"] = (f"model {cfg.model!r} is a flow-matching model, whose SDE noise is set by noise_level; "
                         "eta is DDIM's; drop --eta")
    else:
        for name in ("noise_level", "sde_window_size", "sde_window_start"):
            unused[name] = (f"model {cfg.model!r} samples with DDIM, whose noise is set by eta; it is a setting "
                            f"of the flow-matching SDE (e.g. --model flow-digits); drop {flag(name)}")
    return unused


def options_used(argv: list[str], **defaults) -> list[str]:
    """``argv`` without the options the run it describes would not read (:func:`unused_fields`). For the
    multi-run recipes, whose shared options may concern some of their runs only (a clip range: the
    DDPO-IS runs of a comparison; a KL weighting: the kl_coef > 0 runs of a front). ``defaults`` as
    for :func:`parse_cli`."""
    from ddpo_rl.cli import option_groups

    defaults = dict(defaults)
    _, given, preset, _ = _read_cli(list(argv), defaults)
    unused = unused_fields(preset_config(preset, **{**defaults, **given}))
    return [token for name, group in option_groups(DDPOConfig, list(argv)) if name not in unused for token in group]


def _read_cli(argv: list[str], defaults: dict) -> tuple[DDPOConfig, dict, str, bool]:
    """(tyro's reading of ``argv``, the fields it gives but the preset, the preset to apply, whether
    ``--preset`` was given). Pops ``defaults["preset"]``: the script's default preset
    (recipes/flow_grpo.py), which applies when ``--preset`` is not given."""
    from ddpo_rl import cli

    try:
        parsed, given = cli.parse(DDPOConfig, argv, description=_cli_description())
    except cli.CLIError as err:
        raise ConfigError(str(err)) from None
    script_preset = defaults.pop("preset", None)
    preset_given = given.pop("preset", None) is not None
    preset = parsed.preset if preset_given else (script_preset or parsed.preset)
    return parsed, given, preset, preset_given


def _cli_description() -> str:
    return (
        "A DDPO run: --preset NAME, then --FIELD VALUE for any field below (the defaults shown are the "
        f"digits preset's). Presets: {', '.join(PRESETS)}."
    )


def resume_base(resume: str) -> dict | None:
    """The fields a resumed run ran with (its config.json), or None when it has none readable.

    A resumed command starts from these, not from a preset: ``--resume RUN_DIR`` alone continues the
    run as it was, and only the fields the command sets explicitly may differ (then checked against
    CHANGEABLE_ON_RESUME). ``output_dir`` is RUN_DIR; fields unknown to this version are dropped.
    """
    from ddpo_rl.checkpoint import run_dir_of

    run_dir = run_dir_of(os.path.expanduser(resume))
    stored, _ = stored_config(run_dir)
    if stored is None:
        return None  # no readable config, nor a checkpoint recording one: the checkpoint check will say so
    if not {"algorithm", "model", "reward"} <= set(stored):
        return None  # not a DDPO run's config (e.g. dppo_gym's): the checkpoint check will say what it is
    names = {f.name for f in dataclasses.fields(DDPOConfig)} - {"resume", "overwrite"}
    base = {k: v for k, v in stored.items() if k in names}
    base["output_dir"] = run_dir
    return base


# Fields added after runs were made whose default is not what those runs did: a stored DDPO config
# (config.json, a checkpoint's) without the field ran with this value. Resuming, comparing or measuring
# such a run reads this value, never the new default (which would change what an old run evaluates).
ADDED_FIELDS: dict[str, object] = {"reference_interpolation": 1.0}


def with_added_fields(stored: dict) -> dict:
    """A stored DDPO config with the :data:`ADDED_FIELDS` it predates filled in as its run had them."""
    return {**ADDED_FIELDS, **stored}


def stored_defaults() -> dict:
    """What a field missing from a stored DDPO config had: its :data:`ADDED_FIELDS` value, else the default."""
    return {**DDPOConfig().to_dict(), **ADDED_FIELDS}


def stored_config(run_dir: str, kind: str = "ddpo") -> tuple[dict | None, str | None]:
    """(the config a run in ``run_dir`` ran with, None), read from its config.json (without ``history``).
    When that file is gone or damaged (it is written atomically, so by something else): (the config
    that the run's checkpoint of ``kind`` records, or None if there is none; why: "missing" or
    "damaged (...)"), with a note on stderr when the checkpoint supplies it. A DDPO config gets the
    :data:`ADDED_FIELDS` it predates."""
    from ddpo_rl.checkpoint import CheckpointError, read_checkpoint
    from ddpo_rl.run_dir import CONFIG_NAME, read_config

    fill = with_added_fields if kind == "ddpo" else dict
    try:
        return fill(read_config(run_dir)[0]), None
    except (OSError, ValueError) as err:
        why = "missing" if isinstance(err, FileNotFoundError) else f"damaged ({' '.join(str(err).split())})"
    try:
        stored = read_checkpoint(run_dir, kind=kind, required=("config",)).state["config"]
    except CheckpointError:
        return None, why
    print(f"note: {os.path.join(run_dir, CONFIG_NAME)} is {why}; the run's config is read from its checkpoint "
          "(a resume writes config.json again)", file=sys.stderr, flush=True)
    return fill(stored), why


def cli_help() -> str:
    """The ``--help`` text: every field of :class:`DDPOConfig` with its docstring and default."""
    from ddpo_rl import cli

    return cli.help_text(DDPOConfig, description=_cli_description())
