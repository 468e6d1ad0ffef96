"""A DDIM step with eta > 0 as a Gaussian policy, and its exact log-probability.

Pure functions: no module state, no host-device sync, any batch of timesteps at once.

Notation (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16; Black et
al. 2024, "Training Diffusion Models with Reinforcement Learning", sec. 4.2)::

    code                   paper
    ---------------------  -------------------------------------------------------------
    sample                 x_t, the current latent (the MDP state's image part)
    model_output           eps_theta(x_t, t, c) (or v, or x_0, by the scheduler's prediction_type)
    alpha_prod_t           alpha_bar_t  (alphas_cumprod[t])
    alpha_prod_t_prev      alpha_bar_{t-1}  (alphas_cumprod[t - 1000/T], or the scheduler's
                           final_alpha_cumprod past the first training step)
    pred_original_sample   x_0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    std                    sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t))
                                         sqrt(1 - alpha_bar_t / alpha_bar_{t-1})
    mean                   mu_theta = sqrt(alpha_bar_{t-1}) x_0_hat
                                      + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps
    next latent            x_{t-1} ~ N(mu_theta, sigma_t^2 I)   (the MDP action)
    log_prob               log pi_theta(x_{t-1} | x_t, c), reduced over the latent dims
    ref_mean               mu_ref, the same step's mean under the reference (pre-fine-tuning) model
    kl                     KL(pi_theta(. | x_t, c) || pi_ref(. | x_t, c)), reduced over the latent dims

``mean + std * z`` is exactly ``DDIMScheduler.step(model_output, t, x_t, eta, variance_noise=z)``
(tests/test_ddim.py checks it at every step of several scheduler configs).

Log-prob reduction. The density of x_{t-1} factorises over the C*H*W latent dims. DDPO's
reference implementation takes the MEAN of the per-dim log-densities, not their sum; the
PPO clip range of the paper (1e-4) is calibrated on that scale. ``reduction="mean"`` is
therefore the default everywhere in ddpo_rl; ``"sum"`` gives the true joint log-density
(the ratio exp(sum) is then far more sensitive: scale the clip range accordingly).
The KL to the reference policy (:func:`gaussian_kl`) is reduced the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_PROB_REDUCTIONS = ("mean", "sum")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def check_ddim_scheduler(scheduler, field: str = "scheduler") -> None:
    """Raise a one-line ValueError naming ``field`` unless ``scheduler`` has DDIM's alphas."""
    if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "final_alpha_cumprod"):
        raise ValueError(
            f"{field}: {type(scheduler).__name__} is not a DDIM-family scheduler (no alphas_cumprod / "
            "final_alpha_cumprod); DiffusionPolicy needs a DDIMScheduler (for a flow-matching scheduler use "
            "ddpo_rl.flow_policy.FlowMatchingPolicy)"
        )


def ddim_timesteps(scheduler, num_inference_steps: int) -> torch.Tensor:
    """The T integer timesteps a DDIM scheduler visits (int64 [T]), without changing the scheduler passed in."""
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps)
    return sched.timesteps.clone().long()


