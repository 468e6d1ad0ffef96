"""LoRA fine-tuning of a diffusers UNet or SD3 transformer, through peft.

The DDPO reference fine-tunes Stable Diffusion with LoRA on the UNet's attention projections;
Flow-GRPO fine-tunes SD3.5's transformer with LoRA on its joint-attention projections. This
module does it the way diffusers' own training scripts do:

- :func:`apply_lora` adds a peft adapter with ``model.add_adapter(LoraConfig(...))`` and freezes
  every other parameter;
- :func:`lora_parameters` returns what the optimizer should train;
- :func:`save_lora_weights` writes the diffusers LoRA format
  (``pytorch_lora_weights.safetensors`` and the adapter config as metadata) of the model's
  pipeline: ``unet.``-prefixed keys that ``StableDiffusionPipeline.load_lora_weights(directory)``
  loads, or, for an ``SD3Transformer2DModel``, ``transformer.``-prefixed keys (peft's key names, as
  diffusers' SD3 LoRA training script saves them) that ``StableDiffusion3Pipeline.load_lora_weights``
  loads;
- :func:`load_lora_weights` loads such a directory back into the model (to resume training).

The functions' ``unet`` argument is the denoising network either way.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

DEFAULT_SD_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""Stable Diffusion's attention projections (self- and cross-attention), as in the DDPO reference."""

DEFAULT_SD3_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
"""SD3's joint-attention projections: the image stream's and the text (context) stream's, as in
Flow-GRPO's SD3.5 LoRA."""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""File name diffusers writes and looks for (``diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE``)."""


def lora_config(
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_SD_LORA_TARGETS,
    dropout: float = 0.0,
    init_lora_weights: bool | str = "gaussian",
):
    """A ``peft.LoraConfig`` for a diffusers UNet.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator (update = alpha / rank * B A); ``None`` means ``alpha = rank``
            (scale 1), diffusers' training-script default.
        target_modules: module-name suffixes to adapt.
        dropout: dropout on the LoRA branch.
        init_lora_weights: peft's init; ``"gaussian"`` (diffusers' default for SD) or True. Both
            start with B = 0, so the adapted UNet initially equals the base UNet.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        target_modules=list(target_modules),
        lora_dropout=float(dropout),
        init_lora_weights=init_lora_weights,
    )


def apply_lora(
    unet: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
    init_lora_weights: bool | str = "gaussian",
    adapter_name: str = "default",
    config=None,
) -> nn.Module:
    """Freeze ``unet`` and add a trainable LoRA adapter to it (in place; returns ``unet``).

    Args:
        unet: a diffusers model with peft support (``UNet2DConditionModel``, ``SD3Transformer2DModel``).
        rank, alpha, target_modules, dropout, init_lora_weights: see :func:`lora_config`;
            ``target_modules=None`` takes the model's default (:func:`default_lora_targets`).
        adapter_name: peft adapter name.
        config: a ready ``peft.LoraConfig``; overrides the other LoRA arguments.

    The LoRA parameters are created in fp32 whatever the UNet's dtype; see
    :func:`ddpo_rl.precision.cast_frozen_params` to keep the frozen base weights in fp16/bf16.
    """
    if not hasattr(unet, "add_adapter"):
        raise TypeError(f"{type(unet).__name__} has no add_adapter(); LoRA needs a diffusers model with peft support")
    if config is None:
        targets = target_modules if target_modules is not None else default_lora_targets(unet)
        config = lora_config(rank, alpha, targets, dropout, init_lora_weights)
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=adapter_name)
    n = 0
    for name, param in unet.named_parameters():
        if _is_lora_param(name, adapter_name):
            param.requires_grad_(True)
            if param.dtype != torch.float32:
                param.data = param.data.float()
            n += 1
    if n == 0:
        raise ValueError(f"no module of {type(unet).__name__} matches target_modules={list(config.target_modules)}")
    return unet


def _is_lora_param(name: str, adapter_name: str | None = None) -> bool:
    parts = name.split(".")
    if not any(p.startswith("lora_") for p in parts):
        return False
    return adapter_name is None or adapter_name in parts


