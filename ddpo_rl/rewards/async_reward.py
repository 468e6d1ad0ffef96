"""Score rewards in a background thread while sampling goes on.

``future = reward.submit(images, prompts)`` returns at once, the sampler goes on with the next
batch, and ``future.result()`` gives the rewards later (the reward transform and the collector
do this for any reward with a ``submit`` method; see ddpo_rl.rewards.transform). Meant for slow
reward models (VLMs); torch releases the GIL inside its ops, so the two overlap.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch


class AsyncReward:
    """Run a reward function in a background thread pool.

    ``submit(images, prompts)`` detaches and copies the inputs (so the caller may overwrite its
    buffers) and returns a :class:`concurrent.futures.Future` of the reward tensor; calling the
    object computes synchronously, on the caller's thread. torch releases the GIL inside its ops,
    so a VLM forward in the pool overlaps with sampling on the main thread.

    Args:
        reward_fn: any reward function ``fn(images, prompts) -> [B]``.
        max_workers: threads in the pool (1 keeps submissions in order and memory bounded).
        inputs_to_cpu: move submitted images to the CPU first (frees accelerator memory while
            queued; the reward function moves them back).
    """

    def __init__(
        self,
        reward_fn: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
        max_workers: int = 1,
        inputs_to_cpu: bool = False,
    ):
        self.reward_fn = reward_fn
        self.inputs_to_cpu = inputs_to_cpu
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ddpo-reward")

    def _run(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.reward_fn(images, prompts)

    def submit(self, images: torch.Tensor, prompts: Sequence[str]) -> Future:
        """Start computing the rewards of ``images``; returns a future of the [B] tensor."""
        images = images.detach()
        images = images.to("cpu", copy=True) if self.inputs_to_cpu else images.clone()
        return self._pool.submit(self._run, images, list(prompts))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._run(images, list(prompts))

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> "AsyncReward":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
