"""The sampling schedule of a scheduler, whatever its family: one function per family, one dispatch.

- DDIM family (``DDIMScheduler``): integer training timesteps, :func:`ddpo_rl.ddim.ddim_timesteps`;
- flow matching (``FlowMatchEulerDiscreteScheduler``): float timesteps sigma * 1000 and the
  sigmas, :func:`ddpo_rl.flow_sde.flow_schedule`.

The env (envs/denoising.py) reads its timesteps here; each policy head computes its own schedule
once, with the same function, and the collector checks that the env and the policy agree on T.
"""

from __future__ import annotations

import torch

from ddpo_rl.ddim import ddim_timesteps
from ddpo_rl.flow_sde import flow_schedule, is_flow_matching_scheduler


def inference_timesteps(scheduler, num_inference_steps: int) -> torch.Tensor:
    """The T timesteps the network sees, in sampling order: int64 for DDIM, float32 for flow matching."""
    if is_flow_matching_scheduler(scheduler):
        return flow_schedule(scheduler, num_inference_steps).timesteps
    return ddim_timesteps(scheduler, num_inference_steps)


__all__ = ["inference_timesteps", "is_flow_matching_scheduler"]
