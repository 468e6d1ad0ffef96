"""The gymnasium view of the denoising env: gymnasium's own checker, and agreement with torchrl."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from ddpo_rl.keys import KEYS
from envs.gym_adapter import DenoisingGymEnv
from tests.helpers import PROMPTS, make_env

STEPS = 3


@pytest.fixture(scope="module")
def gym_env():
    return DenoisingGymEnv(make_env(batch_size=1, steps=STEPS))


def test_passes_gymnasium_check_env(gym_env):
    check_env(gym_env, skip_render_check=True)


def test_episode_rewards_terminal_brightness_and_spaces(gym_env):
    obs, info = gym_env.reset(seed=0)
    assert gym_env.observation_space.contains(obs) and info["prompt"] in PROMPTS
    rewards, terminated = [], False
    for k in range(STEPS):
        action = np.full(gym_env.action_space.shape, 0.5 * (k + 1), dtype=np.float32)
        obs, reward, terminated, truncated, info = gym_env.step(action)
        assert gym_env.observation_space.contains(obs) and not truncated
        np.testing.assert_array_equal(obs[KEYS.latents], action)  # the next latent is the action
        assert obs[KEYS.step_index] == k + 1
        rewards.append(reward)
    assert terminated and rewards[:-1] == [0.0] * (STEPS - 1)
    # the reward transform's brightness of the last latent: first 3 channels, [-1, 1] -> [0, 1], mean
    expected = float(np.clip(np.full(3, 0.5 * STEPS) / 2 + 0.5, 0, 1).mean())
    assert rewards[-1] == pytest.approx(expected)
    with pytest.raises(RuntimeError, match="reset"):
        gym_env.step(action)


def test_seeded_resets_repeat_and_differ(gym_env):
    a, _ = gym_env.reset(seed=7)
    b, _ = gym_env.reset(seed=7)
    c, _ = gym_env.reset(seed=8)
    np.testing.assert_array_equal(a[KEYS.latents], b[KEYS.latents])
    assert not np.array_equal(a[KEYS.latents], c[KEYS.latents])


def test_rejects_batched_env_and_bad_actions(gym_env):
    with pytest.raises(ValueError, match="batch_size=\\[1\\]"):
        DenoisingGymEnv(make_env(batch_size=2, steps=STEPS))
    with pytest.raises(TypeError, match="DenoisingEnv"):
        DenoisingGymEnv(object())
    gym_env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        gym_env.step(np.zeros(3, dtype=np.float32))
