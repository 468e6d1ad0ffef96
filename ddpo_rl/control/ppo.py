"""The PPO update of a diffusion policy on env data: GAE, the two ratio forms, minibatch passes.

One epoch of DPPO (Ren et al. 2024) on a batch of env steps [E, T] collected by a
:class:`~ddpo_rl.control.chain.DenoisingChainActor`:

1. rewards scaled, torchrl's ``GAE`` on the env steps (the critic V(s) sees observations only);
2. ``ratio="step"``: :func:`~ddpo_rl.control.chain.flatten_chain` to [E*T*K] one-step transitions
   sharing their env step's advantage and value target; ``ratio="chain"``: [E*T] env steps (the
   loss for either form: :func:`ddpo_rl.objectives.make_dppo_loss`);
3. ``num_passes`` shuffled passes in minibatches (torchrl's ``TensorDictReplayBuffer`` with a
   ``SamplerWithoutReplacement``): loss_objective + loss_critic, clipped grad step.

Metrics stay tensors and are reduced once, at the end of :func:`ppo_update`.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import SamplerWithoutReplacement, TensorDictReplayBuffer, TensorStorage
from torchrl.objectives import ClipPPOLoss

from ddpo_rl.keys import KEYS
from ddpo_rl.control.chain import CHAIN_KEYS, DenoisingChainActor, flatten_chain


def training_batch(
    rollout: TensorDictBase, chain_actor: DenoisingChainActor, ratio: str, keys=CHAIN_KEYS
) -> TensorDictBase:
    """Rollout [E, T] with ``advantage`` and ``value_target`` -> the flat batch the loss trains on."""
    if ratio == "step":
        return flatten_chain(rollout, chain_actor.num_steps, keys, timesteps=chain_actor.timesteps)
    flat = rollout.reshape(-1)
    return flat.select(keys.observation, keys.chain, KEYS.log_prob, KEYS.advantage, "value_target")


def ppo_update(
    loss_module: ClipPPOLoss,
    optimizer: torch.optim.Optimizer,
    batch: TensorDictBase,
    num_passes: int,
    minibatch_size: int,
    max_grad_norm: float | None = 1.0,
    train_actor: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """``num_passes`` shuffled passes over ``batch`` [N] in minibatches; returns epoch-mean metrics.

    With ``train_actor=False`` only ``loss_critic`` (and ``loss_kl``, when the loss is wrapped in
    :class:`~ddpo_rl.objectives.KLToReferenceLoss`) is minimised (critic warm-up). The metrics
    (loss, loss_objective, loss_critic, clip_fraction, kl_approx, ESS, grad_norm, and
    kl_to_reference with a KL term) are averaged over minibatches on the device and moved to the
    host once.
    """
    n = batch.shape[0]
    if minibatch_size <= 0 or num_passes <= 0:
        raise ValueError(f"minibatch_size={minibatch_size} and num_passes={num_passes} must be positive")
    mb = min(minibatch_size, n)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with_kl = "kl_to_reference" in getattr(loss_module, "out_keys", ())
    names = ("loss", "loss_objective", "loss_critic", "clip_fraction", "kl_approx", "ESS", "grad_norm")
    names += ("kl_to_reference",) if with_kl else ()
    sums = torch.zeros(len(names), device=batch.device)
    count = 0
    buffer = TensorDictReplayBuffer(
        storage=TensorStorage(batch),  # the batch itself, not a copy
        sampler=SamplerWithoutReplacement(drop_last=True),  # a pass: n // mb minibatches of a fresh shuffle
        batch_size=mb,
        generator=generator,
    )
    for _ in range(num_passes):
        for minibatch in buffer:
            out = loss_module(minibatch)
            loss = out["loss_critic"] + (out["loss_objective"] if train_actor else 0.0)
            if with_kl:
                loss = loss + out["loss_kl"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            else:
                gn = torch.zeros((), device=batch.device)
            optimizer.step()
            vals = (loss, out["loss_objective"], out["loss_critic"], out["clip_fraction"], out["kl_approx"], out["ESS"], gn)
            vals += (out["kl_to_reference"],) if with_kl else ()
            sums += torch.stack([v.detach().float().reshape(()) for v in vals])
            count += 1
    return dict(zip(names, (sums / max(count, 1)).tolist()))
