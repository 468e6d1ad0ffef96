"""Asynchronous rewards in the sampling loop: the reward of batch k runs while batch k+1 samples,
and the collected rewards equal the synchronous ones."""

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)
import threading

import pytest
import torch

from ddpo_rl.collector import collect_trajectories, terminal_rewards
from ddpo_rl.rewards.async_reward import AsyncReward
from ddpo_rl.rewards.transform import RewardError
from tests.helpers import brightness, make_env, make_policy, prompt_encoder

STEPS, B = 3, 2


def _collect(env, policy, num_batches=2, seed=0):
    torch.manual_seed(seed)
    env.set_seed(seed)
    return collect_trajectories(env, policy, num_batches=num_batches)


@pytest.fixture(scope="module")
def parts():
    encoder = prompt_encoder()
    return encoder, make_policy(steps=STEPS, encoder=encoder)


def test_async_rewards_overlap_sampling_and_equal_sync(parts):
    encoder, policy = parts
    policy_calls = 0
    next_batch_started = threading.Event()

    def count_calls(module, args):  # the policy's forward: T calls per batch
        nonlocal policy_calls
        policy_calls += 1
        if policy_calls == STEPS + 1:  # first step of the 2nd batch
            next_batch_started.set()

    log = []

    def slow_reward(images, prompts):
        # Batch 0's reward waits (up to 20 s) for batch 1's sampling to begin. Run synchronously
        # it would block the sampler, time out and record False: a deterministic failure, no timing.
        first = not log
        saw_next_batch = next_batch_started.wait(20) if first else None
        log.append((threading.current_thread().name, saw_next_batch))
        return brightness(images, prompts)

    handle = policy.register_forward_pre_hook(count_calls)
    try:
        with AsyncReward(slow_reward) as reward:
            env = make_env(batch_size=B, steps=STEPS, reward=reward, encoder=encoder)
            assert env.transform.asynchronous
            traj = _collect(env, policy)
    finally:
        handle.remove()
    assert log[0] == ("ddpo-reward_0", True), log  # batch 0 scored in the pool while batch 1 sampled
    assert len(log) == 2 and log[1][0].startswith("ddpo-reward")

    sync_env = make_env(batch_size=B, steps=STEPS, reward=brightness, encoder=encoder)
    assert not sync_env.transform.asynchronous
    expected = _collect(sync_env, policy)
    r_async, r_sync = terminal_rewards(traj), terminal_rewards(expected)
    assert r_async.shape == (2 * B,) and (r_sync != 0).all()
    torch.testing.assert_close(r_async, r_sync)
    torch.testing.assert_close(traj["next", "reward"], expected["next", "reward"])  # zeros before the last step
    torch.testing.assert_close(traj["action"], expected["action"])


def test_async_reward_errors_are_named_and_the_queue_is_cleared(parts):
    encoder, policy = parts

    def nan_reward(images, prompts):
        return torch.full((images.shape[0],), float("nan"))

    with AsyncReward(nan_reward) as reward:
        env = make_env(batch_size=B, steps=STEPS, reward=reward, encoder=encoder)
        with pytest.raises(RewardError, match="reward function nan_reward returned .* non-finite"):
            _collect(env, policy)
        assert env.transform._pending == []

    def failing(images, prompts):
        raise KeyError("boom")

    with AsyncReward(failing) as reward:
        env = make_env(batch_size=B, steps=STEPS, reward=reward, encoder=encoder)
        with pytest.raises(RewardError, match="reward function failing raised: KeyError.*boom"):  # not "AsyncReward"
            _collect(env, policy, num_batches=1)
