"""Speed options of the training step, as one small dataclass that plugs into DDPOTrainer.

The trainer (:class:`ddpo_rl.trainer.DDPOTrainer`) is not changed: it already takes an
``autocast`` factory and any optimizer. :class:`FastTrainOptions` builds those two and, if
asked, compiles the noise model in place::

    opts = FastTrainOptions(autocast_dtype="bf16", optimizer_impl="fused", compile_noise_model=True)
    opts.apply(policy)                                   # channels_last / torch.compile, in place
    optimizer = opts.make_optimizer(policy.parameters(), lr=3e-4, weight_decay=1e-4)
    trainer = DDPOTrainer(loss, optimizer, config, **opts.trainer_kwargs(device))

Notes:
- autocast covers the loss module's forward (the UNet); ddpo_rl.ddim computes the DDIM mean and
  the log-prob in float32 whatever the network's dtype, so the PPO ratio is not computed in bf16.
  fp16 autocast would want a GradScaler, which the trainer does not have: prefer bf16.
- ``optimizer_impl="fused"`` is torch's single-kernel AdamW (CUDA, and CPU since torch 2.4);
  ``"foreach"`` batches the per-parameter ops; ``"auto"`` picks fused where supported.
- ``compile_noise_model`` calls ``nn.Module.compile`` (in place: parameter names and the
  optimizer's references are unchanged). The same module is used by the sampler: run the
  sampler's warm-up (its first call) before relying on CUDA-graph capture of a compiled model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ddpo_rl.sampling import resolve_dtype

OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for-loop")


@dataclass
class FastTrainOptions:
    """Training-step speed options (all default to the plain, eager float32 step)."""

    autocast_dtype: torch.dtype | str | None = None
    """Autocast dtype of the loss forward ("bf16", "fp16"), None for float32."""
    optimizer_impl: str = "auto"
    """AdamW implementation: "auto", "fused", "foreach" or "for-loop"."""
    compile_noise_model: bool = False
    """``torch.compile`` the noise model (in place) with ``compile_mode``."""
    compile_mode: str | None = None
    """torch.compile mode (None = default). Avoid "reduce-overhead" here: its CUDA graphs
    conflict with the sampler's own graph and with the backward pass's varying shapes."""
    channels_last: bool = False
    """Convert the noise model to channels_last (in place)."""

    def __post_init__(self):
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"optimizer_impl={self.optimizer_impl!r}; expected one of {OPTIMIZER_IMPLS}")
        resolve_dtype(self.autocast_dtype)  # validates

    def autocast_factory(self, device: torch.device | str) -> Callable[[], contextlib.AbstractContextManager] | None:
        """What DDPOTrainer's ``autocast=`` takes, or None without autocast."""
        dtype = resolve_dtype(self.autocast_dtype)
        if dtype is None:
            return None
        device_type = torch.device(device).type
        return lambda: torch.autocast(device_type, dtype=dtype)

    def trainer_kwargs(self, device: torch.device | str) -> dict:
        """Keyword arguments for :class:`ddpo_rl.trainer.DDPOTrainer`."""
        return {"autocast": self.autocast_factory(device)}

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], lr: float, **adamw_kwargs) -> torch.optim.AdamW:
        """``torch.optim.AdamW`` with the chosen implementation."""
        params = [p for p in params if p.requires_grad]
        impl = self.optimizer_impl
        if impl == "auto":
            impl = "fused" if all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params) else "foreach"
        flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
        return torch.optim.AdamW(params, lr=lr, **flags, **adamw_kwargs)

    def apply(self, policy) -> None:
        """channels_last and/or compile the policy's noise model, in place."""
        model = policy.head.noise_model if hasattr(policy, "head") else policy
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile_noise_model:
            model.compile(mode=self.compile_mode)


__all__ = ["OPTIMIZER_IMPLS", "FastTrainOptions"]
