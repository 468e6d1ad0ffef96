"""The denoising-chain actor: its log-probs against an independent computation, PPO ratios at 1."""

import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import ValueOperator

from ddpo_rl.keys import KEYS
from ddpo_rl.control import (
    CHAIN_KEYS,
    DenoisingChainActor,
    NoisePredictionMLP,
    ObservationScaler,
    flatten_chain,
    make_action_scheduler,
    make_dppo_loss,
    make_step_policy,
    make_value_mlp,
    training_batch,
)
from ddpo_rl.policy import DDIMGaussianHead

OBS_DIM, ACT_DIM, K = 3, 2, 4
LOW, HIGH = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0])


def make_actor(chain_reduction="sum", min_std=0.1, step_reduction="sum", seed=0):
    torch.manual_seed(seed)
    scaler = ObservationScaler.from_bounds(torch.tensor([-1.0, -1, -8]), torch.tensor([1.0, 1, 8]))
    model = NoisePredictionMLP(ACT_DIM, OBS_DIM, hidden_dim=32, num_layers=2, observation_scaler=scaler)
    sched = make_action_scheduler(100)
    step = make_step_policy(model, sched, K, min_std=min_std, log_prob_reduction=step_reduction)
    return DenoisingChainActor(step, sched, LOW, HIGH, chain_reduction=chain_reduction), sched


