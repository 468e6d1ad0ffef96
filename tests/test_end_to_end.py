"""Collect -> advantages -> optimizer steps, with each of the three losses, on a tiny model."""

import pytest
import torch

from ddpo_rl.advantages import PerPromptStatTracker, compute_advantages
from ddpo_rl.collector import collect_trajectories, terminal_rewards, with_advantages
from ddpo_rl.keys import KEYS
from ddpo_rl.objectives import make_loss
from ddpo_rl.trainer import DDPOTrainer, TrainConfig
from tests.helpers import make_env, make_policy, prompt_encoder


@pytest.mark.parametrize("loss_name", ["ddpo_is", "ddpo_sf", "rwr"])
def test_collect_advantages_and_train(loss_name):
    enc = prompt_encoder()
    env, policy = make_env(batch_size=4, encoder=enc), make_policy(encoder=enc)
    loss = make_loss(loss_name, policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    inner = 1 if loss_name == "ddpo_sf" else 2  # DDPO-SF is on-policy: one pass, one step
    trainer = DDPOTrainer(loss, optimizer, TrainConfig(minibatch_size=4, gradient_accumulation_steps=1, num_inner_epochs=inner))
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)

    traj = collect_trajectories(env, policy, num_batches=2)
    assert traj.batch_size == (8, 5)
    assert not traj[KEYS.log_prob].requires_grad
    rewards = terminal_rewards(traj)
    adv = compute_advantages(rewards, env.base_env.prompts_of(traj[KEYS.prompt_id][:, 0]), tracker, clip=5.0)
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = trainer.train(with_advantages(traj, adv))

    assert all(torch.isfinite(v) for v in metrics.values())
    changed = sum(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert changed > 0.9 * len(before)
    if loss_name == "ddpo_is":
        # 2 inner epochs x 2 minibatches = 4 optimizer steps: after the first the ratio moves off 1
        assert metrics["kl_approx"] > 0


def test_ragged_batch_ends_with_a_smaller_step():
    enc = prompt_encoder()
    env, policy = make_env(batch_size=3, encoder=enc), make_policy(encoder=enc)
    traj = with_advantages(collect_trajectories(env, policy), torch.tensor([1.0, -1.0, 0.5]))
    steps = []
    opt = torch.optim.SGD(policy.parameters(), 0.1)
    opt.register_step_post_hook(lambda *a: steps.append(1))
    DDPOTrainer(make_loss("ddpo_is", policy), opt, TrainConfig(minibatch_size=2)).train(traj)
    assert len(steps) == 2


def test_on_policy_loss_takes_one_step_per_batch_with_the_whole_batch_gradient():
    enc = prompt_encoder()
    env, policy = make_env(batch_size=4, encoder=enc), make_policy(encoder=enc)
    traj = with_advantages(collect_trajectories(env, policy, num_batches=2), torch.linspace(-1.5, 1.5, 8))
    params = [p for p in policy.parameters() if p.requires_grad]
    # reference: the DDPO-SF gradient of all 8 trajectories at all steps, in one backward
    loss = make_loss("ddpo_sf", policy)
    sum(loss(traj[:, j])["loss_objective"] for j in range(traj.shape[1])).div(traj.shape[1]).backward()
    ref = [p.grad.clone() for p in params]
    policy.zero_grad(set_to_none=True)

    seen = []
    opt = torch.optim.SGD(params, 0.0)
    opt.register_step_pre_hook(lambda *a: seen.append([p.grad.clone() for p in params]))
    # 4 minibatches of 2, "accumulate 1": an off-policy loss would step 4 times
    DDPOTrainer(loss, opt, TrainConfig(minibatch_size=2, gradient_accumulation_steps=1, max_grad_norm=None)).train(traj)
    assert len(seen) == 1
    for g, r in zip(seen[0], ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="on-policy"):
        DDPOTrainer(loss, opt, TrainConfig(num_inner_epochs=2))


def test_timestep_fraction_trains_on_fewer_steps():
    enc = prompt_encoder()
    env, policy = make_env(batch_size=2, steps=4, encoder=enc), make_policy(steps=4, encoder=enc)
    calls = []
    loss = make_loss("ddpo_sf", policy)
    loss.register_forward_hook(lambda m, i, o: calls.append(i[0].batch_size))
    traj = with_advantages(collect_trajectories(env, policy), torch.ones(2))
    DDPOTrainer(loss, torch.optim.SGD(policy.parameters(), 0.0), TrainConfig(minibatch_size=2, timestep_fraction=0.5)).train(traj)
    assert len(calls) == 2 and calls[0] == (2,)


def test_nonfinite_gradient_skips_the_step():
    enc = prompt_encoder()
    env, policy = make_env(batch_size=2, encoder=enc), make_policy(encoder=enc)
    traj = with_advantages(collect_trajectories(env, policy), torch.tensor([float("inf"), 1.0]))
    before = [p.detach().clone() for p in policy.parameters()]
    trainer = DDPOTrainer(make_loss("ddpo_sf", policy), torch.optim.SGD(policy.parameters(), 0.1), TrainConfig(minibatch_size=2))
    metrics = trainer.train(traj)
    assert metrics["skipped_steps"].item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
