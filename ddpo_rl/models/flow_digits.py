"""The embedded flow-matching digits model: a tiny text-conditioned SD3-style model.

The flow-matching sibling of :mod:`ddpo_rl.models.digits`: built from Stable Diffusion 3's
component classes (``SD3Transformer2DModel``, ``CLIPTextModelWithProjection``, the CLIP
tokenizer, ``FlowMatchEulerDiscreteScheduler``), pretrained by the project on scikit-learn's
8x8 digits with the rectified-flow objective, and saved in the diffusers directory layout, so
the flow-matching policies (Flow-GRPO) have a real text-to-image model to fine-tune on a CPU
with no model hub.

Notation (rectified flow, as in SD3 and diffusers' ``FlowMatchEulerDiscreteScheduler``)::

    code            paper            meaning
    x0              x_0              a data sample (a digit in [-1, 1])
    noise           epsilon          standard Gaussian noise
    t               t (= sigma)      time in [0, 1]; t = 1 is pure noise
    xt              x_t              (1 - t) x_0 + t epsilon
    target          v                epsilon - x_0, the velocity dx_t/dt
    timestep        1000 t           what the transformer is called with (scheduler.timesteps)

Training regresses ``transformer(x_t, 1000 t, c) -> v`` (MSE); sampling integrates
dx/dt = v from t = 1 to t = 0 with the scheduler's Euler steps
``x_{t_next} = x_t + (t_next - t) v``.

Design choices:

* **Pixel space**, one channel, 8x8, values in [-1, 1], as digits-v1 (``decode`` is the same).
* **Prompts** ``"a handwritten digit N"`` (the same ``PROMPT_TEMPLATE``); ``""`` is the
  unconditional prompt, to which pretraining drops ~10% of the prompts (for CFG).
* **Conditioning** as SD3's: the transformer takes ``encoder_hidden_states`` (a token sequence,
  here the text encoder's ``last_hidden_state``, [B, L, D]) and ``pooled_projections`` (a vector,
  here its ``text_embeds``, [B, P]). One ``CLIPTextModelWithProjection`` gives both (SD3 uses two
  CLIP encoders and T5; one is enough for ten prompts). It is trained jointly with the
  transformer and frozen afterwards, as for digits-v1. Prompts are padded to 16 tokens, not 77:
  the text tokens go through every joint-attention block, and the digit prompts need 6.
* **Transformer**: ``SD3Transformer2DModel`` with patch size 2 (16 image tokens), 3 joint blocks,
  4 heads of 16 (about 0.43M parameters).
* **Time sampling**: logit-normal (``t = sigmoid(n)``, n ~ N(0, 1)), SD3's default, which weights
  the middle of the path where the digit's shape is decided.
* **Scheduler**: ``FlowMatchEulerDiscreteScheduler`` with ``shift=1.0`` (no resolution shift: the
  images have 64 pixels, and SD3's shift 3 compensates for large images keeping their structure
  at high noise).

Directory layout (written by :func:`save_flow_digits_model`)::

    flow-digits-v1/
      model_index.json       components and their classes, plus the metadata
      transformer/           SD3Transformer2DModel.save_pretrained
      text_encoder/          CLIPTextModelWithProjection.save_pretrained
      scheduler/             FlowMatchEulerDiscreteScheduler.save_pretrained
      tokenizer/             optional, CLIPTokenizer.save_pretrained
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ddpo_rl.models import embedded
from ddpo_rl.models.digits import DigitsModel, TrainResult
from ddpo_rl.models.digits_pretrain import pretrain_loop, pretraining_data
from ddpo_rl.models.embedded import MODEL_INDEX, PROMPT_TEMPLATE, UNCONDITIONAL_PROMPT
from ddpo_rl.policy import classifier_free_guidance

MODEL_NAME = "flow-digits-v1"
"""Name of the cache and asset subdirectory; bump it when the architecture or the data change."""
INDEX_CLASS_NAME = "DDPOFlowDigitsModel"
"""``_class_name`` in the saved directory's model_index.json: what marks it as this model."""
_COMPONENTS = ("transformer", "text_encoder", "scheduler")
REQUIRED_ENTRIES = (MODEL_INDEX, *_COMPONENTS)
"""What a saved flow-digits model directory must hold (the tokenizer is optional)."""
_PACKAGED_DIR = Path(__file__).resolve().parent.parent / "assets" / MODEL_NAME


