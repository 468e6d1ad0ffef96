"""How much JPEG compressibility the digits model's own samples leave while the digits stay digits.

Reproduces the two measurements of ``docs/results/digits_search.md`` (second session):

1. fixed pixel transforms (binarise, grey levels, contrast, fading) of the base model's
   evaluation samples: reward gain in the training prompts' base std and ratio of the mean
   probability of the prompted digit, on the training and the held-out prompts;
2. the reward's response to noise of the late DDIM steps' size added to the final latents.

    python docs/results/digits_headroom.py --json docs/results/digits_headroom.json

The samples are those of the default run's epoch-0 evaluation (digits preset, CFG 3, T 10, eta 1,
the evaluation seed), drawn by the recipe itself. Analysis only: nothing here is trained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: recipes/

from ddpo_rl.config import parse_cli  # noqa: E402
from ddpo_rl.keys import KEYS  # noqa: E402
from ddpo_rl.rewards.registry import make_reward  # noqa: E402
from recipes.ddpo_recipe import EVAL_SEED_OFFSET, DDPORecipe  # noqa: E402

TRAIN_BASE_STD_KB = 0.0931  # the bar's unit: the training prompts' base std (README, digits section)

TRANSFORMS = {
    "binarise at 0.3": lambda x: (x > 0.3).float(),
    "binarise at 0.5": lambda x: (x > 0.5).float(),
    "binarise at 0.6": lambda x: (x > 0.6).float(),
    "binarise at 0.7": lambda x: (x > 0.7).float(),
    "binarise at 0.8": lambda x: (x > 0.8).float(),
    "3 grey levels": lambda x: (x * 2).round() / 2,
    "pixels < 0.3 to 0": lambda x: torch.where(x < 0.3, 0.0, x),
    "pixels < 0.3 to 0, > 0.7 to 1": lambda x: torch.where(x < 0.3, 0.0, torch.where(x > 0.7, 1.0, x)),
    "contrast x 5 about 0.6, clamped": lambda x: ((x - 0.6) * 5 + 0.5).clamp(0, 1),
    "contrast x 2 about 0.6, clamped": lambda x: ((x - 0.6) * 2 + 0.5).clamp(0, 1),
    "intensity x 0.8": lambda x: x * 0.8,
    "x^2": lambda x: x**2,
}
LATE_NOISE = (0.007, 0.015, 0.05, 0.1)  # on the [-1, 1] latents; the last two DDIM steps' sigma first


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="samples per prompt set (default 128)")
    parser.add_argument("--noise-draws", type=int, default=4, help="noise draws per sample (default 4)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as out:
        cfg = parse_cli(["--output-dir", out, "--epochs", "1", "--progress", "false"], algorithm="ddpo_is")
        recipe = DDPORecipe(cfg).setup()
        try:
            jpeg = make_reward("jpeg_compressibility", **cfg.reward_kwargs)
            digit = make_reward("digit_alignment")
            results = {"transforms": {}, "late_noise": {}, "base": {}}
            for name, env in recipe.eval_envs.items():
                n_batches = math.ceil(args.samples / cfg.sample_batch_size)
                traj = recipe._fixed_seed_rollout(env, n_batches, cfg.seed + EVAL_SEED_OFFSET)
                latents = traj[KEYS.action][:, -1]
                images = recipe.model.decode(latents)
                prompts = env.base_env.prompts_of(traj[KEYS.prompt_id][:, 0])
                reward, prob = jpeg(images, prompts), digit(images, prompts)
                results["base"][name] = {"reward_kb": reward.mean().item(), "p_digit": prob.mean().item()}
                for label, fn in TRANSFORMS.items():
                    x = fn(images)
                    gain = (jpeg(x, prompts).mean() - reward.mean()).item() / TRAIN_BASE_STD_KB
                    ratio = (digit(x, prompts).mean() / prob.mean()).item()
                    results["transforms"].setdefault(label, {})[name] = {"gain": gain, "ratio": ratio}
                if name != "train":
                    continue
                gen = torch.Generator().manual_seed(0)
                for s in LATE_NOISE:
                    deltas = torch.stack([
                        jpeg(recipe.model.decode(latents + s * torch.randn(latents.shape, generator=gen)), prompts) - reward
                        for _ in range(args.noise_draws)
                    ]) / TRAIN_BASE_STD_KB
                    results["late_noise"][str(s)] = {
                        "changed_fraction": (deltas != 0).float().mean().item(),
                        "mean_abs_change": deltas.abs().mean().item(),
                        "mean_change": deltas.mean().item(),
                    }
        finally:
            recipe.cleanup()

    print("| transform | train: gain, ratio | held-out: gain, ratio |\n|---|---|---|")
    for label, by_set in results["transforms"].items():
        cells = [f"{by_set[k]['gain']:+.2f}, {by_set[k]['ratio']:.3f}" for k in ("train", "eval")]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    print("\n| noise s | changed | mean |change| | mean change |\n|---|---|---|---|")
    for s, v in results["late_noise"].items():
        print(f"| {s} | {v['changed_fraction']:.2f} | {v['mean_abs_change']:.3f} | {v['mean_change']:+.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
