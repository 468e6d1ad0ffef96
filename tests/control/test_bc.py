"""ddpo_rl.control.bc: behaviour cloning reports each step to a progress callback, and learns."""

import torch

from ddpo_rl.control.bc import BCConfig, fit_behaviour_cloning
from ddpo_rl.control.mlp import NoisePredictionMLP
from ddpo_rl.control.chain import make_action_scheduler


def test_on_step_sees_every_step_in_order_and_the_loss_falls():
    torch.manual_seed(0)
    model = NoisePredictionMLP(2, 3, 32, 2)
    obs = torch.randn(256, 3)
    actions = torch.tanh(obs[:, :2])  # a deterministic expert to clone
    seen = []
    losses = fit_behaviour_cloning(model, make_action_scheduler(100), obs, actions, BCConfig(steps=300, batch_size=64, lr=3e-3),
                                   torch.Generator().manual_seed(0), on_step=seen.append)
    assert seen == list(range(1, 301)) and losses.shape == (300,)
    assert losses[-50:].mean() < 0.7 * losses[:50].mean()
