"""Run configuration: one dataclass, named presets, and a command line that can set any field.

``DDPOConfig`` holds everything a recipe needs; every field has a docstring. Presets are
partial overrides of the defaults. On the command line::

    python recipes/ddpo_is.py --preset digits --reward jpeg_compressibility --epochs 50 \
        --seed 1 --output-dir runs/x --learning-rate 1e-4 --guidance-scale 2

``--NAME VALUE`` (or ``--NAME=VALUE``) sets any field (dashes or underscores); an unknown
name, a value of the wrong type or an impossible setting stops the run with a one-line
error naming the field and the fix, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field

ALGORITHMS = ("ddpo_is", "ddpo_sf", "rwr")


class ConfigError(ValueError):
    """A configuration that cannot run, with the field and the fix in its message."""


@dataclass
class DDPOConfig:
    """Everything a DDPO run needs. Defaults are the digits preset (CPU, minutes)."""

    # --- what to run -----------------------------------------------------------------------
    preset: str = "digits"
    """Name of the preset these values started from (informational once loaded)."""
    algorithm: str = "ddpo_is"
    """Policy-gradient variant: "ddpo_is" (clipped importance sampling), "ddpo_sf" (REINFORCE) or "rwr"."""
    seed: int = 0
    """Seed of every random stream (sampling noise, prompts, shuffles). Same seed + config = same run on CPU."""
    epochs: int = 30
    """Number of epochs (one epoch = sample a batch of trajectories, then train on it)."""
    output_dir: str = "outputs/ddpo"
    """Where config.json, metrics.jsonl, sample grids, curves and checkpoints go."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""

    # --- model -----------------------------------------------------------------------------
    model: str = "digits"
    """"digits" (the embedded model, trained on first use), "tiny" (random tiny SD, tests), or a
    Stable Diffusion hub id / local pipeline directory (e.g. runwayml/stable-diffusion-v1-5)."""
    revision: str | None = None
    """Hub revision of an SD model (None = default branch)."""
    use_lora: bool = False
    """Train LoRA adapters on the UNet (peft) instead of all its weights."""
    lora_rank: int = 4
    """LoRA rank r."""
    lora_alpha: float = 4.0
    """LoRA alpha (scale = alpha / r)."""
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16": autocast for the UNet; trainable weights stay float32."""
    allow_tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass (less memory, ~30% slower)."""

    # --- sampling (the MDP) -----------------------------------------------------------------
    num_inference_steps: int = 10
    """T, the number of DDIM steps per sample (50 in the paper)."""
    eta: float = 1.0
    """DDIM eta (> 0: each step is a Gaussian with a log-prob)."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale (5.0 in the paper; 1.0 disables it)."""
    sample_batch_size: int = 32
    """Trajectories sampled in parallel (the env's batch size)."""
    num_batches_per_epoch: int = 2
    """Batches sampled per epoch: sample_batch_size x num_batches_per_epoch trajectories per epoch."""
    log_prob_reduction: str = "mean"
    """Reduce per-dim log-densities by "mean" (the paper's scale, default) or "sum". The clip range depends on it."""

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
    """Compute rewards in a background thread (ddpo_rl.rewards.alignment.AsyncReward): each batch's
    images are submitted at its last step and scored while the next batch samples; the collector
    waits for all rewards after the epoch's last batch. For slow reward models (VLMs). A reward that
    is already asynchronous (e.g. vlm_alignment with {"asynchronous": true}) is used as is."""
    on_invalid_reward: str = "raise"
    """NaN/inf rewards: "raise" a named error, or "drop" those samples with a warning."""

    # --- advantages and loss ----------------------------------------------------------------
    per_prompt_stat_tracking: bool = True
    """Normalise rewards per prompt (True) or over the batch (False)."""
    stat_buffer_size: int = 32
    """Recent rewards kept per prompt for its statistics."""
    stat_min_count: int = 16
    """Below this many rewards for a prompt, use the batch statistics."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    clip_range: float = 1e-4
    """PPO clip range epsilon of DDPO-IS (for mean-reduced log-probs; 1e-4 in the paper)."""
    rwr_mode: str = "exponential"
    """RWR weights: "exponential" (softmax of A / temperature) or "sparse" (top quantile)."""
    rwr_temperature: float = 1.0
    """RWR temperature beta."""
    rwr_quantile: float = 0.9
    """Sparse RWR: fraction of samples given weight 0."""

    # --- optimisation -----------------------------------------------------------------------
    learning_rate: float = 3e-4
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
    """Gradient-norm clipping before each optimizer step."""
    minibatch_size: int = 32
    """Trajectories per training forward pass."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step (timesteps are always accumulated). DDPO-SF ignores it: being
    on-policy, it accumulates the whole epoch's batch into one optimizer step."""
    num_inner_epochs: int = 1
    """Passes over each epoch's batch (DDPO-IS and RWR; DDPO-SF needs 1)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on."""

    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_every: int = 10
    """Evaluate (held-out reward, sample grid) every this many epochs, and at the first and last."""
    eval_num_samples: int = 128
    """Samples per evaluation, for each of the train and held-out prompt sets (>= 128 for the reported result)."""
    grid_samples_per_prompt: int = 4
    """Columns of the sample grid (one row per eval prompt, fixed seeds)."""
    save_every: int = 10
    """Write a checkpoint every this many epochs (and at the end, and on SIGINT/SIGTERM)."""
    resume: str | None = None
    """A run directory (or its checkpoint) to continue from; the run continues in that directory
    (output_dir follows it). Fields outside CHANGEABLE_ON_RESUME must stay as the run had them."""
    overwrite: bool = False
    """Replace an earlier run found in output_dir (its config, logs, samples, checkpoints, weights).
    Without it a fresh run into a directory holding a run stops with an error."""
    progress: bool = True
    """Show the rich progress display."""

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
        need(self.algorithm in ALGORITHMS, "algorithm", f"{self.algorithm!r} is not one of {ALGORITHMS}")
        for name in (
            "epochs", "num_inference_steps", "sample_batch_size", "num_batches_per_epoch", "minibatch_size",
            "gradient_accumulation_steps", "num_inner_epochs", "eval_every", "save_every", "eval_num_samples",
            "stat_buffer_size", "stat_min_count", "lora_rank", "grid_samples_per_prompt",
        ):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(self.eta > 0, "eta", f"eta={self.eta}: DDPO's log-probs need eta > 0 (the paper uses 1.0)")
        need(self.guidance_scale >= 1.0, "guidance_scale", "must be >= 1.0 (1.0 disables guidance)")
        need(0 < self.learning_rate <= 1, "learning_rate",
             f"must be in (0, 1], got {self.learning_rate}: an AdamW step moves each weight by about the learning rate")
        need(self.clip_range > 0, "clip_range", "must be positive")
        need(self.adv_clip_max > 0, "adv_clip_max", "must be positive")
        need(0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]")
        need(self.log_prob_reduction in ("mean", "sum"), "log_prob_reduction", 'must be "mean" or "sum"')
        need(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", 'must be "no", "fp16" or "bf16"')
        need(self.on_invalid_reward in ("raise", "drop"), "on_invalid_reward", 'must be "raise" or "drop"')
        need(self.rwr_mode in ("exponential", "sparse"), "rwr_mode", 'must be "exponential" or "sparse"')
        need(self.algorithm != "ddpo_sf" or self.num_inner_epochs == 1, "num_inner_epochs",
             "DDPO-SF is on-policy (one optimizer step per epoch's batch): use 1, or --algorithm ddpo_is")
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
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> DDPOConfig:
        """A config from a dict of fields (a config.json's ``history`` entry is not a field: ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k != "history"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{unknown[0]}: {_unknown_field_message(unknown[0])}")
        return cls(**d)


# Fields that may differ when a run is resumed; each is applied for real and recorded in config.json's
# history. ANY OTHER FIELD IS FIXED ON RESUME (a new field is fixed until it is added here): the
# algorithm, model, LoRA, sizes the optimizer or the reward statistics depend on, seed, reward, prompts...
CHANGEABLE_ON_RESUME = frozenset({
    "epochs", "eval_every", "save_every", "eval_num_samples", "grid_samples_per_prompt",  # cadence
    "learning_rate",  # set on the optimizer's param groups after its state is loaded
    "max_grad_norm", "on_invalid_reward", "reward_async", "progress", "device",  # execution only
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


def _unknown_field_message(name: str) -> str:
    names = [f.name for f in dataclasses.fields(DDPOConfig)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see DDPOConfig for the fields"
    return f"unknown config field; {hint}"


# Partial overrides of DDPOConfig's defaults. "digits" is the defaults themselves.
PRESETS: dict[str, dict] = {
    "digits": {},
    "digits-alignment": dict(
        reward="digit_alignment", reward_kwargs={}, guidance_scale=1.0, epochs=40, learning_rate=3e-4, output_dir="outputs/digits-alignment"
    ),
    "digits-incompressibility": dict(reward="jpeg_incompressibility", output_dir="outputs/digits-incompressibility"),
    # tiny random model: for smoke tests of the plumbing, not for learning
    "tiny": dict(
        model="tiny", prompts="digits:0-4", eval_prompts="digits:5-9", epochs=2, num_inference_steps=3,
        sample_batch_size=4, num_batches_per_epoch=1, minibatch_size=4, eval_every=1, save_every=1,
        eval_num_samples=4, grid_samples_per_prompt=2, reward="jpeg_compressibility", output_dir="outputs/tiny",
    ),
}

# The paper's Stable Diffusion settings (Black et al. 2024, appendix; one GPU: batch x accumulation).
_SD15 = dict(
    model="runwayml/stable-diffusion-v1-5", use_lora=True, lora_rank=4, lora_alpha=4.0, mixed_precision="fp16",
    num_inference_steps=50, eta=1.0, guidance_scale=5.0, sample_batch_size=8, num_batches_per_epoch=32,
    minibatch_size=8, gradient_accumulation_steps=8, num_inner_epochs=1, timestep_fraction=1.0,
    learning_rate=3e-4, clip_range=1e-4, adv_clip_max=5.0, max_grad_norm=1.0, per_prompt_stat_tracking=True,
    stat_buffer_size=16, stat_min_count=16, epochs=100, eval_every=10, save_every=10, eval_num_samples=64,
    prompts="simple_animals", eval_prompts="imagenet_animals", adam_weight_decay=1e-4,
)
PRESETS.update(
    {
        "sd15-aesthetic": dict(_SD15, reward="aesthetic", reward_kwargs={}, epochs=200, output_dir="outputs/sd15-aesthetic"),
        "sd15-compressibility": dict(_SD15, reward="jpeg_compressibility", reward_kwargs={"resize": 512},
                                     output_dir="outputs/sd15-compressibility"),
        "sd15-incompressibility": dict(_SD15, reward="jpeg_incompressibility", reward_kwargs={"resize": 512},
                                       output_dir="outputs/sd15-incompressibility"),
        "sd15-alignment": dict(_SD15, reward="vlm_alignment", reward_kwargs={}, reward_async=True, prompts="animal_activities",
                               eval_prompts="animal_activities", output_dir="outputs/sd15-alignment"),
    }
)


def preset_config(name: str, **overrides) -> DDPOConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"preset: unknown preset {name!r}{hint}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[name], preset=name)
    values.update(overrides)
    return DDPOConfig.from_dict(values)


def _convert(name: str, raw: str, annotation) -> typing.Any:
    """Parse a command-line string into the type of field ``name``."""
    text = str(annotation)
    try:
        if raw.lower() in ("none", "null") and "None" in text:
            return None
        if "bool" in text:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "dict" in text:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError(raw)
            return value
        if text.startswith("int") or text == "<class 'int'>":
            return int(raw)
        if text.startswith("float") or text == "<class 'float'>":
            return float(raw)
        return raw
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"{name}: cannot read {raw!r} as {text}") from None


def parse_cli(argv: list[str] | None = None, **defaults) -> DDPOConfig:
    """Build a validated config from ``argv``: ``--preset NAME`` first, then any ``--field value``.

    ``defaults`` (e.g. ``algorithm="rwr"``) apply on top of the preset, below the command line.
    ``--help`` lists every field with its docstring.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(DDPOConfig)}
    hints = typing.get_type_hints(DDPOConfig)
    if any(a in ("-h", "--help") for a in argv):
        print(cli_help())
        raise SystemExit(0)
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --FIELD VALUE pairs (see --help)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{key}: missing value")
            value = argv[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), value))
    preset = dict(pairs).get("preset", "digits")
    values = {}
    for key, raw in pairs:
        if key == "preset":
            continue
        if key not in fields:
            raise ConfigError(f"{key}: {_unknown_field_message(key)}")
        values[key] = _convert(key, raw, hints[key])
    base = resume_base(values["resume"]) if values.get("resume") else None
    if base is not None:  # --resume RUN_DIR: the run's own config, then what this command sets
        explicit = {**defaults, **values, **({"preset": preset} if "preset" in dict(pairs) else {})}
        return DDPOConfig.from_dict({**base, **explicit}).validate()
    cfg = preset_config(preset, **{**defaults, **values})
    return cfg.validate()