def reference_step_log_probs(actor, sched, obs, chain, min_std, step_reduction="sum"):
    """log pi(x_{k-1} | x_k) from diffusers' DDIMScheduler.step (mean) and torch's Normal, step by step."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(sched.config)
    s.set_timesteps(K)
    model = actor.step_policy.noise_model
    out = []
    for k, t in enumerate(s.timesteps):
        x = chain[:, k]
        eps = model(x, t.expand(x.shape[0]), encoder_hidden_states=obs)
        mean = s.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        prev_t = t - s.config.num_train_timesteps // K
        std = max(math.sqrt(float(s._get_variance(t, prev_t))), min_std)
        lp = torch.distributions.Normal(mean, std).log_prob(chain[:, k + 1])
        out.append(lp.sum(-1) if step_reduction == "sum" else lp.mean(-1))
    return torch.stack(out, -1)


@pytest.mark.parametrize("chain_reduction", ["sum", "mean"])
@pytest.mark.parametrize("min_std", [0.1, 0.0])
def test_chain_log_prob_matches_independent_per_step_log_probs(chain_reduction, min_std):
    actor, sched = make_actor(chain_reduction, min_std)
    obs = torch.randn(16, OBS_DIM)
    with torch.no_grad():
        td = actor(TensorDict({"observation": obs}, batch_size=[16]))
        ref = reference_step_log_probs(actor, sched, obs, td["chain"], min_std)
        recomputed = actor.get_dist(td).log_prob(td["chain"])
    assert td["chain"].shape == (16, K + 1, ACT_DIM) and td["chain_log_prob"].shape == (16, K)
    torch.testing.assert_close(td["chain_log_prob"], ref, rtol=1e-4, atol=1e-4)
    expected = ref.sum(-1) if chain_reduction == "sum" else ref.mean(-1)
    torch.testing.assert_close(td[KEYS.log_prob], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recomputed, expected, rtol=1e-4, atol=1e-4)


def test_step_reduction_mean_over_action_dims():
    actor, sched = make_actor(step_reduction="mean")
    obs = torch.randn(8, OBS_DIM)
    with torch.no_grad():
        td = actor(TensorDict({"observation": obs}, batch_size=[8]))
        ref = reference_step_log_probs(actor, sched, obs, td["chain"], 0.1, step_reduction="mean")
    torch.testing.assert_close(td["chain_log_prob"], ref, rtol=1e-4, atol=1e-4)


def test_log_prob_changes_with_parameters():
    """The recomputed log-prob is a function of the current parameters (it can detect an update)."""
    actor, _ = make_actor()
    with torch.no_grad():
        td = actor(TensorDict({"observation": torch.randn(8, OBS_DIM)}, batch_size=[8]))
        before = actor.get_dist(td).log_prob(td["chain"])
        for p in actor.parameters():
            p.add_(0.05 * torch.randn_like(p))
        after = actor.get_dist(td).log_prob(td["chain"])
    assert (before - after).abs().max() > 1e-3


def test_env_action_is_clipped_x0_scaled_to_bounds():
    actor, _ = make_actor()
    with torch.no_grad():
        td = actor(TensorDict({"observation": torch.randn(256, OBS_DIM)}, batch_size=[256]))
    x0 = td["chain"][:, -1]
    expected = LOW + (x0.clamp(-1, 1) + 1) / 2 * (HIGH - LOW)
    torch.testing.assert_close(td["action"], expected)
    assert bool((td["action"] >= LOW).all() and (td["action"] <= HIGH).all())
    torch.testing.assert_close(actor.to_env_action(actor.to_normalized_action(td["action"])), td["action"])


def test_deterministic_exploration_takes_step_means():
    actor, _ = make_actor()
    obs = torch.randn(8, OBS_DIM)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        td = actor(TensorDict({"observation": obs}, batch_size=[8]))
        loc, _ = actor.head(td["chain"][:, -2], actor.timesteps[-1].expand(8), obs)
    torch.testing.assert_close(td["chain"][:, -1], loc)


def test_batch_dims_are_preserved():
    actor, _ = make_actor()
    with torch.no_grad():
        td = actor(TensorDict({"observation": torch.randn(3, 5, OBS_DIM)}, batch_size=[3, 5]))
    assert td["chain"].shape == (3, 5, K + 1, ACT_DIM) and td[KEYS.log_prob].shape == (3, 5)


def test_min_std_floors_the_head_std():
    actor, sched = make_actor(min_std=0.0)
    model = actor.step_policy.noise_model
    x, obs = torch.randn(4, ACT_DIM), torch.randn(4, OBS_DIM)
    t = actor.timesteps[-1].expand(4)
    free = DDIMGaussianHead(model, sched, K)(x, t, obs)
    floored = DDIMGaussianHead(model, sched, K, min_std=0.3)(x, t, obs)
    assert float(free[1].max()) < 0.3
    torch.testing.assert_close(floored[1], torch.full_like(floored[1], 0.3))
    torch.testing.assert_close(floored[0], free[0])  # the mean is unchanged
    with pytest.raises(ValueError, match="min_std"):
        DDIMGaussianHead(model, sched, K, min_std=-1.0)


def test_flatten_chain_makes_consecutive_one_step_transitions():
    actor, _ = make_actor()
    with torch.no_grad():
        td = actor(TensorDict({"observation": torch.randn(2, 3, OBS_DIM)}, batch_size=[2, 3]))
    td["advantage"] = torch.randn(2, 3, 1)
    flat = flatten_chain(td, K, timesteps=actor.timesteps)
    assert flat.shape == (2 * 3 * K,)
    first = td.reshape(-1)[0]
    torch.testing.assert_close(flat[KEYS.latents][:K], first["chain"][:-1])
    torch.testing.assert_close(flat[KEYS.action][:K], first["chain"][1:])
    torch.testing.assert_close(flat[KEYS.log_prob][:K], first["chain_log_prob"])
    torch.testing.assert_close(flat[KEYS.timestep][:K], actor.timesteps)
    torch.testing.assert_close(flat["advantage"][:K], first["advantage"].expand(K, 1))
    with pytest.raises(ValueError, match="timesteps"):
        flatten_chain(td, K)


@pytest.mark.parametrize("ratio", ["step", "chain"])
def test_first_ppo_minibatch_has_ratio_one(ratio):
    """On freshly collected data the current policy is the collecting one: every ratio is 1."""
    actor, _ = make_actor()
    critic = ValueOperator(make_value_mlp(OBS_DIM, 16), in_keys=["observation"])
    with torch.no_grad():
        td = actor(TensorDict({"observation": torch.randn(4, 16, OBS_DIM)}, batch_size=[4, 16]))
    td["advantage"] = torch.randn(4, 16, 1)
    td["value_target"] = torch.randn(4, 16, 1)
    batch = training_batch(td, actor, ratio)
    loss = make_dppo_loss(actor, critic, ratio, clip_epsilon=1e-3)
    net = actor.step_policy if ratio == "step" else actor
    action = batch[KEYS.action] if ratio == "step" else batch[CHAIN_KEYS.chain]
    log_ratio = net.get_dist(batch).log_prob(action) - batch[KEYS.log_prob]
    torch.testing.assert_close(log_ratio.exp(), torch.ones_like(log_ratio), rtol=0, atol=1e-5)
    out = loss(batch)
    assert float(out["clip_fraction"]) == 0.0  # even with a tiny clip range
    assert abs(float(out["kl_approx"])) < 1e-6
    out["loss_objective"].backward()
    assert actor.step_policy.noise_model.net[0].weight.grad is not None


def test_errors_are_clear():
    actor, sched = make_actor()
    with pytest.raises(ValueError, match="observation key"):
        DenoisingChainActor(actor.step_policy, sched, LOW, HIGH, keys=type(CHAIN_KEYS)(observation="obs"))
    with pytest.raises(ValueError, match="high > low"):
        DenoisingChainActor(actor.step_policy, sched, HIGH, LOW)
    with pytest.raises(ValueError, match="ratio"):
        make_dppo_loss(actor, None, "both")
    with pytest.raises(ValueError, match="chain has shape"):
        actor.step_log_probs(torch.randn(2, OBS_DIM), torch.randn(2, K, ACT_DIM))
    with pytest.raises(NotImplementedError, match="entropy"):
        actor.get_dist(TensorDict({"observation": torch.randn(2, OBS_DIM)}, batch_size=[2])).entropy()
