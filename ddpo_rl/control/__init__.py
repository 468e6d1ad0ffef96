"""Generative policies beyond images: diffusion policies over action vectors (DPPO, Ren et al. 2024).

The same machinery as the image case (ddpo_rl.ddim, DDIMGaussian, DiffusionPolicy, torchrl's
ClipPPOLoss), applied to a control task's two-level MDP: env steps x denoising steps.

- :mod:`~ddpo_rl.control.mlp`: the noise-prediction MLP eps_theta(x_t, t, s) and a value MLP;
- :mod:`~ddpo_rl.control.chain`: the K-step denoising chain as a torchrl actor, its log-prob;
- :mod:`~ddpo_rl.control.bc`: behaviour cloning with the denoising loss;
- :mod:`~ddpo_rl.control.ppo`: the PPO update (minibatch passes), per-step or per-chain batches;
  the loss itself is :func:`ddpo_rl.objectives.make_dppo_loss`.
"""

from ddpo_rl.control.bc import BCConfig, denoising_loss, fit_behaviour_cloning
from ddpo_rl.control.chain import (
    CHAIN_KEYS,
    ChainKeys,
    DenoisingChainActor,
    DenoisingChainDistribution,
    flatten_chain,
    make_action_scheduler,
    make_step_policy,
)
from ddpo_rl.control.mlp import NoisePredictionMLP, ObservationScaler, make_value_mlp, timestep_embedding
from ddpo_rl.objectives.dppo import RATIO_FORMS, make_dppo_loss
from ddpo_rl.control.ppo import ppo_update, training_batch

__all__ = [
    "BCConfig",
    "CHAIN_KEYS",
    "ChainKeys",
    "DenoisingChainActor",
    "DenoisingChainDistribution",
    "NoisePredictionMLP",
    "ObservationScaler",
    "RATIO_FORMS",
    "denoising_loss",
    "fit_behaviour_cloning",
    "flatten_chain",
    "make_action_scheduler",
    "make_dppo_loss",
    "make_step_policy",
    "make_value_mlp",
    "ppo_update",
    "timestep_embedding",
    "training_batch",
]
