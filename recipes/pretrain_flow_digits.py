"""Pretrain the embedded flow-matching digits model on scikit-learn's 8x8 digits and save it.

A few CPU minutes on 2 cores. The result is what ``load_or_train_flow_digits_model()`` and
``build_model("flow-digits")`` load::

    python recipes/pretrain_flow_digits.py                   # -> ~/.cache/ddpo_rl/flow-digits-v1
    python recipes/pretrain_flow_digits.py --out ddpo_rl/assets/flow-digits-v1 --half

It then samples every digit with the Euler ODE sampler, writes a PNG grid (one row per digit,
classifier-free guidance ``--guidance-scale``), and prints, for CFG 1 and for
``--guidance-scale``, the digit classifier's mean probability of the prompted digit
(``digit_alignment``, the RL reward) and how often its top class is the prompted digit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ddpo_rl  # noqa: F401  (before diffusers/transformers: CPU torchvision shim)
import torch

from ddpo_rl.errors import report_user_errors
from ddpo_rl.models.embedded import default_cache_dir
from ddpo_rl.models.flow_digits import (
    MODEL_NAME,
    build_flow_digits_model,
    sample_flow_digits,
    save_flow_digits_model,
    train_flow_digits_model,
)
from pretrain_digits import (  # this script's folder is on sys.path
    _log_line, check_outputs, pretrain_arguments, save_and_report, save_grid,
)


@torch.no_grad()
def prompted_digit_scores(model, per_digit: int, guidance_scale: float, steps: int, seed: int = 0):
    """(mean P(prompted digit), top-1 accuracy, decoded images) of ``per_digit`` samples per digit."""
    from ddpo_rl.rewards.digits import DigitAlignment

    prompts = [p for p in model.prompts for _ in range(per_digit)]
    x = sample_flow_digits(
        model, prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
    )
    images = model.decode(x)
    reward = DigitAlignment()
    prob = reward(images, prompts)
    pred = reward.classifier(images).argmax(-1)
    target = torch.arange(10).repeat_interleave(per_digit)
    return float(prob.mean()), float((pred == target).float().mean()), images


def main(argv=None) -> None:
    p = pretrain_arguments(__doc__, steps=2000)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or default_cache_dir(MODEL_NAME)
    check_outputs(out, args)
    model = build_flow_digits_model(seed=args.seed)
    model, result = train_flow_digits_model(
        model,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        prompt_dropout=args.prompt_dropout,
        ema_decay=args.ema_decay,
        time_sampling=args.time_sampling,
        seed=args.seed,
        progress=True,
        callback=None if sys.stderr.isatty() else _log_line,
        log_every=50,
    )
    save_and_report(save_flow_digits_model, model, out, args, result)
    if args.no_grid:
        return
    if args.half:  # score what was saved
        from ddpo_rl.models.flow_digits import load_flow_digits_model

        model = load_flow_digits_model(out)
    for cfg in dict.fromkeys((1.0, args.guidance_scale)):
        prob, acc, images = prompted_digit_scores(model, args.per_digit, cfg, args.num_inference_steps, args.seed)
        print(
            f"CFG {cfg:g}, {args.num_inference_steps} Euler steps, {args.per_digit} per digit: "
            f"mean P(prompted digit) {prob:.3f}, classifier top-1 = prompted digit {acc:.1%}"
        )
    grid = save_grid(images, args.grid or Path(out) / "samples.png", nrow=args.per_digit)
    print(f"sample grid (row = digit 0..9, CFG {args.guidance_scale}): {grid}")


if __name__ == "__main__":
    with report_user_errors():
        main()
