import math

import pytest
import torch
from diffusers import DDIMScheduler

from ddpo_rl.ddim import (
    DDIMCoefficients,
    check_log_prob_defined,
    ddim_std,
    ddim_step_gaussian,
    ddim_step_log_prob,
    gaussian_log_prob,
    reduce_log_prob,
)
from ddpo_rl.models.tiny import sd_ddim_scheduler
from ddpo_rl.policy import inference_timesteps

CONFIGS = {
    "sd-eps": dict(),
    "sd-v": dict(prediction_type="v_prediction"),
    "sample-clip": dict(prediction_type="sample", clip_sample=True, beta_schedule="linear"),
    "trailing-cosine": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_mean_plus_std_noise_equals_diffusers_step_at_every_step(name, eta, num_steps):
    sched = sd_ddim_scheduler(**CONFIGS[name])
    sched.set_timesteps(num_steps)
    coeffs = DDIMCoefficients.from_scheduler(sched, num_steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for t in sched.timesteps:
        out = torch.randn(3, 4, 8, 8, generator=g)
        z = torch.randn(3, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        mean, std = ddim_step_gaussian(coeffs, out, t.expand(3), x, eta)
        torch.testing.assert_close(mean + std * z, ref, rtol=1e-5, atol=1e-5)
        x = ref


def test_batch_of_different_timesteps_matches_per_sample_steps():
    sched = sd_ddim_scheduler()
    sched.set_timesteps(20)
    coeffs = DDIMCoefficients.from_scheduler(sched, 20)
    ts = sched.timesteps[[0, 7, 19]]
    x, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    mean, std = ddim_step_gaussian(coeffs, out, ts, x)
    for i, t in enumerate(ts):
        ref = sched.step(out[i : i + 1], t, x[i : i + 1], eta=1.0, variance_noise=torch.zeros(1, 4, 8, 8))
        torch.testing.assert_close(mean[i : i + 1], ref.prev_sample, rtol=1e-5, atol=1e-6)
        assert std[i].item() == pytest.approx(math.sqrt(sched._get_variance(t, t - 50).item()), rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_matches_torch_normal_at_every_step(reduction):
    sched = sd_ddim_scheduler()
    num_steps = 20
    sched.set_timesteps(num_steps)
    coeffs = DDIMCoefficients.from_scheduler(sched, num_steps)
    x = torch.randn(2, 4, 8, 8)
    for t in sched.timesteps:
        out = torch.randn_like(x)
        mean, std = ddim_step_gaussian(coeffs, out, t.expand(2), x)
        nxt = mean + std * torch.randn_like(x)
        lp = ddim_step_log_prob(coeffs, out, t.expand(2), x, nxt, reduction=reduction)
        ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(nxt).flatten(1)
        ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
        assert torch.isfinite(lp).all(), f"non-finite log-prob at t={t}"
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-4)
        x = nxt


def test_last_step_std_is_small_but_positive_with_sd_settings():
    sched = sd_ddim_scheduler()
    ts = inference_timesteps(sched, 50)
    coeffs = DDIMCoefficients.from_scheduler(sched, 50)
    std = ddim_std(coeffs, ts, 1.0)
    assert (std > 0).all()
    assert std[-1] < std[:-1].min()  # the last step is the sharpest
    check_log_prob_defined(coeffs, ts, 1.0)  # no error


def test_clear_error_when_last_std_is_zero():
    sched = sd_ddim_scheduler(set_alpha_to_one=True)
    ts = inference_timesteps(sched, 10)
    coeffs = DDIMCoefficients.from_scheduler(sched, 10)
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        check_log_prob_defined(coeffs, ts, 1.0)


def test_eta_above_one_is_refused_where_diffusers_step_gives_nan():
    """eta > 1 makes sigma_t larger than sqrt(1 - alpha_bar_{t-1}) at some step (here the step to the clean
    level at 1.05): diffusers' step returns NaN there, so the policy refuses such an eta up front."""
    sched = sd_ddim_scheduler()
    ts = inference_timesteps(sched, 10)
    coeffs = DDIMCoefficients.from_scheduler(sched, 10)
    sched.set_timesteps(10)
    x, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    nan = [bool(sched.step(out, t, x, eta=2.0, variance_noise=torch.zeros_like(x)).prev_sample.isnan().any()) for t in sched.timesteps]
    assert any(nan)
    check_log_prob_defined(coeffs, ts, 1.0)  # the largest eta allowed
    with pytest.raises(ValueError, match="eta=2.0: DDIM's eta is at most 1"):
        check_log_prob_defined(coeffs, ts, 2.0)


@pytest.mark.parametrize("eta", [0.0, -1.0])
def test_clear_error_when_eta_not_positive(eta):
    sched = sd_ddim_scheduler()
    coeffs = DDIMCoefficients.from_scheduler(sched, 10)
    with pytest.raises(ValueError, match="eta"):
        check_log_prob_defined(coeffs, inference_timesteps(sched, 10), eta)


def test_thresholding_is_refused():
    with pytest.raises(NotImplementedError):
        DDIMCoefficients.from_scheduler(DDIMScheduler(thresholding=True, set_alpha_to_one=False), 10)


def test_reduce_log_prob_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="mean"):
        reduce_log_prob(torch.zeros(2, 3), 1, "max")


def test_gaussian_log_prob_of_mean_is_the_peak_density():
    mean = torch.zeros(1, 5)
    std = torch.full((1, 1), 0.5)
    lp = gaussian_log_prob(mean, mean, std, reduction="sum")
    assert lp.item() == pytest.approx(5 * (-math.log(0.5) - 0.5 * math.log(2 * math.pi)), rel=1e-6)
