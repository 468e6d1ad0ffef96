"""A flow-matching sampling step as a Gaussian policy: the marginal-preserving SDE of Flow-GRPO.

Pure functions: no module state, no host-device sync, any batch of steps at once.

A flow-matching model (rectified flow: Stable Diffusion 3, FLUX) is trained on the straight path
``x_t = (1 - t) x_0 + t eps`` between data x_0 (t = 0) and noise eps ~ N(0, I) (t = 1); the network
predicts the velocity ``v_theta(x_t, t) ~ E[eps - x_0 | x_t]``, and diffusers' Euler sampler
integrates the ODE ``dx = v dt`` from t = 1 down to 0. That ODE is deterministic: no log-prob.
Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv 2505.05470, sec. 4.2, eq. 9) replaces it by an SDE with the SAME marginals p_t, whose
Euler-Maruyama step is a Gaussian with an exact density.

Notation (Flow-GRPO eq. 9 and the text below it)::

    code                 paper
    -------------------  ------------------------------------------------------------------
    sample               x_t, the current latent (the MDP state's image part)
    model_output         v_theta(x_t, t), the predicted velocity (guided, with CFG)
    sigma                t, the current time = noise level of x_t (scheduler.sigmas[k])
    sigma_next           t + dt, the next time (scheduler.sigmas[k + 1]; 0 after the last step)
    dt                   dt = sigma_next - sigma < 0 (sampling runs from t = 1 to t = 0)
    noise_level          a, Flow-GRPO's noise-level hyper-parameter (0.7 in the paper)
    diffusion            sigma_t = a sqrt(t / (1 - t)), the SDE's diffusion coefficient
    std                  sigma_t sqrt(-dt), the std of the step's Gaussian
    mean                 mu_theta = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt
    next latent          x_{t+dt} ~ N(mu_theta, sigma_t^2 |dt| I)   (the MDP action)
    log_prob             log pi_theta(x_{t+dt} | x_t, c), reduced over the latent dims

Derivation (why this SDE keeps the marginals). From x_t = (1 - t) x_0 + t eps and v = eps - x_0:
eps = x_t + (1 - t) v, so the score of p_t is  grad log p_t(x) = -E[eps | x_t = x] / t
= -(x + (1 - t) v) / t.  For any g_t, the forward-time SDE  dx = [v + g_t^2/2 grad log p_t] dt
+ g_t dW  has the marginals of the ODE (its Fokker-Planck drift term g^2/2 div(p grad log p)
cancels the diffusion term g^2/2 laplacian p). Its time reversal, run with dt < 0, is
dx = [v - g_t^2/2 grad log p_t] dt + g_t dW = [v + g_t^2/(2t) (x + (1 - t) v)] dt + g_t dW:
Flow-GRPO's eq. 9 with g_t = sigma_t. One Euler-Maruyama step of it is the Gaussian above
(``sqrt(-dt)``: the Brownian increment over |dt|). As a -> 0 the mean is diffusers'
``FlowMatchEulerDiscreteScheduler.step``, ``x_t + dt v`` (tests/test_flow_sde.py).

Two edges of the schedule:

- t = 1 (the first step): sigma_t = a sqrt(t / (1 - t)) is infinite. As Flow-GRPO's reference
  code does, the ``1 - t`` under the root is then evaluated at the schedule's SECOND sigma
  (``sigmas[1]``, its largest t < 1): ``sigma_t = a sqrt(1 / (1 - sigmas[1]))`` at t = 1. The drift
  keeps t = 1 itself (its ``1/(2t)`` is finite). :attr:`FlowSchedule.sigma_max` holds that value.
- t_{T-1} -> 0 (the last step, to sigma_next = 0): the std sigma_t sqrt(t) is small but positive
  (a t / sqrt(1 - t)), so the last step is a Gaussian like the others and its log-prob exists;
  the sample x_0 carries that last bit of noise, as in Flow-GRPO. A std of exactly 0 (a step
  from t = 0, a repeated sigma, or a = 0) has no log-prob: :func:`check_flow_log_prob_defined`
  refuses such a schedule at setup with a named error (never a NaN in the loop).

Log-prob reduction: the same documented choice as DDIM's (:mod:`ddpo_rl.ddim`): the MEAN of the
per-dim log-densities by default (Flow-GRPO's reference code also takes the mean), "sum" for the
joint density.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpo_rl.ddim import _bcast, gaussian_log_prob


def is_flow_matching_scheduler(scheduler) -> bool:
    """True for diffusers' ``FlowMatchEulerDiscreteScheduler`` (and subclasses): the schedulers this
    module reads (``sigmas`` with a terminal 0, timesteps = sigma * num_train_timesteps)."""
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
    except ImportError:  # pragma: no cover
        return False
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def check_flow_scheduler(scheduler, field: str = "scheduler") -> None:
    """Raise a one-line ValueError naming ``field`` unless ``scheduler`` is a flow-matching one."""
    if not is_flow_matching_scheduler(scheduler):
        raise ValueError(
            f"{field}: {type(scheduler).__name__} is not a flow-matching scheduler; the flow-matching policy "
            "needs diffusers' FlowMatchEulerDiscreteScheduler (for a DDIM-family scheduler use DiffusionPolicy)"
        )
    if getattr(scheduler.config, "invert_sigmas", False):
        raise ValueError(f"{field}: invert_sigmas=True (Mochi's inverted schedule) is not supported")


@dataclass(frozen=True)
class FlowSchedule:
    """The T sampling steps of a flow-matching scheduler, as tensors.

    Build it with :func:`flow_schedule`; it holds no reference to the scheduler.
    """

    timesteps: torch.Tensor
    """What the network is called with at step k: ``scheduler.timesteps`` (sigma * 1000), float32 [T]."""
    sigmas: torch.Tensor
    """t_0 = 1 > t_1 > ... > t_{T-1} > t_T = 0: ``scheduler.sigmas``, float32 [T + 1]."""

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        """The t used in sigma_t's ``1 - t`` when t = 1: the schedule's second sigma (Flow-GRPO's
        ``sigmas[1]``; see the module docstring). 0-dim."""
        return self.sigmas[1] if self.sigmas.shape[0] > 2 else self.sigmas.new_zeros(())

    def to(self, device) -> FlowSchedule:
        return FlowSchedule(self.timesteps.to(device), self.sigmas.to(device))


def flow_schedule(scheduler, num_inference_steps: int, mu: float | None = None, device=None) -> FlowSchedule:
    """The schedule a ``FlowMatchEulerDiscreteScheduler`` visits in T steps (its shift, shift_terminal,
    karras/exponential/beta sigmas included), without changing the scheduler passed in.

    ``mu`` is the resolution-dependent shift of configs with ``use_dynamic_shifting`` (FLUX); SD3's
    config has a fixed ``shift`` (3.0) and needs none.
    """
    check_flow_scheduler(scheduler)
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be positive")
    if getattr(scheduler.config, "use_dynamic_shifting", False) and mu is None:
        raise ValueError("scheduler: use_dynamic_shifting=True needs mu (the resolution-dependent shift)")
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps, mu=mu)
    timesteps = sched.timesteps.detach().to(device=device, dtype=torch.float32).clone()
    sigmas = sched.sigmas.detach().to(device=device, dtype=torch.float32).clone()
    return FlowSchedule(timesteps, sigmas)


def sde_diffusion(sigma: torch.Tensor, noise_level, sigma_max) -> torch.Tensor:
    """sigma_t = a sqrt(t / (1 - t)), with ``1 - sigma_max`` in place of ``1 - t`` at t = 1."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_max = torch.as_tensor(sigma_max, dtype=torch.float32, device=sigma.device)
    one_minus = 1 - torch.where(sigma == 1, sigma_max, sigma)
    return torch.as_tensor(noise_level, dtype=torch.float32, device=sigma.device) * (sigma / one_minus).sqrt()


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a float, a 0-dim or a [B] tensor) as float32 [B, 1, ..., 1] on ``like``'s device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return _bcast(value.expand(like.shape[0]) if value.dim() == 0 else value, like)


