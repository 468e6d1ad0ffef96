"""Pretrain the embedded digits model on scikit-learn's 8x8 digits and save it.

A few CPU minutes on 2 cores. The result is what ``load_or_train_digits_model()`` loads::

    python recipes/pretrain_digits.py                        # -> ~/.cache/ddpo_rl/digits-v1
    DDPO_RL_CACHE=/data/cache python recipes/pretrain_digits.py
    python recipes/pretrain_digits.py --out ddpo_rl/assets/digits-v1 --half --grid samples.png
    python recipes/pretrain_digits.py --objective flow       # -> ~/.cache/ddpo_rl/digits-flow-v1
    python recipes/pretrain_digits.py --objective flow --out ddpo_rl/assets/digits-flow-v1 --half

``--objective flow`` trains the same network for the rectified-flow velocity (the digits-flow
model, ``--model digits-flow``; 2000 steps by default). It also writes a PNG grid of samples (one
row per digit; DDIM, or the flow model's Euler ODE; classifier-free guidance) so the result can be
checked by eye.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ddpo_rl  # noqa: F401  (before diffusers/transformers: CPU torchvision shim)
import torch

from ddpo_rl.cli import HelpFormatter
from ddpo_rl.errors import report_user_errors
from ddpo_rl.run_dir import prepare_output_dir, prepare_output_file
from ddpo_rl.models.digits_pretrain import PRETRAIN_STEPS
from ddpo_rl.models.flow_digits import TIME_SAMPLINGS
from ddpo_rl.models.digits import (
    OBJECTIVES,
    DigitsConfig,
    build_digits_model,
    default_cache_dir,
    sample_digits,
    save_digits_model,
    train_digits_model,
)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 4, pad: int = 1) -> Path:
    """Write images [N, 3, H, W] in [0, 1] as one PNG grid (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    H, W = h * scale + pad, w * scale + pad
    canvas = torch.full((c, nrows * H + pad, ncol * W + pad), 0.5)
    up = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    for i in range(n):
        r, col = divmod(i, ncol)
        canvas[:, pad + r * H : pad + r * H + h * scale, pad + col * W : pad + col * W + w * scale] = up[i]
    arr = (canvas.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


_T0 = time.perf_counter()


def _log_line(step: int, loss: float) -> None:
    print(f"step {step:5d}  loss {loss:.4f}  {time.perf_counter() - _T0:6.1f} s", file=sys.stderr, flush=True)


def pretrain_arguments(doc: str, steps: int | None) -> argparse.ArgumentParser:
    """The command line both embedded models' pretraining recipes share (``steps``: the default)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the cache dir)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps" + ("" if steps else " (default: the model's)"))
    p.add_argument("--batch-size", type=int, default=96, help="training images per step")
    p.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default="logit_normal",
                   help="a flow-matching model's training times t (SD3's logit-normal or uniform)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--prompt-dropout", type=float, default=0.1,
                   help="fraction of training images given the empty prompt (what classifier-free guidance needs)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="decay of the weights' exponential moving average (what is saved)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and noise")
    p.add_argument("--save-tokenizer", action="store_true", help="also save the 3.6 MB tokenizer files")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the size)")
    p.add_argument("--grid", type=Path, default=None, help="sample grid PNG (default: <out>/samples.png)")
    p.add_argument("--no-grid", action="store_true", help="write no sample grid")
    p.add_argument("--per-digit", type=int, default=10, help="samples per digit in the grid")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale of the grid's samples")
    p.add_argument("--num-inference-steps", type=int, default=20, help="sampler steps of the grid's samples")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def check_outputs(out: Path, args: argparse.Namespace) -> None:
    """Before training: the model directory and the grid can be written (one line naming the option
    otherwise), so that minutes of training never end unable to save."""
    prepare_output_dir(str(out), "out")
    if args.grid is not None and not args.no_grid:
        prepare_output_file(str(args.grid), "grid")


def save_and_report(save, model, out: Path, args: argparse.Namespace, result) -> None:
    """``save(model, out, save_tokenizer=..., dtype=...)`` as the flags say, then one line: steps,
    seconds, the loss at the start and the end, where it went and its size."""
    save(model, out, save_tokenizer=args.save_tokenizer, dtype=torch.float16 if args.half else None)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(
        f"trained {args.steps} steps in {result.seconds:.1f} s ({result.cpu_seconds:.1f} CPU s); loss first 50 "
        f"{result.losses[:50].mean():.4f}, last 50 {result.losses[-50:].mean():.4f}; "
        f"saved to {out} ({size / 1e6:.2f} MB)"
    )


def main(argv=None) -> None:
    p = pretrain_arguments(__doc__, steps=None)
    p.add_argument("--frozen-text-encoder", action="store_true", help="keep the text encoder at its random init")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="epsilon",
                   help="epsilon: noise prediction, DDIM (digits-v1); flow: rectified-flow velocity (digits-flow-v1)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = PRETRAIN_STEPS[args.objective]

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or default_cache_dir(OBJECTIVES[args.objective])
    check_outputs(out, args)
    model = build_digits_model(DigitsConfig(objective=args.objective), seed=args.seed)
    model, result = train_digits_model(
        model,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        prompt_dropout=args.prompt_dropout,
        ema_decay=args.ema_decay,
        train_text_encoder=not args.frozen_text_encoder,
        time_sampling=args.time_sampling,
        seed=args.seed,
        progress=True,
        # rich only redraws on a terminal; print plain lines into logs
        callback=None if sys.stderr.isatty() else _log_line,
        log_every=50,
    )
    save_and_report(save_digits_model, model, out, args, result)
    if not args.no_grid:
        prompts = [p for p in model.prompts for _ in range(args.per_digit)]
        gen = torch.Generator().manual_seed(args.seed)
        x = sample_digits(
            model,
            prompts,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=gen,
        )
        grid = save_grid(model.decode(x), args.grid or Path(out) / "samples.png", nrow=args.per_digit)
        print(f"sample grid (row = digit 0..9, CFG {args.guidance_scale}): {grid}")


if __name__ == "__main__":
    with report_user_errors():
        main()