@dataclass
class FlowDigitsConfig:
    """Architecture of the flow-matching digits model (sizes, not training hyper-parameters)."""

    sample_size: int = 8
    channels: int = 1
    patch_size: int = 2
    num_layers: int = 3
    attention_head_dim: int = 16
    num_attention_heads: int = 4
    text_hidden_size: int = 16
    text_projection_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 16
    num_train_timesteps: int = 1000
    shift: float = 1.0


@dataclass
class FlowDigitsModel:
    """The components of the flow-matching digits model.

    Attributes:
        transformer: ``SD3Transformer2DModel`` predicting the velocity v = eps - x0 of
            [B, channels, 8, 8] samples, called as ``transformer(x, encoder_hidden_states=...,
            pooled_projections=..., timestep=1000 t).sample``.
        text_encoder: frozen ``CLIPTextModelWithProjection``.
        tokenizer: the 49408-token ``CLIPTokenizer`` (padded to ``max_length`` 16).
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (shift 1).
        sample_size, channels, prompt_template, unconditional_prompt, source: as
            :class:`~ddpo_rl.models.digits.DigitsModel`.
    """

    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    sample_size: int = 8
    channels: int = 1
    prompt_template: str = PROMPT_TEMPLATE
    unconditional_prompt: str = UNCONDITIONAL_PROMPT
    source: str | None = None
    extra: dict = field(default_factory=dict)

    prompts = DigitsModel.prompts
    decode = staticmethod(DigitsModel.decode)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device=None, dtype=None) -> "FlowDigitsModel":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            self.transformer.to(**kwargs)
            self.text_encoder.to(**kwargs)
        return self

    @torch.no_grad()
    def encode_prompts_pooled(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states [B, L, D], pooled_projections [B, P])`` of ``prompts``."""
        from ddpo_rl.text import encode_prompts_pooled

        return encode_prompts_pooled(self.tokenizer, self.text_encoder, prompts)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{KEYS.prompt_embeds: [B, L, D], KEYS.pooled_prompt_embeds: [B, P]}``, the condition the
        denoising env carries (see :meth:`encode_prompts_pooled`)."""
        from ddpo_rl.keys import KEYS

        embeds, pooled = self.encode_prompts_pooled(prompts)
        return {KEYS.prompt_embeds: embeds, KEYS.pooled_prompt_embeds: pooled}

    def metadata(self) -> dict:
        return DigitsModel.metadata(self)


# ----------------------------------------------------------------------------- building


def build_flow_digits_model(config: FlowDigitsConfig | None = None, seed: int = 0) -> FlowDigitsModel:
    """A randomly initialised flow-matching digits model (frozen random text encoder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from ddpo_rl.models.tokenizer import build_clip_tokenizer

    cfg = config or FlowDigitsConfig()
    torch.manual_seed(seed)
    text_encoder = embedded.build_text_encoder(
        CLIPTextModelWithProjection, hidden_size=cfg.text_hidden_size, num_layers=cfg.text_layers,
        num_heads=cfg.text_heads, max_length=cfg.max_length, projection_dim=cfg.text_projection_dim,
    )
    inner = cfg.attention_head_dim * cfg.num_attention_heads
    transformer = SD3Transformer2DModel(
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.text_hidden_size,
        caption_projection_dim=inner,
        pooled_projection_dim=cfg.text_projection_dim,
        pos_embed_max_size=cfg.sample_size // cfg.patch_size,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift)
    return FlowDigitsModel(
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(model_max_length=cfg.max_length),
        scheduler=scheduler,
        sample_size=cfg.sample_size,
        channels=cfg.channels,
    )


# ----------------------------------------------------------------------------- training


TIME_SAMPLINGS = ("logit_normal", "uniform")
"""How the flow objective's training times are drawn (:func:`sample_flow_times`)."""