def flow_sde_step_gaussian(
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sample: torch.Tensor,
    noise_level,
    sigma_max,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian pi(x_{t+dt} | x_t, c) of one step of Flow-GRPO's SDE (module docstring).

    Args:
        model_output: the (guided) velocity v_theta(x_t, t) [B, ...].
        sigma: t [B] (or 0-dim for the whole batch).
        sigma_next: t + dt [B] (or 0-dim); 0 for the last step.
        sample: x_t [B, ...].
        noise_level: a (a float, or a tensor broadcastable to [B]); 0 gives the ODE's Euler step
            (std 0: no log-prob).
        sigma_max: the t used in ``1 - t`` when t = 1 (:attr:`FlowSchedule.sigma_max`).

    Returns:
        ``(mean, std)``: mean [B, ...] in float32 and std [B, 1, ..., 1], broadcastable to the sample.
    """
    x_t = sample.float()
    v = model_output.float()
    # 1. t, t + dt and a as [B, 1, ..., 1] float32 (the latents may be half)
    t, t_next, a = _per_sample(sigma, x_t), _per_sample(sigma_next, x_t), _per_sample(noise_level, x_t)
    dt = t_next - t  # < 0

    # 2. the diffusion coefficient sigma_t = a sqrt(t / (1 - t)) (t = 1: see the module docstring)
    diffusion = sde_diffusion(t, a, sigma_max)

    # 3. mean: x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt   (Flow-GRPO eq. 9)
    score_term = diffusion**2 / (2 * t) * (x_t + (1 - t) * v)
    mean = x_t + (v + score_term) * dt

    # 4. std of the Euler-Maruyama increment: sigma_t sqrt(|dt|)
    std = diffusion * (-dt).clamp(min=0).sqrt()
    return mean, std


def flow_ode_step(model_output: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """One deterministic Euler step of the flow ODE, x_{t+dt} = x_t + v dt (diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``), in float32. ``sigma``/``sigma_next``: [B] or 0-dim."""
    x_t = sample.float()
    return x_t + model_output.float() * (_per_sample(sigma_next, x_t) - _per_sample(sigma, x_t))


def sde_window_mask(num_steps: int, window_size: int | None, window_start: int = 0, device=None) -> torch.Tensor:
    """[T] bool: which of the T steps are SDE steps. ``window_size`` None or 0: all of them (Flow-GRPO);
    else steps ``window_start .. window_start + window_size - 1`` (MixGRPO / Flow-GRPO-Fast's window)."""
    steps = torch.arange(num_steps, device=device)
    if not window_size:
        return torch.ones(num_steps, dtype=torch.bool, device=device)
    if window_size < 0 or window_start < 0 or window_start + window_size > num_steps:
        raise ValueError(
            f"sde_window_size: a window of {window_size} steps from step {window_start} does not fit in the "
            f"{num_steps} sampling steps"
        )
    return (steps >= window_start) & (steps < window_start + window_size)


def flow_mixed_step_gaussian(
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sample: torch.Tensor,
    noise_level,
    sigma_max,
    sde: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a sampler that is the SDE inside a window of steps and the ODE outside it.

    MixGRPO (Li et al. 2025, arXiv 2507.21802) and Flow-GRPO-Fast sample with Flow-GRPO's SDE on a
    window of W consecutive steps only, and with the deterministic Euler ODE step elsewhere; only the
    window's steps are stochastic, so only they carry a log-probability and are trained on (W of T
    forward/backward passes per trajectory). The marginals are those of the flow either way (both
    samplers keep p_t), so the window can sit anywhere.

    Args:
        model_output, sigma, sigma_next, sample, noise_level, sigma_max: as :func:`flow_sde_step_gaussian`.
        sde: bool [B]: True where the step is an SDE step (in the window).

    Returns:
        ``(mean, std)``: the SDE Gaussian's where ``sde``; elsewhere the Euler step x_t + v dt and std 0
        (a point mass: the step is deterministic and has no log-probability to train on).
    """
    # 1. the SDE step's Gaussian (Flow-GRPO eq. 9)
    mean, std = flow_sde_step_gaussian(model_output, sigma, sigma_next, sample, noise_level, sigma_max)
    # 2. the ODE's Euler step
    euler = flow_ode_step(model_output, sigma, sigma_next, sample)
    # 3. pick per chain: SDE inside the window, ODE (std 0) outside
    in_window = _bcast(sde.to(device=mean.device, dtype=torch.bool), mean)
    return torch.where(in_window, mean, euler), torch.where(in_window, std, torch.zeros_like(std))


def flow_sde_step_log_prob(
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sample: torch.Tensor,
    next_sample: torch.Tensor,
    noise_level,
    sigma_max,
    reduction: str = "mean",
) -> torch.Tensor:
    """log pi(next_sample | sample, c) for one SDE step: [B] (reduced like DDIM's, see ddpo_rl.ddim)."""
    mean, std = flow_sde_step_gaussian(model_output, sigma, sigma_next, sample, noise_level, sigma_max)
    return gaussian_log_prob(next_sample, mean, std, reduction=reduction)


def flow_sde_std(schedule: FlowSchedule, noise_level: float) -> torch.Tensor:
    """The std of each of the T steps, [T] float32."""
    t, t_next = schedule.sigmas[:-1], schedule.sigmas[1:]
    return sde_diffusion(t, noise_level, schedule.sigma_max) * (t - t_next).clamp(min=0).sqrt()


def check_flow_log_prob_defined(schedule: FlowSchedule, noise_level: float, field: str = "noise_level") -> None:
    """Raise a one-line ValueError if any step of the schedule has no log-probability.

    Called once at setup (it syncs with the host), never in the sampling loop.
    """
    if not noise_level > 0:
        raise ValueError(
            f"{field}: {noise_level} must be > 0: with a = 0 the flow-matching SDE is the deterministic Euler "
            "ODE step, which has no log-probability (Flow-GRPO uses 0.7)"
        )
    std = flow_sde_std(schedule, noise_level)
    bad = (std <= 0) | ~torch.isfinite(std)
    if bool(bad.any()):
        steps = torch.nonzero(bad.cpu()).flatten().tolist()
        raise ValueError(
            f"scheduler: the SDE step(s) {steps} of this {schedule.num_steps}-step schedule have std 0 or a "
            f"non-finite std (sigmas {schedule.sigmas.tolist()}), so their log-probability is undefined; the "
            "sigmas must decrease strictly from t < 1 or t = 1 with a second sigma < 1"
        )
