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

    # --- staying close to the pretrained model: KL, monitors, alarm, best checkpoint ---------
    kl_coef: float = 0.1
    """beta of the KL(pi_theta || pi_ref) penalty to the model before fine-tuning, per denoising step and
    reduced over latent dims like the log-probs (0 = off: the paper's setting, no reference forward; the
    SD presets, tiny, digits-alignment and digits-incompressibility use 0; digits 0.1, measured in the
    README: it keeps the digits, 0 erases them).
    With LoRA the reference is the UNet with its adapters disabled (no copy); without LoRA it is a frozen
    copy of the UNet (its parameter bytes again in memory)."""
    monitor_rewards: list[str] = field(default_factory=lambda: ["digit_alignment"])
    """Rewards computed on every evaluation's samples and never trained on (reward names, as for
    `reward`), to see what fine-tuning costs. Default: follows `reward` and `model` (digits: the digit
    classifier, or sample_diversity when training digit_alignment; SD: aesthetic, or vlm_alignment when
    training aesthetic). [] for none."""
    monitor_reward_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the monitors, by monitor name, e.g. {"digit_alignment": {"C": 1.0}}."""
    monitor_tolerance: float = 1.0
    """A monitor more than this many base std below its base value (on the training or the held-out
    prompts) counts as over-optimisation: logged once; such evaluations are not candidates for best/.
    (digits: the classifier's base std is 0.077 on the training prompts, 0.045 on the held-out ones.)"""
    stop_on_monitor_drop: bool = False
    """End the run (with a checkpoint and final/) at the first evaluation whose monitors fall out of tolerance."""

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
    """A run directory (or its checkpoint) to continue from."""
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

        need(self.algorithm in ALGORITHMS, "algorithm", f"{self.algorithm!r} is not one of {ALGORITHMS}")
        for name in (
            "epochs", "num_inference_steps", "sample_batch_size", "num_batches_per_epoch", "minibatch_size",
            "gradient_accumulation_steps", "num_inner_epochs", "eval_every", "save_every", "eval_num_samples",
            "stat_buffer_size", "stat_min_count", "lora_rank", "grid_samples_per_prompt",
        ):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(self.eta > 0, "eta", f"eta={self.eta}: DDPO's log-probs need eta > 0 (the paper uses 1.0)")
        need(self.guidance_scale >= 1.0, "guidance_scale", "must be >= 1.0 (1.0 disables guidance)")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(self.clip_range > 0, "clip_range", "must be positive")
        need(self.adv_clip_max > 0, "adv_clip_max", "must be positive")
        need(0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]")
        need(self.log_prob_reduction in ("mean", "sum"), "log_prob_reduction", 'must be "mean" or "sum"')
        need(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", 'must be "no", "fp16" or "bf16"')
        need(self.on_invalid_reward in ("raise", "drop"), "on_invalid_reward", 'must be "raise" or "drop"')
        need(self.rwr_mode in ("exponential", "sparse"), "rwr_mode", 'must be "exponential" or "sparse"')
        need(self.kl_coef >= 0, "kl_coef", f"must be >= 0 (0 disables the KL penalty), got {self.kl_coef}")
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{unknown[0]}: {_unknown_field_message(unknown[0])}")
        return cls(**d)


def _unknown_field_message(name: str) -> str:
    names = [f.name for f in dataclasses.fields(DDPOConfig)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see DDPOConfig for the fields"
    return f"unknown config field; {hint}"


# Partial overrides of DDPOConfig's defaults. "digits" is the defaults themselves.
PRESETS: dict[str, dict] = {
    "digits": {},
    "digits-alignment": dict(
        reward="digit_alignment", reward_kwargs={}, monitor_rewards=["sample_diversity"], kl_coef=0.0, guidance_scale=1.0, epochs=40, learning_rate=3e-4, output_dir="outputs/digits-alignment"
    ),
    "digits-incompressibility": dict(reward="jpeg_incompressibility", kl_coef=0.0, output_dir="outputs/digits-incompressibility"),
    # tiny random model: for smoke tests of the plumbing, not for learning
    "tiny": dict(
        model="tiny", prompts="digits:0-4", eval_prompts="digits:5-9", epochs=2, num_inference_steps=3,
        sample_batch_size=4, num_batches_per_epoch=1, minibatch_size=4, eval_every=1, save_every=1,
        eval_num_samples=4, grid_samples_per_prompt=2, reward="jpeg_compressibility", monitor_rewards=[],
        kl_coef=0.0, output_dir="outputs/tiny",
    ),
}

# The paper's Stable Diffusion settings (Black et al. 2024, appendix; one GPU: batch x accumulation).
_SD15 = dict(
    model="runwayml/stable-diffusion-v1-5", use_lora=True, lora_rank=4, lora_alpha=4.0, mixed_precision="fp16",
    num_inference_steps=50, eta=1.0, guidance_scale=5.0, sample_batch_size=8, num_batches_per_epoch=32,
    minibatch_size=8, gradient_accumulation_steps=8, num_inner_epochs=1, timestep_fraction=1.0,
    learning_rate=3e-4, clip_range=1e-4, adv_clip_max=5.0, max_grad_norm=1.0, per_prompt_stat_tracking=True,
    stat_buffer_size=16, stat_min_count=16, epochs=100, eval_every=10, save_every=10, eval_num_samples=64,
    prompts="simple_animals", eval_prompts="imagenet_animals", adam_weight_decay=1e-4, monitor_rewards=["aesthetic"],
    kl_coef=0.0,
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


# Defaults that belong to another field's value: when the user changes the owner (reward or model)
# and not the dependent field, the dependent field takes the default for the new owner value
# instead of keeping the preset's (which belonged to the preset's reward or model).
_JPEG_REWARDS = ("jpeg_compressibility", "compressibility", "jpeg_incompressibility", "incompressibility")
_DIGIT_ALIGNMENT = ("digit_alignment", "alignment")
_AESTHETIC = ("aesthetic", "laion_aesthetic")
_SMALL_MODELS = ("digits", "tiny")  # 8x8 images: JPEG needs them upscaled
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
    if _reward_key(reward) in _JPEG_REWARDS:
        return {"resize": 32 if model in _SMALL_MODELS else 512}
    return {}


def default_monitor_rewards(reward: str, model: str) -> list[str]:
    """The monitors that show what training ``reward`` on ``model`` costs.

    digits: the digit classifier (is it still the prompted digit?), or, when that is the training
    reward, the sample diversity of each prompt's samples (its failure is mode collapse). Stable
    Diffusion: the aesthetic score, or the VLM alignment when training the aesthetic score. The tiny
    random model (plumbing tests) has none.
    """
    key = _reward_key(reward)
    if model == "tiny":
        return []
    if model == "digits":
        return ["sample_diversity"] if key in _DIGIT_ALIGNMENT else ["digit_alignment"]
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
        if "list" in text:  # a JSON list, or comma-separated names ("" = empty)
            value = json.loads(raw) if raw.strip().startswith("[") else [v.strip() for v in raw.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError(raw)
            return value
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
    cfg = preset_config(preset, **{**defaults, **values})
    return cfg.validate()


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