def sample_flow_times(batch_size: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Training times t in (0, 1), float [batch_size]: ``"logit_normal"`` (sigmoid of a standard
    normal, SD3's default) or ``"uniform"``."""
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator))
    if mode == "uniform":
        return torch.rand(batch_size, generator=generator)
    raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {mode!r}")


def flow_matching_loss(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor | None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """The rectified-flow regression loss, mean over the batch (notation: module docstring).
    ``transformer`` is any velocity network called as SD3's transformer is (a diffusers
    ``UNet2DConditionModel`` too: the digits-flow model); ``pooled_projections`` None passes none.

    1. x_t = (1 - t) x_0 + t epsilon
    2. v = epsilon - x_0 (the target)
    3. || transformer(x_t, 1000 t, c) - v ||^2, averaged over pixels and samples
    """
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    xt = (1 - tb) * x0 + tb * noise
    target = noise - x0
    pooled = {} if pooled_projections is None else {"pooled_projections": pooled_projections}
    pred = transformer(xt, encoder_hidden_states=encoder_hidden_states, timestep=t * num_train_timesteps, **pooled).sample
    return F.mse_loss(pred, target)


def train_flow_digits_model(
    model: FlowDigitsModel | None = None,
    *,
    steps: int = 2000,
    batch_size: int = 96,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 50,
    prompt_dropout: float = 0.1,
    ema_decay: float | None = 0.995,
    time_sampling: str = "logit_normal",
    seed: int = 0,
    progress: bool = True,
    log_every: int = 25,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[FlowDigitsModel, TrainResult]:
    """Pretrain the model on sklearn's digits with the flow-matching objective.

    Each step encodes the 11 distinct prompts (10 digits and ``""``) with the text encoder
    (trained jointly), draws ``batch_size`` images with replacement, replaces a sample's prompt
    by ``""`` with probability ``prompt_dropout`` (for classifier-free guidance), draws t
    (``time_sampling``) and regresses the velocity (:func:`flow_matching_loss`). The optimiser,
    schedule and EMA are :func:`~ddpo_rl.models.digits.pretrain_loop`'s. Afterwards both modules
    are in eval mode and the text encoder is frozen.

    Returns:
        ``(model, TrainResult)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if model is None:
        model = build_flow_digits_model(seed=seed)
    sample_flow_times(1, time_sampling, torch.Generator())  # validate before training
    device = model.device
    gen = torch.Generator(device="cpu").manual_seed(seed)

    images, labels, prompt_ids, uncond_index = pretraining_data(model, device)
    num_t = model.scheduler.config.num_train_timesteps

    transformer, text_encoder = model.transformer, model.text_encoder
    transformer.train()
    text_encoder.train().requires_grad_(True)
    params = [p for m in (transformer, text_encoder) for p in m.parameters()]

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(images), (batch_size,), generator=gen).to(device)
        x0, y = images[idx], labels[idx]
        drop = torch.rand(batch_size, generator=gen).to(device) < prompt_dropout
        out = text_encoder(prompt_ids)  # the 11 distinct prompts, then gathered per sample
        row = torch.where(drop, torch.full_like(y, uncond_index), y)
        t = sample_flow_times(batch_size, time_sampling, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        return flow_matching_loss(
            transformer, x0, noise, t, out.last_hidden_state[row], out.text_embeds[row], num_t
        )

    result = pretrain_loop(
        params, loss_fn, steps=steps, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
        ema_decay=ema_decay, progress=progress, log_every=log_every, callback=callback,
        description="pretraining flow-digits model",
    )
    transformer.eval()
    text_encoder.eval().requires_grad_(False)
    model.source = "trained"
    return model, result


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_flow_digits(
    model: FlowDigitsModel,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler ODE sampling (the scheduler's deterministic ``step``) with classifier-free guidance:
    ``v = v_uncond + guidance_scale (v_cond - v_uncond)``. A reference sampler for checks; the
    RL policy has its own (SDE) sampler.

    Returns samples in [-1, 1] (unclamped), [B, channels, sample_size, sample_size].
    """
    device = model.device
    sched = copy.deepcopy(model.scheduler)
    sched.set_timesteps(num_inference_steps, device=device)
    b = len(prompts)
    conds = model.encode_prompts_pooled(prompts)
    negs = model.encode_prompts_pooled([model.unconditional_prompt]) if guidance_scale != 1.0 else None

    def transformer(x, t, context, pooled):
        return model.transformer(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample

    shape = (b, model.channels, model.sample_size, model.sample_size)
    x = torch.randn(shape, generator=generator, device="cpu").to(device)
    for t in sched.timesteps:
        v = classifier_free_guidance(transformer, x, t.expand(b), conds, negs, guidance_scale)
        x = sched.step(v, t, x).prev_sample
    return x


# ----------------------------------------------------------------------------- save / load


def packaged_model_dir() -> Path | None:
    """The checkpoint committed inside the package (``ddpo_rl/assets/flow-digits-v1``), if any."""
    return _PACKAGED_DIR if is_flow_digits_model_dir(_PACKAGED_DIR) else None


def is_flow_digits_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete saved flow-matching digits model."""
    return embedded.is_model_dir(path, REQUIRED_ENTRIES)


def save_flow_digits_model(
    model: FlowDigitsModel,
    path: str | os.PathLike,
    *,
    save_tokenizer: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save ``model`` in the diffusers directory layout (module docstring), atomically.

    ``dtype`` (e.g. ``torch.float16``) stores the weights in that precision; the in-memory model
    is unchanged and :func:`load_flow_digits_model` casts back to float32. The tokenizer is left
    out unless ``save_tokenizer`` (it is rebuilt offline at load time).
    """
    components = {"transformer": model.transformer, "text_encoder": model.text_encoder, "scheduler": model.scheduler}
    return embedded.save_model_dir(
        path, components, model.tokenizer, class_name=INDEX_CLASS_NAME, name=MODEL_NAME,
        metadata=model.metadata(), save_tokenizer=save_tokenizer, dtype=dtype,
    )


def load_flow_digits_model(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> FlowDigitsModel:
    """Load a model saved by :func:`save_flow_digits_model` (float32 on the CPU by default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    if not is_flow_digits_model_dir(path):
        raise FileNotFoundError(
            f"{path} is not a saved flow-matching digits model (expected {MODEL_INDEX}, "
            + ", ".join(f"{c}/" for c in _COMPONENTS) + ")"
        )
    model = FlowDigitsModel(**embedded.load_model_dir(
        path, denoiser=("transformer", SD3Transformer2DModel), encoder_class=CLIPTextModelWithProjection,
        scheduler_class=FlowMatchEulerDiscreteScheduler, dtype=dtype,
    ))
    if device is not None:
        model.to(device)
    return model


def load_or_train_flow_digits_model(
    cache_dir: str | os.PathLike | None = None,
    *,
    device: torch.device | str | None = None,
    use_packaged: bool = True,
    train_if_missing: bool = True,
    progress: bool = True,
    **train_kwargs,
) -> FlowDigitsModel:
    """The pretrained flow-matching digits model, looked up as the digits model is
    (:func:`~ddpo_rl.models.digits.load_or_train_digits_model`): ``cache_dir`` (default
    ``$DDPO_RL_CACHE/flow-digits-v1`` or ``~/.cache/ddpo_rl/flow-digits-v1``), then the committed
    checkpoint, then trained (``train_kwargs`` passed on) and saved to ``cache_dir``.

    Raises:
        FileNotFoundError: nothing saved was found and ``train_if_missing`` is False.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else embedded.default_cache_dir(MODEL_NAME)
    return embedded.load_or_train_model(
        cache, label="flow-digits", pretrain_script="pretrain_flow_digits.py", is_dir=is_flow_digits_model_dir,
        load=load_flow_digits_model, packaged=packaged_model_dir, build=build_flow_digits_model,
        train=train_flow_digits_model, save=save_flow_digits_model, device=device, use_packaged=use_packaged,
        train_if_missing=train_if_missing, progress=progress, train_kwargs=train_kwargs,
    )
