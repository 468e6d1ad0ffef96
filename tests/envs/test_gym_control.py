"""envs/gym_control.py: the envs' random state is saved and put back (what dppo_gym's --resume relies on)."""

import pytest
import torch

from envs.gym_control import env_rng_state, make_control_env, set_env_rng_state


def test_env_rng_state_puts_back_the_initial_states_of_the_next_episodes():
    env = make_control_env("Pendulum-v1", num_envs=3, seed=0)
    env.reset()
    state = env_rng_state(env)
    first = env.reset()["observation"]
    second = env.reset()["observation"]
    assert not torch.equal(first, second)  # each reset draws new initial states
    other = make_control_env("Pendulum-v1", num_envs=3, seed=1)  # another env, another seed
    set_env_rng_state(other, state)
    assert torch.equal(other.reset()["observation"], first) and torch.equal(other.reset()["observation"], second)
    with pytest.raises(ValueError, match="3 env copies, the env has 2"):
        set_env_rng_state(make_control_env("Pendulum-v1", num_envs=2, seed=0), state)