def resume_base(resume: str) -> dict | None:
    """The fields a resumed run ran with (its config.json), or None when it has none readable.

    A resumed command starts from these, not from a preset: ``--resume RUN_DIR`` alone continues the
    run as it was, and only the fields the command sets explicitly may differ (then checked against
    CHANGEABLE_ON_RESUME). ``output_dir`` is RUN_DIR; fields unknown to this version are dropped.
    """
    from ddpo_rl.checkpoint import run_dir_of

    run_dir = run_dir_of(os.path.expanduser(resume))
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not {"algorithm", "model", "reward"} <= set(stored):
        return None  # not a DDPO run's config (e.g. dppo_gym's): the checkpoint check will say what it is
    names = {f.name for f in dataclasses.fields(DDPOConfig)} - {"resume", "overwrite"}
    base = {k: v for k, v in stored.items() if k in names}
    base["output_dir"] = run_dir
    return base


def cli_help() -> str:
    import ast
    import inspect

    lines = ["usage: python recipes/<algo>.py [--preset NAME] [--FIELD VALUE ...]", "", f"presets: {', '.join(PRESETS)}", ""]
    src = inspect.getsource(DDPOConfig)
    tree = ast.parse(src)
    body = tree.body[0].body
    defaults = DDPOConfig()
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                doc = " ".join(str(nxt.value.value).split())
            name = node.target.id
            lines.append(f"  --{name.replace('_', '-')} (default {getattr(defaults, name)!r})\n      {doc}")
    return "\n".join(lines)
