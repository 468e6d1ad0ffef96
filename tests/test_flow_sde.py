"""The flow-matching SDE step (ddpo_rl.flow_sde) against diffusers' Euler step, torch's Normal, and
an exact answer (Gaussian data, whose flow-matching velocity is known in closed form)."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from ddpo_rl.ddim import DDIMCoefficients
from ddpo_rl.flow_sde import (
    FlowSchedule,
    check_flow_log_prob_defined,
    flow_schedule,
    flow_sde_std,
    flow_sde_step_gaussian,
    flow_sde_step_log_prob,
)
from ddpo_rl.schedules import inference_timesteps

CONFIGS = [dict(), dict(shift=3.0), dict(shift=3.0, shift_terminal=0.05), dict(use_karras_sigmas=True)]


@pytest.mark.parametrize("config", CONFIGS)
def test_schedule_is_the_schedulers(config):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    s = flow_schedule(sched, 12)
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ref.set_timesteps(12)
    torch.testing.assert_close(s.timesteps, ref.timesteps)
    torch.testing.assert_close(s.sigmas, ref.sigmas)
    assert s.sigmas[-1] == 0 and s.num_steps == 12
    torch.testing.assert_close(inference_timesteps(sched, 12), ref.timesteps)
    assert getattr(sched, "num_inference_steps", None) is None  # the scheduler passed in is left as it was


@pytest.mark.parametrize("config", CONFIGS)
def test_noise_level_to_zero_gives_the_schedulers_euler_step(config):
    T = 10
    s = flow_schedule(FlowMatchEulerDiscreteScheduler(**config), T)
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ref.set_timesteps(T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for k, t in enumerate(ref.timesteps):
        v = torch.randn(3, 4, 8, 8, generator=g)
        euler = ref.step(v, t, x).prev_sample
        mean0, std0 = flow_sde_step_gaussian(v, s.sigmas[k], s.sigmas[k + 1], x, 0.0, s.sigma_max)
        torch.testing.assert_close(mean0, euler)
        assert (std0 == 0).all()
        mean, _ = flow_sde_step_gaussian(v, s.sigmas[k], s.sigmas[k + 1], x, 1e-3, s.sigma_max)
        torch.testing.assert_close(mean, euler, atol=1e-4, rtol=1e-4)
        x = euler


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction):
    s = flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 8)
    g = torch.Generator().manual_seed(1)
    k = torch.tensor([0, 3, 7])  # the first (t = 1), a middle and the last step, in one batch
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    nxt = torch.randn(3, 4, 8, 8, generator=g)
    mean, std = flow_sde_step_gaussian(v, s.sigmas[k], s.sigmas[k + 1], x, 0.7, s.sigma_max)
    lp = flow_sde_step_log_prob(v, s.sigmas[k], s.sigmas[k + 1], x, nxt, 0.7, s.sigma_max, reduction=reduction)
    dense = Normal(mean, std.expand_as(mean)).log_prob(nxt)
    expected = dense.mean((1, 2, 3)) if reduction == "mean" else dense.sum((1, 2, 3))
    torch.testing.assert_close(lp, expected)
    # and the std is the documented one: a sqrt(t / (1 - t)) sqrt(-dt)
    t, tn = s.sigmas[k], s.sigmas[k + 1]
    one_minus = torch.where(t == 1, 1 - s.sigmas[1], 1 - t)
    torch.testing.assert_close(std.flatten(), 0.7 * (t / one_minus).sqrt() * (t - tn).sqrt())


def test_first_and_last_steps_are_finite_gaussians():
    """t = 1 uses the second sigma in 1 - t (Flow-GRPO's choice); the last step (to t = 0) keeps a
    small positive std: neither gives inf or NaN."""
    for T in (1, 2, 10, 50):
        s = flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), T)
        std = flow_sde_std(s, 0.7)
        assert torch.isfinite(std).all() and (std > 0).all(), (T, std)
        check_flow_log_prob_defined(s, 0.7)
    s = flow_schedule(FlowMatchEulerDiscreteScheduler(), 10)
    x = torch.randn(2, 4, 4, 4)
    for k in (0, 9):
        mean, std = flow_sde_step_gaussian(torch.randn_like(x), s.sigmas[k], s.sigmas[k + 1], x, 0.7, s.sigma_max)
        lp = flow_sde_step_log_prob(
            torch.randn_like(x), s.sigmas[k], s.sigmas[k + 1], x, mean, 0.7, s.sigma_max
        )
        assert torch.isfinite(mean).all() and torch.isfinite(std).all() and torch.isfinite(lp).all()
    # the first step's std: a sqrt(1 / (1 - sigmas[1])) sqrt(1 - sigmas[1]) = a
    torch.testing.assert_close(flow_sde_std(s, 0.7)[0], torch.tensor(0.7))


def test_zero_std_is_refused_with_a_named_error():
    s = flow_schedule(FlowMatchEulerDiscreteScheduler(), 10)
    for a in (0.0, -0.5):
        with pytest.raises(ValueError, match=r"^noise_level: "):
            check_flow_log_prob_defined(s, a)
    # a schedule with a repeated sigma (dt = 0) or a step from t = 0: std 0, no log-prob
    for sigmas in ([1.0, 0.5, 0.5, 0.0], [1.0, 0.5, 0.0, 0.0]):
        bad = FlowSchedule(torch.tensor(sigmas[:-1]) * 1000, torch.tensor(sigmas))
        with pytest.raises(ValueError, match=r"^scheduler: the SDE step\(s\) \[\d\]"):
            check_flow_log_prob_defined(bad, 0.7)


def test_scheduler_families_are_checked():
    with pytest.raises(ValueError, match=r"^scheduler: DDIMScheduler is not a flow-matching scheduler"):
        flow_schedule(DDIMScheduler(), 10)
    with pytest.raises(ValueError, match=r"^scheduler: FlowMatchEulerDiscreteScheduler is not a DDIM-family"):
        DDIMCoefficients.from_scheduler(FlowMatchEulerDiscreteScheduler(), 10)
    assert inference_timesteps(DDIMScheduler(), 10).dtype == torch.int64


def _gaussian_velocity(x, t, m, s):
    """E[eps - x_0 | x_t = x] for x_0 ~ N(m, s^2), eps ~ N(0, 1), x_t = (1 - t) x_0 + t eps.

    x_t is Gaussian with mean (1 - t) m and variance V = (1 - t)^2 s^2 + t^2; Cov(x_0, x_t) =
    (1 - t) s^2 and Cov(eps, x_t) = t, so by Gaussian conditioning
    E[eps - x_0 | x] = -m + (t - (1 - t) s^2) / V (x - (1 - t) m)."""
    V = (1 - t) ** 2 * s**2 + t**2
    return -m + (t - (1 - t) * s**2) / V * (x - (1 - t) * m)


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_sde_sampling_reproduces_gaussian_data(noise_level):
    """SDE sampling with the exact velocity of N(m, s^2) data returns N(m, s^2), whatever a.

    200 steps of SD3's shifted schedule keep the discretisation bias under ~1% of s (measured:
    std 0.594-0.596 for s = 0.6); 160k draws give a standard error of ~0.001 on both moments."""
    torch.manual_seed(0)
    m, s, T = 0.5, 0.6, 200
    sch = flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), T)
    x = torch.randn(20000, 8)  # x_1 ~ N(0, I)
    for k in range(T):
        t, tn = sch.sigmas[k], sch.sigmas[k + 1]
        mean, std = flow_sde_step_gaussian(_gaussian_velocity(x, t, m, s), t, tn, x, noise_level, sch.sigma_max)
        x = mean + std * torch.randn_like(x)
    assert abs(x.mean().item() - m) < 0.01
    assert abs(x.std().item() - s) < 0.015


def test_mixed_step_is_the_sde_inside_the_window_and_euler_outside():
    from ddpo_rl.flow_sde import flow_mixed_step_gaussian, flow_ode_step, sde_window_mask

    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.7, 0.5, 0.3, 0.1])
    sde = torch.tensor([True, False, True, False])
    mean, std = flow_mixed_step_gaussian(v, sigma, sigma_next, x, 0.7, 0.9, sde)
    sde_mean, sde_std = flow_sde_step_gaussian(v, sigma, sigma_next, x, 0.7, 0.9)
    euler = flow_ode_step(v, sigma, sigma_next, x)
    torch.testing.assert_close(euler, x + v * (sigma_next - sigma).reshape(4, 1, 1, 1))
    torch.testing.assert_close(mean[sde], sde_mean[sde])
    torch.testing.assert_close(std[sde], sde_std[sde])
    torch.testing.assert_close(mean[~sde], euler[~sde])
    assert (std[~sde] == 0).all() and (std[sde] > 0).all()
    assert sde_window_mask(5, 2, 1).tolist() == [False, True, True, False, False]
    assert sde_window_mask(5, None).all() and sde_window_mask(5, 0).all()
    with pytest.raises(ValueError, match="sde_window_size"):
        sde_window_mask(5, 3, 3)
