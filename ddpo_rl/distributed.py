"""Multi-process training with ``torchrun``: process group, gathers, gradient averaging.

    torchrun --nproc-per-node 2 recipes/ddpo_is.py ...

Each rank samples its own trajectories (its own seed, so its own prompts and noise); the
terminal rewards and prompts of every rank are gathered so that the per-prompt statistics
see the whole global batch and stay identical on every rank; gradients are averaged once per
optimizer step (one flat all-reduce, after the accumulation), not per backward. Averaging
explicitly rather than through ``DistributedDataParallel`` keeps LoRA simple: only the
parameters that require grad are reduced, every rank reduces the same ones in the same
order, and nothing depends on DDP's unused-parameter detection (the reference DDPO code
had a LoRA gradient-sync bug there).

Single-process runs never touch ``torch.distributed``: every helper is a no-op then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a ``torchrun`` job (the defaults: a single-process run)."""

    rank: int = 0
    """Global index of this process, 0 .. world_size - 1 (``RANK``)."""
    world_size: int = 1
    """Number of processes (``WORLD_SIZE``)."""
    local_rank: int = 0
    """Index of this process on its machine (``LOCAL_RANK``): the CUDA device it uses."""

    @property
    def enabled(self) -> bool:
        """True when there is more than one process (the collective helpers then communicate)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes logs, evaluations and checkpoints."""
        return self.rank == 0


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the process group that ``torchrun`` describes (env vars); a no-op without it.

    Uses gloo on CPU; on CUDA nccl for CUDA tensors and gloo for the CPU ones (the stop flag
    and step counts that ``any_true``/``max_int`` reduce), so both work in one group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks, in rank order."""
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_ragged(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate the 1-D ``x`` of every rank, whatever its length on each (samples dropped for a NaN
    reward leave ranks with unequal batches), in rank order; returns (that, where this rank's part
    starts). One small gather of the lengths, then one of the padded tensors."""
    if not _active():
        return x, 0
    sizes = all_gather_cat(torch.tensor([x.numel()], dtype=torch.int64, device=x.device)).tolist()
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x.reshape(-1)
    parts = all_gather_cat(padded).reshape(len(sizes), -1)
    everyone = torch.cat([parts[r, :n] for r, n in enumerate(sizes)])
    return everyone, sum(sizes[: dist.get_rank()])


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each 0-dim value averaged over the ranks that have a finite one (NaN where none has): a run's
    training figures (loss, clip fraction, ...) said for the whole job, not for rank 0's share. A key
    missing on some rank (it trained on nothing) counts as not finite there."""
    if not _active():
        return values
    keys = sorted(set().union(*all_gather_objects(sorted(values))))
    mine = torch.stack([values[k].detach().float().cpu() if k in values else torch.tensor(float("nan")) for k in keys])
    every = all_gather_cat(mine).reshape(-1, len(keys))
    finite = torch.isfinite(every)
    means = torch.where(finite, every, torch.zeros_like(every)).sum(0) / finite.sum(0)
    return dict(zip(keys, means.unbind()))


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool, device="cpu") -> bool:
    """True if ``flag`` is set on any rank (e.g. a stop signal received by one process)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_int(value: int, device="cpu") -> int:
    """The largest ``value`` over ranks (e.g. a number of optimizer steps every rank must take)."""
    if not _active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_parameters(params: Sequence[torch.Tensor], src: int = 0) -> None:
    """Make every rank start from rank ``src``'s weights."""
    if not _active():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src)


def average_gradients(params: Sequence[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Average the gradients of ``params`` over ranks in one flat all-reduce.

    ``extra`` (a small float tensor, e.g. a count of non-finite losses) is summed over ranks in
    the same all-reduce and returned, so decisions based on it agree on every rank.
    """
    if not _active():
        return extra
    world = dist.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    pieces = [g.reshape(-1).float() for g in grads]
    if extra is not None:
        pieces.append(extra.reshape(-1).float().to(pieces[0].device))
    flat = torch.cat(pieces)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        new = (flat[offset : offset + n] / world).view_as(g).to(g.dtype)
        if p.grad is None:
            p.grad = new
        else:
            p.grad.copy_(new)
        offset += n
    return flat[offset:].reshape(extra.shape) if extra is not None else None
