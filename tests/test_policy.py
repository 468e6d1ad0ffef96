import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from ddpo_rl.ddim import DDIMCoefficients, ddim_step_gaussian
from ddpo_rl.keys import KEYS
from ddpo_rl.models.tiny import sd_ddim_scheduler
from tests.helpers import make_policy, prompt_encoder


def _state(enc, b=2):
    sched = sd_ddim_scheduler()
    sched.set_timesteps(5)
    return TensorDict(
        {
            KEYS.latents: torch.randn(b, 4, 8, 8),
            KEYS.timestep: sched.timesteps[[0, 3]][:b],
            KEYS.prompt_embeds: enc(["a cat", "a dog"][:b]),
        },
        batch_size=[b],
    )


def test_cfg_mean_matches_manual_guidance_and_diffusers_step():
    enc = prompt_encoder()
    policy = make_policy(guidance=4.0, encoder=enc)
    td = _state(enc)
    with torch.no_grad():
        out = policy(td.clone())
        unet = policy.noise_model
        x, t, c = td[KEYS.latents], td[KEYS.timestep], td[KEYS.prompt_embeds]
        neg = enc.negative_embeds().expand_as(c)
        eps_c = unet(x, t, encoder_hidden_states=c).sample
        eps_u = unet(x, t, encoder_hidden_states=neg).sample
        eps = eps_u + 4.0 * (eps_c - eps_u)
    mean, std = ddim_step_gaussian(DDIMCoefficients.from_scheduler(sd_ddim_scheduler(), 5), eps, t, x)
    torch.testing.assert_close(out[KEYS.loc], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[KEYS.scale], std)
    # the action is a draw from N(mean, std) and its log-prob is the mean-reduced density
    lp = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(out[KEYS.action]).flatten(1).mean(1)
    torch.testing.assert_close(out[KEYS.log_prob], lp, rtol=1e-5, atol=1e-5)


def test_sum_reduction_is_numel_times_mean():
    enc = prompt_encoder()
    td = _state(enc)
    p_mean = make_policy(guidance=1.0, encoder=enc)
    p_sum = make_policy(guidance=1.0, encoder=enc, log_prob_reduction="sum")
    with torch.no_grad():
        a = p_mean(td.clone())
        b = p_sum.get_dist(td.clone()).log_prob(a[KEYS.action])
    torch.testing.assert_close(b, a[KEYS.log_prob] * 4 * 8 * 8, rtol=1e-5, atol=1e-3)


def test_random_by_default_mean_when_deterministic():
    enc = prompt_encoder()
    policy = make_policy(encoder=enc)
    td = _state(enc)
    with torch.no_grad():
        a = policy(td.clone())
        with set_exploration_type(ExplorationType.DETERMINISTIC):
            b = policy(td.clone())
    assert not torch.allclose(a[KEYS.action], a[KEYS.loc])
    torch.testing.assert_close(b[KEYS.action], b[KEYS.loc])


def test_guidance_without_negative_embeds_is_an_error():
    from ddpo_rl.policy import DiffusionPolicy
    from ddpo_rl.models.tiny import tiny_unet

    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        DiffusionPolicy(tiny_unet(), sd_ddim_scheduler(), 5, guidance_scale=3.0)


def test_policy_refuses_schedule_with_undefined_log_prob():
    from ddpo_rl.policy import DiffusionPolicy
    from ddpo_rl.models.tiny import tiny_unet

    with pytest.raises(ValueError, match="set_alpha_to_one"):
        DiffusionPolicy(tiny_unet(), sd_ddim_scheduler(set_alpha_to_one=True), 5)
    with pytest.raises(ValueError, match="eta"):
        DiffusionPolicy(tiny_unet(), sd_ddim_scheduler(), 5, eta=0.0)
