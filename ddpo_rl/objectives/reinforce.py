"""DDPO-SF: REINFORCE on the denoising MDP, without a critic.

    L = -E[ A * log pi_theta(x_{t-1} | x_t, c) ]

The score-function estimator: valid for one gradient step on freshly collected data (later
steps are off-policy; DDPO-IS corrects for that). torchrl's ``ReinforceLoss`` requires a
critic; this one reads precomputed advantages, in torchrl's LossModule style.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import dispatch
from tensordict.utils import NestedKey
from torchrl.objectives import LossModule

from ddpo_rl.keys import KEYS


class CriticFreePGLoss(LossModule):
    """Base of the critic-free losses: recompute log pi_theta(action | state), compare with the stored one.

    Subclasses implement :meth:`objective` from (log_prob, old_log_prob, tensordict).
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable keys (``loss.set_keys(...)``).

        Attributes:
            advantage: per-sample advantage [N, 1]. Defaults to ``"advantage"``.
            action: the stored action x_{t-1}. Defaults to ``"action"``.
            sample_log_prob: log-prob of the action under the collecting policy.
                Defaults to ``"action_log_prob"``.
        """

        advantage: NestedKey = KEYS.advantage
        action: NestedKey = KEYS.action
        sample_log_prob: NestedKey = KEYS.log_prob

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    out_keys = ["loss_objective", "kl_approx"]

    def __init__(self, actor_network):
        super().__init__()
        self.actor_network = actor_network
        self._in_keys = None

    def _set_in_keys(self):
        keys = [
            self.tensor_keys.advantage,
            self.tensor_keys.action,
            self.tensor_keys.sample_log_prob,
            *self.actor_network.in_keys,
        ]
        self._in_keys = list(dict.fromkeys(keys))

    @property
    def in_keys(self):
        if self._in_keys is None:
            self._set_in_keys()
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values):
        self._in_keys = values

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def log_probs(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi_theta(action), stored log-prob), both [N]."""
        dist = self.actor_network.get_dist(tensordict)
        log_prob = dist.log_prob(tensordict.get(self.tensor_keys.action))
        old = tensordict.get(self.tensor_keys.sample_log_prob)
        if old.requires_grad:
            raise RuntimeError(
                f"the stored {self.tensor_keys.sample_log_prob!r} requires grad: collect trajectories "
                "under torch.no_grad()"
            )
        return log_prob.reshape(-1), old.reshape(-1)

    def advantage(self, tensordict: TensorDictBase) -> torch.Tensor:
        adv = tensordict.get(self.tensor_keys.advantage, None)
        if adv is None:
            raise KeyError(
                f"{type(self).__name__} needs {self.tensor_keys.advantage!r} in the input: compute it "
                "with ddpo_rl.advantages.compute_advantages"
            )
        return adv.detach().reshape(-1)

    def objective(self, log_prob, old_log_prob, tensordict) -> torch.Tensor:
        raise NotImplementedError

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        log_prob, old = self.log_probs(tensordict)
        loss = self.objective(log_prob, old, tensordict)
        kl = 0.5 * ((log_prob - old).detach() ** 2).mean()
        return TensorDict({"loss_objective": loss, "kl_approx": kl}, batch_size=[])


class DDPOSFLoss(CriticFreePGLoss):
    """DDPO-SF: ``-mean(A * log pi_theta(x_{t-1} | x_t, c))``.

    The score-function estimator is only valid for trajectories of the current policy, so
    DDPO-SF takes one optimizer step per batch of data (Black et al. 2024, Sec. 4.3):
    ``on_policy = True`` makes :class:`~ddpo_rl.trainer.DDPOTrainer` accumulate every
    minibatch of a batch into a single step. (A second step on the same samples is off-policy;
    on the digits model, where the last DDIM steps have std < 0.02, that second step's gradient
    is dominated by the drift of the policy mean and the alignment reward collapses to chance
    within ten epochs.)

    Args:
        actor_network: a :class:`~ddpo_rl.policy.DiffusionPolicy` (any ProbabilisticActor).
    """

    on_policy = True
    """One optimizer step per batch of trajectories (read by DDPOTrainer)."""

    def objective(self, log_prob, old_log_prob, tensordict):
        return -(self.advantage(tensordict) * log_prob).mean()
