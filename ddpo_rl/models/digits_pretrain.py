"""Pretraining of the digits model (ddpo_rl.models.digits) and a reference DDIM sampler to check it."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from ddpo_rl.models.digits_data import load_digits_dataset
from ddpo_rl.policy import classifier_free_guidance

if TYPE_CHECKING:
    from ddpo_rl.models.digits import DigitsModel


PRETRAIN_STEPS = {"epsilon": 1000, "flow": 2000}
"""Pretraining steps of each objective at batch 96 (the flow objective's loss keeps falling past 1000)."""


@dataclass
class TrainResult:
    """What :func:`train_digits_model` returns besides the model."""

    losses: torch.Tensor
    """Per-step training loss (of the raw, non-EMA weights), float [steps]."""
    seconds: float
    """Wall-clock time of the loop."""
    cpu_seconds: float = float("nan")
    """CPU time of the process during the loop (all threads; a fairer figure on a shared machine)."""


def train_digits_model(
    model: DigitsModel | None = None,
    *,
    steps: int | None = None,
    batch_size: int = 96,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 50,
    prompt_dropout: float = 0.1,
    ema_decay: float | None = 0.995,
    train_text_encoder: bool = True,
    time_sampling: str = "logit_normal",
    seed: int = 0,
    progress: bool = True,
    log_every: int = 25,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[DigitsModel, TrainResult]:
    """Pretrain the digits model on sklearn's digits: epsilon prediction (MSE), or for a model with a
    flow-matching scheduler (``objective="flow"``) the rectified-flow velocity
    (:func:`~ddpo_rl.models.flow_digits.flow_matching_loss`).

    Each step encodes the 11 distinct prompts (10 digits and ``""``), draws ``batch_size``
    images with replacement, replaces a sample's prompt by ``""`` with probability
    ``prompt_dropout`` (for classifier-free guidance), and regresses the noise at a uniform
    random timestep (the velocity at a time drawn by ``time_sampling``). AdamW with linear warm-up and cosine decay; with ``ema_decay`` the
    returned weights are an exponential moving average. Afterwards both modules are in eval
    mode and the text encoder is frozen (``requires_grad=False``).

    Args:
        model: the model to train; a fresh :func:`build_digits_model` (seeded) when None.
        steps: optimisation steps; None: the objective's (:data:`PRETRAIN_STEPS`: 1000 for epsilon,
            2000 for flow, at batch 96; what the committed checkpoints were trained with).
        train_text_encoder: learn the text encoder jointly (default); False keeps it at its
            random initialisation and encodes the prompts once.
        time_sampling: the flow objective's training times, ``"logit_normal"`` (SD3's) or
            ``"uniform"``; not read by the epsilon objective.
        progress: show a rich progress bar with the running loss.
        log_every: steps between loss read-outs (the only host syncs of the loop).
        callback: called as ``callback(step, mean_loss)`` at each read-out.

    Returns:
        ``(model, TrainResult)``; the model's UNet is left in eval mode.
    """
    if model is None:
        from ddpo_rl.models.digits import build_digits_model  # the model's module imports this one

        model = build_digits_model(seed=seed)
    if steps is None:
        steps = PRETRAIN_STEPS[model.objective]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = model.device
    gen = torch.Generator(device="cpu").manual_seed(seed)

    images, labels, prompt_ids, uncond_index = pretraining_data(model, device)

    sched = model.scheduler
    num_t = sched.config.num_train_timesteps
    flow = model.objective == "flow"
    if flow:
        from ddpo_rl.models.flow_digits import flow_matching_loss, sample_flow_times

        sample_flow_times(1, time_sampling, torch.Generator())  # validate before training
    else:
        alphas_cumprod = sched.alphas_cumprod.to(device=device, dtype=torch.float32)

    unet = model.unet
    text_encoder = model.text_encoder
    unet.train()
    text_encoder.train(train_text_encoder).requires_grad_(train_text_encoder)
    modules = [unet, text_encoder] if train_text_encoder else [unet]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    fixed_table = None
    if not train_text_encoder:
        with torch.no_grad():
            fixed_table = text_encoder(prompt_ids).last_hidden_state

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(images), (batch_size,), generator=gen).to(device)
        x0, y = images[idx], labels[idx]
        drop = torch.rand(batch_size, generator=gen).to(device) < prompt_dropout
        # the 11 distinct prompts only, then gathered per sample
        table = text_encoder(prompt_ids).last_hidden_state if train_text_encoder else fixed_table
        cond = table[torch.where(drop, torch.full_like(y, uncond_index), y)]
        if flow:
            t = sample_flow_times(batch_size, time_sampling, gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            return flow_matching_loss(unet, x0, noise, t, cond, None, num_t)
        t = torch.randint(num_t, (batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred, noise)

    result = pretrain_loop(
        params, loss_fn, steps=steps, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
        ema_decay=ema_decay, progress=progress, log_every=log_every, callback=callback,
        description=f"pretraining digits model ({model.objective})",
    )
    unet.eval()
    text_encoder.eval().requires_grad_(False)
    model.source = "trained"
    return model, result


def pretraining_data(model, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """What both embedded models pretrain on, on ``device``: scikit-learn's digits ``(images, labels)``,
    the token ids of the 11 distinct prompts (the ten digits, then the unconditional one; [11, L], at
    the tokenizer's ``model_max_length``) and the unconditional prompt's row (10)."""
    images, labels = load_digits_dataset()
    prompts = model.prompts + [model.unconditional_prompt]
    tok = model.tokenizer
    prompt_ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return images.to(device), labels.to(device), prompt_ids.to(device), len(prompts) - 1


def pretrain_loop(
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 50,
    ema_decay: float | None = None,
    progress: bool = True,
    log_every: int = 25,
    callback: Callable[[int, float], None] | None = None,
    description: str = "pretraining",
) -> TrainResult:
    """The optimisation loop of the embedded models' pretraining (digits-v1, flow-digits-v1).

    ``loss_fn(step)`` draws a batch and returns its loss. AdamW with linear warm-up then cosine
    decay to 10% of ``lr``, gradient-norm clipping at 1, and, with ``ema_decay``, an exponential
    moving average of ``params`` copied into them at the end. The only host syncs are the loss
    read-outs every ``log_every`` steps (progress bar and ``callback(step, mean_loss)``).
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ema = None
    if ema_decay is not None:
        ema = [p.detach().clone() for p in params]

    losses = torch.zeros(steps, device=params[0].device)
    bar = _progress_bar(progress)
    start, cpu_start = time.perf_counter(), time.process_time()
    with bar:
        task = bar.add_task(description, total=steps, loss=float("nan"))
        for step in range(steps):
            loss = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_sched.step()
            if ema is not None:
                # warm-up of the EMA (as in common EMA implementations) so short runs are not stale
                decay = min(ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            losses[step] = loss.detach()
            if (step + 1) % log_every == 0 or step + 1 == steps:
                mean_loss = losses[max(0, step + 1 - log_every) : step + 1].mean().item()
                bar.update(task, completed=step + 1, loss=mean_loss)
                if callback is not None:
                    callback(step + 1, mean_loss)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    return TrainResult(
        losses=losses.cpu(), seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start
    )


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def _progress_bar(enabled: bool):
    if not enabled:
        return _NullProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_digits(
    model: DigitsModel,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Plain DDIM sampling with classifier-free guidance (a reference sampler for checks); a model with
    a flow-matching scheduler is integrated with its Euler steps instead (``eta`` must be 0 then).

    Returns samples in [-1, 1] (unclamped), [B, channels, sample_size, sample_size]; pass them
    to :meth:`DigitsModel.decode` for RGB images in [0, 1]. The DDPO policy has its own sampler.
    """
    flow = model.objective == "flow"
    if flow and eta:
        raise ValueError(f"eta: the flow-matching digits model is sampled with its ODE (eta 0), got {eta}")
    device = model.device
    sched = copy.deepcopy(model.scheduler)
    sched.set_timesteps(num_inference_steps, device=device)
    b = len(prompts)
    cond = model.encode_prompts(prompts)
    uncond = model.encode_prompts([model.unconditional_prompt]) if guidance_scale != 1.0 else None

    def unet(x, t, context):
        return model.unet(x, t, encoder_hidden_states=context).sample

    shape = (b, model.channels, model.sample_size, model.sample_size)
    x = torch.randn(shape, generator=generator, device="cpu").to(device)
    for t in sched.timesteps:
        eps = classifier_free_guidance(unet, x, t.expand(b), [cond], [uncond], guidance_scale)
        if flow:  # eps is the velocity here
            x = sched.step(eps, t, x).prev_sample
            continue
        noise = torch.randn(shape, generator=generator, device="cpu").to(device) if eta > 0 else None
        x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    return x


