"""The DDPO inner loop: from a batch of trajectories with advantages to optimizer steps.

For each of K inner epochs (Black et al. 2024, Algorithm 1 and the reference implementation):

1. shuffle the N trajectories, and independently the order of each one's T steps;
2. keep the first ``ceil(timestep_fraction * T)`` steps of each (timestep subsampling);
3. split the trajectories into minibatches of ``minibatch_size``;
4. for each minibatch, for each kept step j: loss on the [minibatch_size] states at step j,
   backward of ``loss / (steps_kept * gradient_accumulation_steps)``;
5. after ``gradient_accumulation_steps`` minibatches: clip the gradient norm, step, zero grads.

So one optimizer step sees ``minibatch_size * gradient_accumulation_steps`` trajectories at
all their kept steps; N / (minibatch_size * gradient_accumulation_steps) steps per inner
epoch (4 in the paper's presets). The config checks that N divides evenly; a batch made
ragged by dropped samples ends with one smaller step.

An on-policy loss (``loss_module.on_policy``, e.g. DDPO-SF) gets exactly one optimizer step per
batch: all its minibatches are accumulated, whatever ``gradient_accumulation_steps`` says, and
``num_inner_epochs`` must be 1.

Metrics stay on the device during the loop and are reduced once at the end: the only host
syncs are one per optimizer step, to undo a step whose loss, gradient or result is not finite.

Non-finite guard (``skip_nonfinite``): before each optimizer step the trainable weights and the
optimizer's state are copied; after the step one fused reduction (the max-abs norm of every
trainable tensor: NaN or inf iff one of its entries is) is combined with the loss and gradient-norm
checks into a single flag, read once. If anything is not finite, the weights and optimizer state
are restored from the copy and the step is counted in ``skipped_steps``: a NaN/inf loss or
gradient, or an update that overflows (e.g. a huge learning rate), never reaches the weights.
The copy costs memory equal to the trainable weights plus the optimizer state (small for LoRA).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tensordict import TensorDictBase

from ddpo_rl.distributed import average_gradients, max_int
from ddpo_rl.keys import KEYS


@dataclass
class TrainConfig:
    """How one epoch's batch of trajectories is turned into gradient steps."""

    num_inner_epochs: int = 1
    """K: passes over the batch per epoch (1 in the paper)."""
    minibatch_size: int = 8
    """Trajectories per forward pass (the UNet sees this many states at one step)."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step (the timesteps of a minibatch are always accumulated)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's T steps trained on (random subset, per trajectory)."""
    step_indices: tuple[int, ...] | None = None
    """The steps that can be trained on (None: all T): the flow policy's SDE window
    (``FlowMatchingPolicy.trained_steps``); ``timestep_fraction`` then applies within them."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clipping before each optimizer step (> 0; None disables)."""
    skip_nonfinite: bool = True
    """Undo (and count) an optimizer step whose loss, gradient norm or updated weights are NaN/inf."""

    def validate(self, num_trajectories: int | None = None) -> None:
        for name in ("num_inner_epochs", "minibatch_size", "gradient_accumulation_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction={self.timestep_fraction} must be in (0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:  # 0 would zero every gradient
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be positive; None for no clipping")
        if self.step_indices is not None and not len(self.step_indices):
            raise ValueError("step_indices: empty; None trains on every step")
        if num_trajectories is not None and num_trajectories < 0:
            raise ValueError("no trajectories to train on")


class DDPOTrainer:
    """Runs the inner loop for any ddpo_rl / torchrl loss module.

    Args:
        loss_module: DDPO-IS (ClipPPOLoss), DDPOSFLoss or RWRLoss: any LossModule whose output
            holds ``loss_*`` entries to sum.
        optimizer: over the trainable parameters.
        config: :class:`TrainConfig`.
        params: the parameters whose gradient norm is clipped (default: the optimizer's).
        autocast: a zero-argument callable returning a context manager for the forward pass
            (e.g. ``lambda: torch.autocast("cuda", torch.bfloat16)``); default none.
        generator: RNG for the shuffles (default: the global one).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 autocast (None otherwise).
        after_step: called (no arguments) after each optimizer step: host-side housekeeping such as
            the recipes' :class:`~ddpo_rl.threads.ThreadGovernor` update (no device work, no sync).
    """

    def __init__(
        self,
        loss_module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig | None = None,
        params: Iterable[torch.Tensor] | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        generator: torch.Generator | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        after_step: Callable[[], object] | None = None,
    ):
        self.loss_module = loss_module
        self.after_step = after_step
        self.optimizer = optimizer
        self.config = config or TrainConfig()
        self.config.validate()
        self.params = (
            list(params)
            if params is not None
            else [p for g in optimizer.param_groups for p in g["params"]]
        )
        self.autocast = autocast or contextlib.nullcontext
        self.generator = generator
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self.steps_begun = 0
        """Optimizer steps begun (counted before the weights change): a failure with the count unchanged
        left the weights and the optimizer state as they were (the recipe checkpoints them then)."""
        self.on_policy = bool(getattr(loss_module, "on_policy", False))
        if self.on_policy and self.config.num_inner_epochs != 1:
            raise ValueError(
                f"num_inner_epochs={self.config.num_inner_epochs}: {type(loss_module).__name__} is on-policy "
                "(one optimizer step per batch of trajectories); use 1, or an importance-sampling loss (DDPO-IS)"
            )

    def _shuffled(self, batch: TensorDictBase) -> TensorDictBase:
        """Trajectories in random order, each one's steps in its own random order."""
        N, T = batch.shape[:2]
        rows = torch.randperm(N, generator=self.generator).to(batch.device)[:, None]
        steps = torch.argsort(torch.rand(N, T, generator=self.generator), dim=1).to(batch.device)
        return batch.apply(lambda x: x[rows, steps], batch_size=[N, T])

    def _optimizer_step(self, losses: list[torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        # average gradients over ranks (torchrun) in one all-reduce; no-op in a single process.
        # The count of non-finite losses rides along, so every rank takes the same decision.
        bad = (~torch.isfinite(torch.stack(losses))).sum().float() if losses else torch.zeros(())
        bad_losses = average_gradients(self.params, extra=bad)
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        else:
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None))
        saved = self._snapshot() if cfg.skip_nonfinite else None
        self.steps_begun += 1
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        if saved is not None:
            ok = torch.isfinite(norm) & (bad_losses == 0) & self._weights_finite()
            if not bool(ok):  # one host sync per optimizer step, never per forward
                self._restore(saved)
                self.skipped_steps += 1
        if self.grad_scaler is not None:
            self.grad_scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def _stepped_params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        """A copy of what an optimizer step changes: the weights and the optimizer's per-parameter state."""
        params = self._stepped_params()
        weights = [p.detach().clone() for p in params]
        state = {
            p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in self.optimizer.state[p].items()}
            for p in params
            if p in self.optimizer.state
        }
        return weights, state

    @torch.no_grad()
    def _restore(self, saved: tuple[list[torch.Tensor], dict]) -> None:
        weights, state = saved
        params = self._stepped_params()
        torch._foreach_copy_(params, weights)
        for p in params:
            if p in state:
                self.optimizer.state[p] = state[p]
            else:  # the step initialised this state: back to uninitialised
                self.optimizer.state.pop(p, None)

    def state_bytes(self) -> int:
        """The bytes of the trainable weights and the optimizer state: what :meth:`state_snapshot` copies."""
        params = self._stepped_params()
        tensors = params + [v for p in params for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_snapshot(self) -> dict:
        """A copy of everything :meth:`train` changes (the trainable weights, the optimizer's per-parameter
        state, the fp16 loss scale, the step counters), for :meth:`restore_state`. Held on the weights'
        device, it costs :meth:`state_bytes` again. Reads the loss scale (one host sync with fp16):
        call it between epochs, not in the loop."""
        weights, state = self._snapshot()
        scaler = copy.deepcopy(self.grad_scaler.state_dict()) if self.grad_scaler is not None else None
        return {"weights": weights, "state": state, "grad_scaler": scaler,
                "skipped_steps": self.skipped_steps, "steps_begun": self.steps_begun}

    def restore_state(self, snapshot: dict) -> None:
        """Put back what :meth:`state_snapshot` copied: the trainer is as it was then (gradients cleared)."""
        self._restore((snapshot["weights"], snapshot["state"]))
        if self.grad_scaler is not None and snapshot["grad_scaler"]:
            self.grad_scaler.load_state_dict(snapshot["grad_scaler"])
        self.skipped_steps, self.steps_begun = snapshot["skipped_steps"], snapshot["steps_begun"]
        self.optimizer.zero_grad(set_to_none=True)

    def _weights_finite(self) -> torch.Tensor:
        """0-dim bool tensor: every trainable weight is finite (no host sync)."""
        norms = torch._foreach_norm([p.detach() for p in self._stepped_params()], ord=float("inf"))
        return torch.isfinite(torch.stack([n.float() for n in norms])).all()

    def params_finite(self) -> bool:
        """Whether every trainable weight is finite (one host sync)."""
        return bool(self._weights_finite())

    def train(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """Train on a batch [N, T] holding the trajectory keys and ``advantage`` [N, T, 1].

        Returns the mean of every scalar the loss reported, plus ``grad_norm`` and
        ``skipped_steps``, as 0-dim tensors (convert them once, outside). A mean is over the forwards
        (optimizer steps for ``grad_norm``) whose value was finite: a step undone for a NaN loss does not
        turn the epoch's figures into NaN; NaN only when no value was finite (recorded as null).
        """
        cfg = self.config
        N, T = batch.shape[:2]
        cfg.validate(N)
        if KEYS.advantage not in batch.keys():
            raise KeyError("the batch has no 'advantage': compute it before training (ddpo_rl.advantages)")
        if cfg.step_indices is not None:  # e.g. the SDE window: the other steps carry no log-prob
            batch = batch[:, list(cfg.step_indices)]
            T = batch.shape[1]
        prepare = getattr(self.loss_module, "prepare_batch", None)
        if prepare is not None:  # on every rank, an empty batch too: it may gather over ranks (RWR's weights)
            batch = prepare(batch)
        steps_kept = max(1, math.ceil(cfg.timestep_fraction * T))
        mb_per_epoch = math.ceil(N / cfg.minibatch_size)
        acc = max(1, mb_per_epoch) if self.on_policy else cfg.gradient_accumulation_steps
        scale = 1.0 / (steps_kept * acc)
        records: list[TensorDictBase] = []
        norms: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []
        skipped_before = self.skipped_steps
        self.optimizer.zero_grad(set_to_none=True)
        # Every rank must take the same number of optimizer steps (each one all-reduces the
        # gradients). Batches differ in size only when samples were dropped for a NaN reward;
        # a rank with fewer steps then takes empty ones (zero gradient) at the end.
        my_steps = cfg.num_inner_epochs * math.ceil(mb_per_epoch / acc)
        all_steps = max_int(my_steps)
        for _ in range(cfg.num_inner_epochs if N else 0):
            shuffled = self._shuffled(batch)
            for mb_index, start in enumerate(range(0, N, cfg.minibatch_size)):
                minibatch = shuffled[start : start + cfg.minibatch_size]
                for j in range(steps_kept):
                    with self.autocast():
                        out = self.loss_module(minibatch[:, j])
                    loss = sum(v for k, v in out.items() if k.startswith("loss_"))
                    scaled = loss * scale
                    (self.grad_scaler.scale(scaled) if self.grad_scaler is not None else scaled).backward()
                    pending.append(loss.detach())
                    records.append(out.detach())
                if (mb_index + 1) % acc == 0:
                    norms.append(self._optimizer_step(pending))
                    pending = []
                    if self.after_step is not None:
                        self.after_step()
            if pending:  # a ragged tail (samples dropped for a NaN reward): step on what is there
                norms.append(self._optimizer_step(pending))
                pending = []
        for _ in range(all_steps - my_steps):  # only under torchrun, see above
            self._optimizer_step([])
        if not records:  # every sample was dropped: nothing trained on this rank
            return {"skipped_steps": torch.tensor(float(self.skipped_steps - skipped_before))}
        stacked = torch.stack(records)
        metrics = stacked.apply(_finite_mean, batch_size=[])
        result = {k: v for k, v in metrics.items() if v.dim() == 0}
        total = sum(v for k, v in stacked.items() if k.startswith("loss_"))  # [forwards]
        result["loss"] = _finite_mean(total)
        result["grad_norm"] = _finite_mean(torch.stack(norms))
        result["skipped_steps"] = torch.tensor(float(self.skipped_steps - skipped_before))
        return result


def _finite_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x``'s finite entries (NaN when there are none), without a host sync."""
    x = x.float()
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros_like(x)).sum() / finite.sum()