def lora_parameters(unet: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The trainable LoRA parameters of ``unet`` (of one adapter, or of all adapters)."""
    return [p for n, p in unet.named_parameters() if p.requires_grad and _is_lora_param(n, adapter_name)]


def get_lora_state_dict(unet: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in the key format of the model's pipeline (no ``unet.`` /
    ``transformer.`` prefix): diffusers' names for a UNet, peft's for an SD3 transformer."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    _require_adapter(unet, adapter_name)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return convert_state_dict_to_diffusers(state) if _lora_format(unet)[2] else state


def save_lora_weights(
    unet: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    safe_serialization: bool = True,
    weight_name: str | None = None,
) -> str:
    """Write the model's LoRA adapter where its pipeline's ``load_lora_weights`` finds it.

    Uses ``StableDiffusionPipeline.save_lora_weights`` (a UNet) or
    ``StableDiffusion3Pipeline.save_lora_weights`` (an SD3 transformer) with the adapter's
    ``LoraConfig`` as metadata (so rank, alpha and target modules survive the round trip).
    Returns the directory.
    """
    pipeline_cls, prefix, _ = _lora_format(unet)
    directory = os.fspath(directory)
    state = get_lora_state_dict(unet, adapter_name)
    metadata = unet.peft_config[adapter_name].to_dict()
    pipeline_cls.save_lora_weights(
        save_directory=directory,
        safe_serialization=safe_serialization,
        weight_name=weight_name,
        **{
            f"{prefix}_lora_layers": {k: v.detach().float().cpu().contiguous() for k, v in state.items()},
            f"{prefix}_lora_adapter_metadata": metadata,
        },
    )
    return directory


def load_lora_weights(
    unet: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    weight_name: str | None = None,
    trainable: bool = True,
) -> nn.Module:
    """Load LoRA weights written by :func:`save_lora_weights` (or any diffusers SD / SD3 LoRA) into
    ``unet`` (a UNet or an SD3 transformer).

    If ``unet`` already has the adapter (from :func:`apply_lora` with the same config), its weights
    are overwritten in place, so an optimizer holding them stays valid. Otherwise the adapter is
    created from the saved metadata (diffusers' ``load_lora_adapter``). With ``trainable=True`` the
    LoRA parameters require grad (resume); the base weights stay frozen either way.

    Raises:
        FileNotFoundError: no LoRA weights in ``directory``.
        ValueError: the saved keys do not match the adapter (different rank or target modules).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    directory = os.fspath(directory)
    if os.path.isdir(directory):
        files = [f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin"))]
        if not files:
            raise FileNotFoundError(f"no LoRA weights (*.safetensors / *.bin) in '{directory}'")
    elif not os.path.isfile(directory):
        raise FileNotFoundError(f"LoRA weights not found: '{directory}' does not exist")

    pipeline_cls, prefix, diffusers_keys = _lora_format(unet)
    kwargs = {"weight_name": weight_name} if weight_name else {}
    loaded = pipeline_cls.lora_state_dict(directory, return_lora_metadata=True, **kwargs)
    # StableDiffusionPipeline: (state, network_alphas, metadata); StableDiffusion3Pipeline: (state, metadata)
    state_dict, metadata = loaded[0], loaded[-1]
    network_alphas = loaded[1] if len(loaded) == 3 else None
    unet_state = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if not unet_state:
        raise ValueError(f"'{directory}' holds no {prefix} LoRA weights (no '{prefix}.' keys)")

    has_adapter = adapter_name in getattr(unet, "peft_config", {})
    if not has_adapter:
        unet.requires_grad_(False)
        unet.load_lora_adapter(
            {f"{prefix}.{k}": v for k, v in unet_state.items()},
            prefix=prefix,
            adapter_name=adapter_name,
            network_alphas=network_alphas,
            metadata=metadata,
        )
    else:
        from peft.utils import get_peft_model_state_dict

        config = unet.peft_config[adapter_name]
        for key in ("r", "lora_alpha"):
            saved = (metadata or {}).get(f"{prefix}.{key}", (metadata or {}).get(key))
            if saved is not None and saved != getattr(config, key):
                raise ValueError(
                    f"LoRA weights in '{directory}' were saved with {key}={saved}, adapter '{adapter_name}' "
                    f"has {key}={getattr(config, key)}; call apply_lora with the saved config"
                )
        peft_state = convert_unet_state_dict_to_peft(unet_state) if diffusers_keys else unet_state
        expected = set(get_peft_model_state_dict(unet, adapter_name=adapter_name))
        if set(peft_state) != expected:
            extra, missing = sorted(set(peft_state) - expected), sorted(expected - set(peft_state))
            example = (extra or missing)[0]
            raise ValueError(
                f"LoRA weights in '{directory}' do not fit adapter '{adapter_name}' ({len(extra)} unexpected, "
                f"{len(missing)} missing keys, e.g. {example}); call apply_lora with the saved config"
            )
        try:
            set_peft_model_state_dict(unet, peft_state, adapter_name=adapter_name)
        except RuntimeError as err:  # size mismatch: a different rank
            detail = next((ln.strip() for ln in str(err).splitlines() if "mismatch" in ln), str(err))
            raise ValueError(
                f"LoRA weights in '{directory}' do not fit adapter '{adapter_name}' (different rank?): {detail}"
            ) from err
    for name, param in unet.named_parameters():
        if _is_lora_param(name, adapter_name):
            param.requires_grad_(trainable)
            if trainable and param.dtype != torch.float32:  # trainable weights stay fp32
                param.data = param.data.float()
    return unet


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """:data:`DEFAULT_SD3_LORA_TARGETS` for an ``SD3Transformer2DModel`` (Flow-GRPO's), else
    :data:`DEFAULT_SD_LORA_TARGETS` (the DDPO reference's)."""
    return DEFAULT_SD3_LORA_TARGETS if _lora_format(model)[1] == "transformer" else DEFAULT_SD_LORA_TARGETS


def _lora_format(model: nn.Module):
    """``(pipeline class, key prefix, diffusers key names?)`` of the LoRA format ``model`` saves in."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline

    if isinstance(model, SD3Transformer2DModel):
        return StableDiffusion3Pipeline, "transformer", False
    return StableDiffusionPipeline, "unet", True


def _require_adapter(unet: nn.Module, adapter_name: str) -> None:
    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"{type(unet).__name__} has no LoRA adapter '{adapter_name}'; call apply_lora first")
