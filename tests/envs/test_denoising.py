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


def test_prompt_embeddings_stay_bounded_over_a_large_prompt_file(tmp_path):
    """20k prompts: nothing is encoded up front; after many resets the cache holds at most
    prompt_cache_size prompts (entries and bytes), and the embeddings are the encoder's."""
    from tests.helpers import HashEncoder

    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"prompt number {i}" for i in range(20_000)))
    from ddpo_rl.prompts import PromptSource

    enc = HashEncoder(length=4, dim=16)
    base = DenoisingEnv(
        PromptSource.from_file(path), enc, sd_ddim_scheduler(), 2, (4, 8, 8), 16,
        prompt_cache_size=64, encode_batch_size=8,
    )
    assert sum(enc.calls) == 1  # one prompt, for the specs
    per_prompt = (4 * 16 + 16) * 4  # prompt + pooled embeddings, float32
    for _ in range(100):
        td = base.reset()
        assert len(base.prompt_cache) <= 64 and base.prompt_cache.nbytes <= 64 * per_prompt
        assert max(enc.calls) <= 8  # encoded in batches of encode_batch_size
    got = enc(base.prompts_of(td[KEYS.prompt_id]))
    torch.testing.assert_close(td[KEYS.prompt_embeds], got[KEYS.prompt_embeds])
    torch.testing.assert_close(td[KEYS.pooled_prompt_embeds], got[KEYS.pooled_prompt_embeds])
    assert base.prompt_cache.misses > 1000  # 1600 draws over 20k prompts: almost all new


def test_cache_hits_for_a_small_prompt_set_and_lru_order():
    from ddpo_rl.text import PromptEmbeddingCache
    from tests.helpers import HashEncoder

    enc = HashEncoder(pooled=False)
    cache = PromptEmbeddingCache(enc, capacity=2, batch_size=2)
    cache(["a", "b"])
    cache(["a"])  # "a" is now the most recent
    cache(["c"])  # evicts "b"
    assert list(cache._entries) == ["a", "c"] and cache.hits == 1 and cache.misses == 3
    out = cache(["c", "c", "a"])  # duplicates in a request are encoded once
    assert out[KEYS.prompt_embeds].shape[0] == 3 and cache.misses == 3
    # a request with more distinct prompts than the capacity is still served in order
    out = cache(["x", "y", "z"])
    torch.testing.assert_close(out[KEYS.prompt_embeds], enc(["x", "y", "z"]))
    assert len(cache) == 2
    with pytest.raises(ValueError, match="^prompt_cache_size: "):
        PromptEmbeddingCache(enc, capacity=0)


def test_group_order_repeats_each_prompt_and_checks_the_size():
    env = make_env(batch_size=6, prompts=[f"p{i}" for i in range(50)], group_size=3)
    env.set_seed(0)
    ids = env.reset()[KEYS.prompt_id]
    assert (ids[0:3] == ids[0]).all() and (ids[3:6] == ids[3]).all()
    with pytest.raises(ValueError, match=r"^group_size: 4 must be >= 1 and divide the batch size 6"):
        make_env(batch_size=6, group_size=4)
