"""The three losses on hand-computed values."""

import pytest
import torch
from tensordict import TensorDict

from ddpo_rl.keys import KEYS
from ddpo_rl.objectives import DDPOSFLoss, RWRLoss, make_ddpo_is_loss, make_loss, rwr_weights
from ddpo_rl.policy import DiffusionPolicy
from ddpo_rl.models.tiny import sd_ddim_scheduler


class ScaledNoise(torch.nn.Module):
    """eps = w * x + b: two parameters, so gradients can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.1))

    def forward(self, x, t, encoder_hidden_states=None):
        return self.w * x + self.b


def make_batch(policy, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sched = sd_ddim_scheduler()
    sched.set_timesteps(5)
    td = TensorDict(
        {
            KEYS.latents: torch.randn(n, 2, 3, 3, generator=g),
            KEYS.timestep: sched.timesteps[torch.randint(5, (n,), generator=g)],
            KEYS.prompt_embeds: torch.zeros(n, 1, 1),
            KEYS.advantage: torch.randn(n, 1, generator=g),
        },
        batch_size=[n],
    )
    with torch.no_grad():
        policy(td)
    return td.exclude(KEYS.loc, KEYS.scale)


def grads(loss_module, td, params):
    for p in params:
        p.grad = None
    out = loss_module(td.clone())
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    return torch.stack([p.grad.clone() for p in params]), out


@pytest.fixture
def policy():
    return DiffusionPolicy(ScaledNoise(), sd_ddim_scheduler(), 5)


def manual_log_prob(policy, td):
    loc, scale = policy.head(td[KEYS.latents], td[KEYS.timestep], td[KEYS.prompt_embeds])
    return torch.distributions.Normal(loc, scale.expand_as(loc)).log_prob(td[KEYS.action]).flatten(1).mean(1)


def test_sf_loss_is_minus_mean_advantage_times_log_prob(policy):
    td = make_batch(policy)
    out = DDPOSFLoss(policy)(td.clone())
    expected = -(td[KEYS.advantage].squeeze(-1) * manual_log_prob(policy, td)).mean()
    torch.testing.assert_close(out["loss_objective"], expected)


def test_is_ratio_is_one_and_gradient_equals_sf_at_first_step(policy):
    td = make_batch(policy)
    params = list(policy.parameters())
    g_is, out_is = grads(make_ddpo_is_loss(policy, clip_epsilon=1e-4), td, params)
    g_sf, _ = grads(DDPOSFLoss(policy), td, params)
    assert out_is["kl_approx"].abs().item() == 0.0
    assert out_is["clip_fraction"].item() == 0.0
    # d/dtheta exp(lp - lp_old) = exp(0) dlp: the same gradient as REINFORCE
    torch.testing.assert_close(g_is, g_sf, rtol=1e-5, atol=1e-7)
    assert g_is.abs().sum() > 0


def test_is_clipping_stops_gradient_outside_range(policy):
    td = make_batch(policy, n=2)
    td[KEYS.advantage] = torch.tensor([[1.0], [1.0]])
    # sample 0: ratio = e^0.1 > 1 + eps with A > 0 -> clipped, no gradient; sample 1: ratio 1
    td[KEYS.log_prob] = td[KEYS.log_prob] - torch.tensor([0.1, 0.0])
    params = list(policy.parameters())
    loss = make_ddpo_is_loss(policy, clip_epsilon=1e-4)
    g_both, out = grads(loss, td, params)
    assert out["clip_fraction"].item() == pytest.approx(0.5)
    g_unclipped_only, _ = grads(DDPOSFLoss(policy), td[1:], params)
    # the IS loss averages over 2 samples, of which only sample 1 carries a gradient
    torch.testing.assert_close(g_both, 0.5 * g_unclipped_only, rtol=1e-5, atol=1e-7)


def test_is_keeps_gradient_when_clip_would_only_lower_objective(policy):
    # ratio > 1 + eps with A < 0: min(rA, clip(r)A) = rA, unclipped: gradient flows
    td = make_batch(policy, n=1)
    td[KEYS.advantage] = torch.tensor([[-1.0]])
    td[KEYS.log_prob] = td[KEYS.log_prob] - 0.1
    g, _ = grads(make_ddpo_is_loss(policy, clip_epsilon=1e-4), td, list(policy.parameters()))
    assert g.abs().sum() > 0


def test_rwr_exponential_weights_by_hand():
    a = torch.tensor([0.0, 1.0, -1.0, 2.0])
    w = rwr_weights(a, "exponential", temperature=0.5)
    e = torch.exp(a / 0.5)
    torch.testing.assert_close(w, 4 * e / e.sum())
    assert w.mean().item() == pytest.approx(1.0)


def test_rwr_sparse_weights_keep_top_quantile():
    a = torch.arange(10.0)
    w = rwr_weights(a, "sparse", quantile=0.8)
    assert w.tolist() == [0.0] * 8 + [1.0, 1.0]


def test_rwr_loss_is_weighted_log_likelihood(policy):
    td = make_batch(policy)
    loss = RWRLoss(policy, mode="exponential", temperature=1.0)
    td = loss.prepare_batch(td)
    w = 6 * torch.softmax(td[KEYS.advantage].squeeze(-1), 0)
    torch.testing.assert_close(td["rwr_weight"].squeeze(-1), w)
    expected = -(w * manual_log_prob(policy, td)).mean()
    torch.testing.assert_close(loss(td)["loss_objective"], expected)


def test_rwr_without_prepare_raises(policy):
    with pytest.raises(KeyError, match="prepare_batch"):
        RWRLoss(policy)(make_batch(policy))


def test_loss_refuses_log_prob_that_requires_grad(policy):
    td = make_batch(policy)
    td[KEYS.log_prob] = td[KEYS.log_prob].requires_grad_()
    with pytest.raises(RuntimeError, match="no_grad"):
        DDPOSFLoss(policy)(td)


@pytest.mark.parametrize("bad", [dict(mode="softmax"), dict(temperature=0.0), dict(mode="sparse", quantile=1.0)])
def test_rwr_rejects_bad_arguments(policy, bad):
    with pytest.raises(ValueError):
        RWRLoss(policy, **bad)


def test_make_loss_names(policy):
    assert type(make_loss("ddpo_sf", policy)).__name__ == "DDPOSFLoss"
    with pytest.raises(ValueError, match="ddpo_is"):
        make_loss("ppo2", policy)


def test_declared_keys_can_be_renamed(policy):
    td = make_batch(policy).rename_key_(KEYS.advantage, "adv")
    loss = DDPOSFLoss(policy)
    loss.set_keys(advantage="adv")
    assert "adv" in loss.in_keys
    assert torch.isfinite(loss(td)["loss_objective"])
