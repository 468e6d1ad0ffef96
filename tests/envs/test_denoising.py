import pytest
import torch
from torchrl.envs.utils import check_env_specs

from ddpo_rl.keys import KEYS
from ddpo_rl.models.tiny import sd_ddim_scheduler
from ddpo_rl.rewards.transform import RewardError
from envs.denoising import DenoisingEnv
from tests.helpers import PROMPTS, make_env, make_policy, prompt_encoder


def test_check_env_specs():
    check_env_specs(make_env())


def test_rollout_shapes_timesteps_done_and_terminal_reward():
    env, policy = make_env(batch_size=3, steps=5), make_policy(steps=5)
    with torch.no_grad():
        td = env.rollout(5, policy)
    assert td.batch_size == (3, 5)
    sched = sd_ddim_scheduler()
    sched.set_timesteps(5)
    assert (td[KEYS.timestep] == sched.timesteps).all()
    assert td[KEYS.step_index][0].tolist() == [0, 1, 2, 3, 4]
    done = td["next", KEYS.done].squeeze(-1)
    assert not done[:, :-1].any() and done[:, -1].all()
    reward = td["next", KEYS.reward].squeeze(-1)
    assert (reward[:, :-1] == 0).all()
    expected = (td["next", KEYS.latents][:, -1, :3] / 2 + 0.5).clamp(0, 1).mean((1, 2, 3))
    torch.testing.assert_close(reward[:, -1], expected)
    # the env's next latent is the policy's action
    torch.testing.assert_close(td["next", KEYS.latents], td[KEYS.action])
    # prompt embeddings are those of the drawn prompts
    expected = env.base_env.embed_prompts(td[KEYS.prompt_id][:, 0])[KEYS.prompt_embeds]
    torch.testing.assert_close(td[KEYS.prompt_embeds][:, 0], expected)


def test_seed_makes_reset_reproducible():
    env = make_env()
    env.set_seed(3)
    a = env.reset()
    env.set_seed(3)
    b = env.reset()
    torch.testing.assert_close(a[KEYS.latents], b[KEYS.latents])
    assert (a[KEYS.prompt_id] == b[KEYS.prompt_id]).all()


def test_reward_errors_are_named():
    env = make_env(reward=lambda images, prompts: torch.zeros(2))
    with pytest.raises(RewardError, match="shape"):
        with torch.no_grad():
            env.rollout(5, make_policy())
    env = make_env(reward=lambda images, prompts: torch.full((4,), float("nan")))
    with pytest.raises(RewardError, match="non-finite"):
        with torch.no_grad():
            env.rollout(5, make_policy())


def test_prompts_reach_the_reward_function():
    seen = []

    def reward(images, prompts):
        seen.extend(prompts)
        return torch.zeros(len(prompts))

    env = make_env(reward=reward)
    with torch.no_grad():
        td = env.rollout(5, make_policy())
    assert seen == [PROMPTS[i] for i in td[KEYS.prompt_id][:, -1].tolist()]


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(num_inference_steps=0)])
def test_bad_sizes(bad):
    kw = dict(batch_size=2, num_inference_steps=3) | bad
    with pytest.raises(ValueError):
        DenoisingEnv(PROMPTS, prompt_encoder(), sd_ddim_scheduler(), latent_shape=(4, 8, 8), **kw)


def test_empty_prompt_list():
    with pytest.raises(ValueError, match="empty"):
        DenoisingEnv([], prompt_encoder(), sd_ddim_scheduler(), 3, (4, 8, 8), 2)
