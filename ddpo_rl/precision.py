"""Speed and memory options: precision, TF32, autocast, loss scaling, frozen-weight dtype,
memory format, attention kernel, optimizer implementation, activation checkpointing.

The DDPO reference trains Stable Diffusion with ``mixed_precision="fp16"`` and TF32 on: frozen
weights (VAE, text encoder, and the UNet base when training LoRA) are stored in the low dtype,
trainable weights and the optimizer state stay fp32, and the forward passes run under autocast.
These helpers do each of those steps; the recipes call them from their config fields
(:class:`ddpo_rl.config.DDPOConfig`, block "speed and memory"). The names of the modes follow
accelerate's (``"no"``, ``"fp16"``, ``"bf16"``), plus ``"auto"`` (bf16 on CUDA, none on CPU).

:func:`resolve_dtype` is the library's one parser of dtype names: every config field, reward
factory and benchmark flag that takes a dtype as a string goes through it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

MIXED_PRECISION_MODES = ("auto", "no", "fp16", "bf16")
"""Values of ``DDPOConfig.mixed_precision``; "auto" = "bf16" on CUDA, "no" elsewhere."""

OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for-loop")
"""AdamW implementations (:func:`make_adamw`); "auto" = fused on CUDA, foreach elsewhere."""

_DTYPE_NAMES = {
    "no": None,
    "none": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating-point torch dtype from a dtype or its name, or None.

    Accepts ``torch.float16``, ``"fp16"``, ``"float16"``, ``"half"``, ``"torch.float16"`` (and the
    same for bf16 and fp32); ``None``, ``"no"`` and ``"none"`` give None (the caller's default, or
    no autocast). Names come from JSON ``reward_kwargs`` and the command line, hence the strings.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(_DTYPE_NAMES))} or a torch dtype"
        )
    return _DTYPE_NAMES[name]


def autocast_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype to autocast to, or None for none: float32 (and "no") mean no autocast."""
    value = resolve_dtype(dtype)
    return None if value in (None, torch.float32) else value


def resolve_mixed_precision(mixed_precision: str | None, device: torch.device | str) -> str:
    """A mode of :data:`MIXED_PRECISION_MODES` with "auto" resolved: "bf16" on CUDA, "no" elsewhere."""
    mode = _check_mode(mixed_precision)
    if mode == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "no"
    return mode


def _check_mode(mixed_precision: str | None) -> str:
    if mixed_precision in (None, False):
        return "no"
    if str(mixed_precision).lower() == "auto":
        return "auto"
    modes = {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}
    try:
        return modes[autocast_dtype(mixed_precision)]
    except (ValueError, KeyError):
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_MODES}, got {mixed_precision!r}") from None


def low_precision_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The dtype of a mode: ``"fp16"`` -> float16, ``"bf16"`` -> bfloat16, ``"no"`` -> None."""
    mode = _check_mode(mixed_precision)
    if mode == "auto":
        raise ValueError('mixed_precision "auto" depends on the device: resolve_mixed_precision(mode, device) first')
    return autocast_dtype(mode)


def autocast(mixed_precision: str | None, device: torch.device | str = "cuda"):
    """An autocast context for ``device`` in the given mode (a no-op context for ``"no"``).

    Example::

        with autocast("bf16", "cuda"):
            eps = unet(latents, t, embeds).sample
    """
    dtype = low_precision_dtype(resolve_mixed_precision(mixed_precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(mixed_precision: str | None, device: torch.device | str = "cuda") -> torch.amp.GradScaler:
    """A ``GradScaler``, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=resolve_mixed_precision(mixed_precision, device) == "fp16")


def cast_frozen_params(modules: nn.Module | Iterable[nn.Module], dtype: torch.dtype | None) -> None:
    """Store frozen parameters (``requires_grad=False``) and floating buffers in ``dtype`` and
    trainable parameters in float32, in place.

    The Parameter objects are kept (only ``.data`` changes), so an optimizer built before still
    holds them. ``dtype=None`` does nothing.
    """
    if dtype is None:
        return
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for param in module.parameters():
            target = torch.float32 if param.requires_grad else dtype
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
        for buf_module in module.modules():
            for name, buf in list(buf_module.named_buffers(recurse=False)):
                if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                    setattr(buf_module, name, buf.to(dtype))


def set_tf32(enabled: bool = True) -> None:
    """Allow (or forbid) TF32 for float32 matmuls and convolutions on Ampere+ GPUs.

    Harmless on CPU. Uses torch's ``fp32_precision`` settings where they exist (torch >= 2.9),
    the older ``allow_tf32`` flags otherwise.
    """
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        value = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on activation checkpointing of a diffusers/transformers model (trades compute for memory)."""
    if not hasattr(model, "enable_gradient_checkpointing"):
        raise TypeError(f"{type(model).__name__} does not support enable_gradient_checkpointing()")
    model.enable_gradient_checkpointing()
    return model



def use_sdpa_attention(model: nn.Module) -> int:
    """Replace diffusers' classic ``AttnProcessor`` (explicit softmax(QK^T)V) with ``AttnProcessor2_0``
    (``F.scaled_dot_product_attention``: flash / memory-efficient kernels on GPU) on every attention
    layer of ``model`` that has it; other processors (already SDPA, joint attention of SD3, custom
    ones) are left as they are. Returns how many were replaced (0 for a model without processors).

    diffusers already defaults to SDPA on torch 2; this pins it where a checkpoint or an earlier
    ``set_attn_processor`` set the classic one."""
    processors = getattr(model, "attn_processors", None)
    if not processors:
        return 0
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    classic = [name for name, proc in processors.items() if type(proc) is AttnProcessor]
    if classic:
        model.set_attn_processor({n: AttnProcessor2_0() if n in classic else p for n, p in processors.items()})
    return len(classic)


def set_channels_last(model: nn.Module) -> nn.Module:
    """Store the 4-d weights of ``model`` in channels_last, in place (the Parameter objects are
    kept, so an optimizer built before still holds them). Convolutions on tensor cores then need
    no layout transposes; CPU convolutions may be slower."""
    return model.to(memory_format=torch.channels_last)


def make_adamw(params: Iterable[nn.Parameter], impl: str = "auto", **adamw_kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the trainable ``params`` with the chosen implementation.

    ``impl``: "fused" (one kernel for all parameters: CUDA, and CPU since torch 2.4), "foreach"
    (batched per-op kernels), "for-loop" (one op per parameter) or "auto" (fused on CUDA, foreach
    elsewhere). The optimizer state is float32 for float32 parameters whatever the autocast dtype.
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer_impl={impl!r}; expected one of {OPTIMIZER_IMPLS}")
    params = [p for p in params if p.requires_grad]
    if impl == "auto":
        impl = "fused" if params and all(p.is_cuda and p.is_floating_point() for p in params) else "foreach"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, **flags, **adamw_kwargs)