@dataclass(frozen=True)
class DDIMCoefficients:
    """What a DDIM step needs from a scheduler, as tensors.

    Build it with :meth:`from_scheduler`; it holds no reference to the scheduler.
    """

    alphas_cumprod: torch.Tensor
    """alpha_bar for every training timestep, float32 [num_train_timesteps]."""
    final_alpha_cumprod: torch.Tensor
    """alpha_bar used when t - step_ratio < 0 (0-dim float32)."""
    step_ratio: int
    """num_train_timesteps // num_inference_steps: t_prev = t - step_ratio."""
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, device=None) -> DDIMCoefficients:
        """Read the coefficients of a diffusers ``DDIMScheduler`` (or one sharing its config)."""
        check_ddim_scheduler(scheduler)
        cfg = scheduler.config
        if getattr(cfg, "thresholding", False):
            raise NotImplementedError(
                "DDIM log-probs with dynamic thresholding are not supported: set thresholding=False "
                "in the scheduler config."
            )
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={cfg.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if num_inference_steps <= 0 or num_inference_steps > cfg.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must be in 1..{cfg.num_train_timesteps}"
            )
        ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32, device=device)
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
        return cls(
            alphas_cumprod=ac,
            final_alpha_cumprod=final,
            step_ratio=cfg.num_train_timesteps // num_inference_steps,
            prediction_type=cfg.prediction_type,
            clip_sample=bool(cfg.clip_sample),
            clip_sample_range=float(getattr(cfg, "clip_sample_range", 1.0)),
        )


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] matching ``like``'s number of dims."""
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def alpha_bars(coeffs: DDIMCoefficients, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar_t, alpha_bar_{t-1}) for a batch of integer timesteps [B]."""
    t = timestep.long()
    prev_t = t - coeffs.step_ratio
    ac = coeffs.alphas_cumprod
    alpha_prod_t = ac[t]
    alpha_prod_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], coeffs.final_alpha_cumprod)
    return alpha_prod_t, alpha_prod_prev


def ddim_std_from_alpha_bars(alpha_prod_t: torch.Tensor, alpha_prod_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1}) (DDIM eq. 16)."""
    variance = (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    return eta * variance.clamp(min=0).sqrt()


def ddim_std(coeffs: DDIMCoefficients, timestep: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t (DDIM eq. 16 times eta) for timesteps [B] -> [B] float32."""
    return ddim_std_from_alpha_bars(*alpha_bars(coeffs, timestep), eta)


def ddim_step_gaussian(
    coeffs: DDIMCoefficients,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian pi(x_{t-1} | x_t, c) of one DDIM step.

    Args:
        coeffs: the scheduler's coefficients (:meth:`DDIMCoefficients.from_scheduler`).
        model_output: the network's prediction for ``sample`` [B, ...] (eps, v or x_0).
        timestep: integer timesteps t [B] (or a 0-dim tensor for the whole batch).
        sample: x_t [B, ...].
        eta: DDIM's stochasticity; must be > 0 for a log-prob to exist.

    Returns:
        ``(mean, std)``: mean [B, ...] in the dtype of ``sample``'s computation (float32 at least)
        and std [B, 1, ..., 1], broadcastable to the sample.
    """
    if timestep.dim() == 0:
        timestep = timestep.expand(sample.shape[0])
    # 1. alpha_bar_t, alpha_bar_{t-1}, as [B, 1, ..., 1] in float32 (the latents may be half)
    alpha_prod_t, alpha_prod_prev = alpha_bars(coeffs, timestep)
    alpha_prod_t = _bcast(alpha_prod_t, sample)
    alpha_prod_prev = _bcast(alpha_prod_prev, sample)
    beta_prod_t = 1 - alpha_prod_t
    x_t = sample.float()
    out = model_output.float()

    # 2. x_0_hat and eps from the prediction (DDIM eq. 12 / the scheduler's prediction_type)
    if coeffs.prediction_type == "epsilon":
        pred_x0 = (x_t - beta_prod_t.sqrt() * out) / alpha_prod_t.sqrt()
        pred_eps = out
    elif coeffs.prediction_type == "sample":
        pred_x0 = out
        pred_eps = (x_t - alpha_prod_t.sqrt() * pred_x0) / beta_prod_t.sqrt()
    else:  # v_prediction
        pred_x0 = alpha_prod_t.sqrt() * x_t - beta_prod_t.sqrt() * out
        pred_eps = alpha_prod_t.sqrt() * out + beta_prod_t.sqrt() * x_t

    # 3. clip x_0_hat as the scheduler does (eps is NOT re-derived, as in DDIMScheduler.step)
    if coeffs.clip_sample:
        pred_x0 = pred_x0.clamp(-coeffs.clip_sample_range, coeffs.clip_sample_range)

    # 4. sigma_t (DDIM eq. 16)
    std = ddim_std_from_alpha_bars(alpha_prod_t, alpha_prod_prev, eta)

    # 5. mean: sqrt(alpha_bar_{t-1}) x_0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps
    direction = (1 - alpha_prod_prev - std**2).clamp(min=0).sqrt() * pred_eps  # >= 0 for eta <= 1 but for round-off
    mean = alpha_prod_prev.sqrt() * pred_x0 + direction
    return mean, std


def reduce_log_prob(elementwise: torch.Tensor, event_dim: int, reduction: str = "mean") -> torch.Tensor:
    """Reduce per-dim log-densities over the trailing ``event_dim`` dims ("mean" or "sum")."""
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"log-prob reduction must be one of {LOG_PROB_REDUCTIONS}, got {reduction!r}")
    if event_dim == 0:
        return elementwise
    dims = tuple(range(-event_dim, 0))
    return elementwise.mean(dims) if reduction == "mean" else elementwise.sum(dims)


def gaussian_log_prob(
    value: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    event_dim: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """log N(value; mean, std^2), reduced over the latent dims.

    ``event_dim`` defaults to all dims but the first (one latent per batch element). Computed in
    float32 whatever the input dtype; no clamping of std: a zero std is an error upstream
    (see :func:`check_log_prob_defined`).
    """
    if event_dim is None:
        event_dim = value.dim() - 1
    value, mean, std = value.float(), mean.float(), std.float()
    elementwise = -((value - mean) ** 2) / (2 * std**2) - std.log() - _HALF_LOG_2PI
    return reduce_log_prob(elementwise, event_dim, reduction)


def gaussian_kl(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    event_dim: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per latent dim, reduced over the latent dims.

    Two DDIM steps from the same state x_t share sigma_t (it depends on t and eta only), so the
    KL between the fine-tuned and the reference policy at a state is, per latent dim::

        KL = (mu_theta - mu_ref)^2 / (2 sigma_t^2)

    (the log-det and trace terms of the Gaussian KL cancel). It is reduced over the trailing
    ``event_dim`` dims exactly as :func:`gaussian_log_prob` reduces the log-density ("mean" by
    default, "sum" for the joint KL), so its scale matches the log-probs' and the gradient with
    respect to ``mean`` is (mu_theta - mu_ref) / sigma_t^2, divided by the number of latent dims
    for "mean". ``event_dim`` defaults to all dims but the first. Computed in float32.
    """
    if event_dim is None:
        event_dim = mean.dim() - 1
    mean, ref_mean, std = mean.float(), ref_mean.float(), std.float()
    elementwise = (mean - ref_mean) ** 2 / (2 * std**2)
    return reduce_log_prob(elementwise, event_dim, reduction)


def ddim_step_log_prob(
    coeffs: DDIMCoefficients,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor,
    eta: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """log pi(prev_sample | sample, c) for one DDIM step: [B]."""
    mean, std = ddim_step_gaussian(coeffs, model_output, timestep, sample, eta)
    return gaussian_log_prob(prev_sample, mean, std, reduction=reduction)


def check_log_prob_defined(coeffs: DDIMCoefficients, timesteps: torch.Tensor, eta: float) -> None:
    """Raise a clear error if any step of the schedule has no log-probability.

    Called once at setup (it syncs with the host), never in the sampling loop.
    """
    if not eta > 0:
        raise ValueError(
            f"eta={eta}: a DDIM step with eta <= 0 is deterministic and has no log-probability; "
            "DDPO needs eta > 0 (the paper uses eta=1.0)."
        )
    if not eta <= 1:
        raise ValueError(
            f"eta={eta}: DDIM's eta is at most 1 (the DDPM posterior's variance); above it a step's noise can "
            "exceed what the schedule leaves for it (sigma_t > sqrt(1 - alpha_bar_{t-1}): diffusers' "
            "DDIMScheduler.step returns NaN there)"
        )
    std = ddim_std(coeffs, timesteps.to(coeffs.alphas_cumprod.device), eta)
    zero = (std <= 0) | ~torch.isfinite(std)
    if bool(zero.any()):
        bad = timesteps[zero.cpu()].tolist()
        raise ValueError(
            f"the DDIM step from timestep(s) {bad} has std 0, so its log-probability is undefined. "
            "This happens on the last step when the scheduler has set_alpha_to_one=True: build the "
            "DDIMScheduler with set_alpha_to_one=False (Stable Diffusion's own setting)."
        )
