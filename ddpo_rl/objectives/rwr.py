"""Reward-weighted regression (RWR): the likelihood baseline of the DDPO paper.

    L = -E[ w(x_0, c) * log pi_theta(x_{t-1} | x_t, c) ]   (summed over the chain's steps)

with weights computed once per epoch over the whole batch of trajectories
(:func:`rwr_weights`, called by :meth:`RWRLoss.prepare_batch`):

- ``"exponential"``: w_i = N softmax(A_i / beta), self-normalised to mean 1;
- ``"sparse"``: w_i = 1 if A_i is in the top (1 - quantile) of the batch, else 0 (filtering).

Samples with a dropped (NaN) reward have A = 0 and are excluded from the sparse quantile by
the caller passing finite advantages; they are never up-weighted beyond a typical sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from ddpo_rl import distributed
from ddpo_rl.objectives.reinforce import CriticFreePGLoss

RWR_MODES = ("exponential", "sparse")


def rwr_weights(advantages: torch.Tensor, mode: str = "exponential", temperature: float = 1.0, quantile: float = 0.9):
    """RWR weights [N] for advantages (or rewards) [N]; see the module docstring."""
    a = advantages.reshape(-1).float()
    if mode == "exponential":
        if temperature <= 0:
            raise ValueError(f"RWR temperature={temperature} must be positive")
        return a.numel() * torch.softmax(a / temperature, dim=0)
    if mode == "sparse":
        if not 0 <= quantile < 1:
            raise ValueError(f"RWR quantile={quantile} must be in [0, 1)")
        return (a >= torch.quantile(a, quantile)).float()
    raise ValueError(f"RWR mode={mode!r}; expected one of {RWR_MODES}")


class RWRLoss(CriticFreePGLoss):
    """Reward-weighted likelihood: ``-mean(w * log pi_theta(x_{t-1} | x_t, c))``.

    Args:
        actor_network: a :class:`~ddpo_rl.policy.DiffusionPolicy`.
        mode: "exponential" (default) or "sparse".
        temperature: beta of the exponential weights.
        quantile: for "sparse", the fraction of samples given weight 0.
    """

    @dataclass
    class _AcceptedKeys(CriticFreePGLoss._AcceptedKeys):
        """Adds ``weight``: the per-sample RWR weight [N, 1]. Defaults to ``"rwr_weight"``."""

        weight: NestedKey = "rwr_weight"

    default_keys = _AcceptedKeys

    def __init__(self, actor_network, mode: str = "exponential", temperature: float = 1.0, quantile: float = 0.9):
        super().__init__(actor_network)
        rwr_weights(torch.zeros(2), mode, temperature, quantile)  # validate the arguments now
        self.mode, self.temperature, self.quantile = mode, float(temperature), float(quantile)

    def prepare_batch(self, batch: TensorDictBase) -> TensorDictBase:
        """Write the weights of a whole epoch's batch [N, (T)] from its advantages (once per epoch; under
        torchrun a collective, which every rank calls as the trainer does)."""
        adv = batch.get(self.tensor_keys.advantage)
        per_sample = adv[:, 0] if adv.dim() > 2 else adv  # [N, T, 1] -> [N, 1]: one weight per trajectory
        # under torchrun, over the whole job's batch (every rank's trajectories), as one process would
        # weight it: the softmax's normaliser and the sparse quantile are global, not per rank
        everyone, start = distributed.all_gather_ragged(per_sample.reshape(-1))
        w_all = rwr_weights(everyone, self.mode, self.temperature, self.quantile) if everyone.numel() else everyone
        w = w_all[start : start + per_sample.numel()].reshape(per_sample.shape)
        if adv.dim() > 2:
            w = w.unsqueeze(1).expand_as(adv)
        batch.set(self.tensor_keys.weight, w.contiguous())
        return batch

    def objective(self, log_prob, old_log_prob, tensordict):
        w = tensordict.get(self.tensor_keys.weight, None)
        if w is None:
            raise KeyError("RWRLoss needs per-sample weights: call loss.prepare_batch(batch) once per epoch")
        return -(w.detach().reshape(-1) * log_prob).mean()
