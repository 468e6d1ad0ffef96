"""Mixed-precision helpers.

The DDPO reference trains Stable Diffusion with ``mixed_precision="fp16"`` and TF32 on: frozen
weights (VAE, text encoder, and the UNet base when training LoRA) are stored in the low dtype,
trainable weights stay fp32, and the forward passes run under autocast. These helpers do each
of those steps; the names of the modes follow accelerate's (``"no"``, ``"fp16"``, ``"bf16"``).
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

MIXED_PRECISION_MODES = ("no", "fp16", "bf16")

_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_mode(mixed_precision: str | None) -> str:
    mode = "no" if mixed_precision in (None, False) else str(mixed_precision).lower()
    if mode in ("fp32", "none", "float32"):
        mode = "no"
    if mode not in _DTYPES:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_MODES}, got {mixed_precision!r}")
    return mode


def low_precision_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The dtype of a mode: ``"fp16"`` -> float16, ``"bf16"`` -> bfloat16, ``"no"`` -> None."""
    return _DTYPES[_check_mode(mixed_precision)]


def autocast(mixed_precision: str | None, device: torch.device | str = "cuda"):
    """An autocast context for ``device`` in the given mode (a no-op context for ``"no"``).

    Example::

        with autocast("bf16", "cuda"):
            eps = unet(latents, t, embeds).sample
    """
    dtype = low_precision_dtype(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(mixed_precision: str | None, device: torch.device | str = "cuda") -> torch.amp.GradScaler:
    """A ``GradScaler``, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=_check_mode(mixed_precision) == "fp16")


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
