"""How much JPEG compressibility the digits model's own samples leave while the digits stay digits.

Reproduces three measurements of ``docs/results/digits_search.md`` (second and fifth sessions):

1. fixed pixel transforms (binarise, grey levels, contrast, fading, and two that keep the coarse
   structure while changing the detail: 2x2 block means, a 3x3 blur) of the base model's evaluation
   samples: reward gain in the training prompts' base std and ratio of the mean probability of the
   prompted digit, on the training and the held-out prompts;
2. the reward's response to noise of the late DDIM steps' size added to the final latents;
3. the real handwritten digits the model was trained on (scikit-learn's 1797): each prompt set's
   digits, all of them and the most compressible fraction of each digit, scored the same way against
   the base model's samples of that digit (gain) and of that set (ratio);
4. with ``--reference-loss`` (seventh session, about 6 minutes more): the pretrained model's own
   denoising loss (its pretraining objective, epsilon MSE averaged over a fixed grid of timesteps
   and noise draws; lower = more likely under the model, an ELBO up to weights and constants) of
   each transformed image, of a blank image and of the real digits: would a penalty on it, added to
   the reward, prefer crisp strokes to faded or blank ones?
5. with ``--prompt-margin`` (seventh session, about 5 minutes more): the pretrained model as a
   classifier of its ten digit prompts (the same noise under every prompt): per image the margin
   between its denoising loss under the other digit prompts and under the prompted one, on the
   first 64 training-prompt samples and their transforms.

    python docs/results/digits_headroom.py --json docs/results/digits_headroom.json [--reference-loss] [--prompt-margin]

The samples are those of the DDIM run's epoch-0 evaluation (digits-ddim preset, CFG 3, T 10, eta 1,
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: recipes/

from ddpo_rl.atomic import write_text  # noqa: E402
from ddpo_rl.config import parse_cli  # noqa: E402
from ddpo_rl.errors import report_user_errors  # noqa: E402
from ddpo_rl.keys import KEYS  # noqa: E402
from ddpo_rl.models.digits_data import load_digits_dataset  # noqa: E402
from ddpo_rl.models.embedded import PROMPT_TEMPLATE  # noqa: E402
from ddpo_rl.rewards.digits import parse_digit  # noqa: E402
from ddpo_rl.rewards.registry import make_reward  # noqa: E402
from ddpo_rl.run_dir import prepare_output_file  # noqa: E402
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
    "2x2 block means (coarse structure kept)": lambda x: F.interpolate(F.avg_pool2d(x, 2), scale_factor=2),
    "blur 3x3": lambda x: F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1),
    "intensity x 0.6": lambda x: x * 0.6,
    "blank": torch.zeros_like,
}
DATA_FRACTIONS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)  # the most compressible fraction of each digit's real images
LATE_NOISE = (0.007, 0.015, 0.05, 0.1)  # on the [-1, 1] latents; the last two DDIM steps' sigma first
LOSS_TIMESTEPS = torch.linspace(10, 990, 25).long()  # the reference-loss grid (of the 1000 training steps)
MARGIN_TIMESTEPS = torch.linspace(10, 990, 10).long()  # the implicit classifier's grid (11 prompts each)
MARGIN_SAMPLES = 64  # training-prompt samples the implicit classifier scores


@torch.no_grad()
def denoising_losses(model, images: torch.Tensor, candidates: list[list[str]], timesteps: torch.Tensor,
                     draws: int) -> torch.Tensor:
    """The pretrained model's denoising loss of each image ([B, 3, H, W] in [0, 1]) under each
    candidate prompt list (``candidates[p][i]`` conditions image i): epsilon MSE at every timestep
    of ``timesteps``, ``draws`` noise draws each, the same noise for every candidate (a fixed
    generator), averaged: [B, P]."""
    x0 = images[:, :1] * 2 - 1  # RGB [0, 1] -> the model's grey [-1, 1]
    contexts = [model.encode_prompts(prompts) for prompts in candidates]
    gen = torch.Generator().manual_seed(1)
    total = torch.zeros(x0.shape[0], len(candidates))
    for t in timesteps:
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=gen)
            x_t = model.scheduler.add_noise(x0, noise, t.expand(x0.shape[0]))
            for p, context in enumerate(contexts):
                eps = model.unet(x_t, t.expand(x0.shape[0]), encoder_hidden_states=context).sample
                total[:, p] += ((eps - noise) ** 2).mean((1, 2, 3))
    return total / (len(timesteps) * draws)


def reference_loss(model, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The denoising loss under each image's own prompt (``LOSS_TIMESTEPS``, 4 draws): [B]."""
    return denoising_losses(model, images, [prompts], LOSS_TIMESTEPS, draws=4)[:, 0]


def prompt_margin(model, images: torch.Tensor, digits: torch.Tensor) -> dict:
    """The pretrained model as a classifier of its ten digit prompts (``MARGIN_TIMESTEPS``, 2
    draws): margin = mean loss under the nine other digit prompts - loss under the prompted one;
    top-1 = the prompted digit has the smallest loss; PMI = loss under the unconditional prompt -
    loss under the prompted one. Means over the images."""
    n = images.shape[0]
    candidates = [[PROMPT_TEMPLATE.format(k)] * n for k in range(10)] + [[""] * n]
    losses = denoising_losses(model, images, candidates, MARGIN_TIMESTEPS, draws=2)
    own = losses[:, :10].gather(1, digits[:, None])[:, 0]
    others = (losses[:, :10].sum(1) - own) / 9
    return {"own_loss": own.mean().item(), "margin": (others - own).mean().item(),
            "top1": (losses[:, :10].argmin(1) == digits).float().mean().item(),
            "pmi": (losses[:, 10] - own).mean().item()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="samples per prompt set (default 128)")
    parser.add_argument("--noise-draws", type=int, default=4, help="noise draws per sample (default 4)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--reference-loss", action="store_true",
                        help="also score every image by the pretrained model's denoising loss (slow)")
    parser.add_argument("--prompt-margin", action="store_true",
                        help="also score the training-prompt images by the pretrained model's implicit "
                             "classifier of its digit prompts (slow)")
    args = parser.parse_args(argv)
    if args.json is not None:  # before the sampling: a bad path loses nothing
        prepare_output_file(str(args.json), "json")

    with tempfile.TemporaryDirectory() as out:
        cfg = parse_cli(["--preset", "digits-ddim", "--output-dir", out, "--epochs", "1", "--progress", "false"],
                        algorithm="ddpo_is")
        recipe = DDPORecipe(cfg).setup()
        try:
            jpeg = make_reward("jpeg_compressibility", **cfg.reward_kwargs)
            digit = make_reward("digit_alignment")
            results = {"transforms": {}, "late_noise": {}, "base": {}, "dataset": {}}
            real, labels = load_digits_dataset()
            real = ((real + 1) / 2).expand(-1, 3, -1, -1)  # [-1, 1] grey -> [0, 1] RGB, like model.decode
            real_prompts = [PROMPT_TEMPLATE.format(int(d)) for d in labels]
            real_reward, real_prob = jpeg(real, real_prompts), digit(real, real_prompts)
            for name, env in recipe.eval_envs.items():
                n_batches = math.ceil(args.samples / cfg.sample_batch_size)
                traj = recipe._fixed_seed_rollout(env, n_batches, cfg.seed + EVAL_SEED_OFFSET)
                latents = traj[KEYS.action][:, -1]
                images = recipe.model.decode(latents)
                prompts = env.base_env.prompts_of(traj[KEYS.prompt_id][:, 0])
                reward, prob = jpeg(images, prompts), digit(images, prompts)
                digits = torch.tensor([parse_digit(p) for p in prompts])
                results["base"][name] = {"reward_kb": reward.mean().item(), "p_digit": prob.mean().item()}
                if args.prompt_margin and name == "train":
                    results["base"][name]["prompt_margin"] = prompt_margin(
                        recipe.model, images[:MARGIN_SAMPLES], digits[:MARGIN_SAMPLES])
                for label, fn in TRANSFORMS.items():
                    x = fn(images)
                    gain = (jpeg(x, prompts).mean() - reward.mean()).item() / TRAIN_BASE_STD_KB
                    ratio = (digit(x, prompts).mean() / prob.mean()).item()
                    results["transforms"].setdefault(label, {})[name] = {"gain": gain, "ratio": ratio}
                    if args.reference_loss:
                        loss = reference_loss(recipe.model, x, prompts)
                        results["transforms"][label][name]["reference_loss"] = loss.mean().item()
                    if args.prompt_margin and name == "train":
                        results["transforms"][label][name]["prompt_margin"] = prompt_margin(
                            recipe.model, x[:MARGIN_SAMPLES], digits[:MARGIN_SAMPLES])
                if args.reference_loss:
                    loss = reference_loss(recipe.model, images, prompts)
                    results["base"][name]["reference_loss"] = loss.mean().item()
                    if name == "train":  # the real digits once (every sixth of the 1797, all ten digits)
                        every = slice(None, None, 6)
                        loss = reference_loss(recipe.model, real[every], real_prompts[every])
                        results["real_digits_reference_loss"] = loss.mean().item()
                for fraction in DATA_FRACTIONS:
                    gains, probs = [], []
                    for d in digits.unique():
                        r, p = real_reward[labels == d], real_prob[labels == d]
                        top = r.argsort(descending=True)[: max(1, round(fraction * len(r)))]
                        gains.append((r[top].mean() - reward[digits == d].mean()).item() / TRAIN_BASE_STD_KB)
                        probs.append(p[top].mean().item())
                    results["dataset"].setdefault(str(fraction), {})[name] = {
                        "gain": sum(gains) / len(gains), "ratio": sum(probs) / len(probs) / prob.mean().item()}
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
    if args.reference_loss:
        print("\n| image | reference loss, train | held-out |\n|---|---|---|")
        print(f"| base samples | {results['base']['train']['reference_loss']:.4f} | "
              f"{results['base']['eval']['reference_loss']:.4f} |")
        for label, by_set in results["transforms"].items():
            print(f"| {label} | {by_set['train']['reference_loss']:.4f} | {by_set['eval']['reference_loss']:.4f} |")
        print(f"| real digits (every sixth) | {results['real_digits_reference_loss']:.4f} | |")
    if args.prompt_margin:
        print(f"\n| image ({MARGIN_SAMPLES} training-prompt samples) | loss, own prompt | margin | top-1 | PMI |")
        print("|---|---|---|---|---|")
        rows = [("base samples", results["base"]["train"])] + [
            (label, by_set["train"]) for label, by_set in results["transforms"].items()]
        for label, row in rows:
            m = row["prompt_margin"]
            print(f"| {label} | {m['own_loss']:.4f} | {m['margin']:.4f} | {m['top1']:.2f} | {m['pmi']:.4f} |")
    print("\n| real digits (most compressible fraction of each digit) | train: gain, ratio | held-out: gain, ratio |")
    print("|---|---|---|")
    for fraction, by_set in results["dataset"].items():
        cells = [f"{by_set[k]['gain']:+.2f}, {by_set[k]['ratio']:.3f}" for k in ("train", "eval")]
        print(f"| {'all' if float(fraction) == 1 else f'top {float(fraction):.0%}'} | {cells[0]} | {cells[1]} |")
    print("\n| noise s | changed | mean |change| | mean change |\n|---|---|---|---|")
    for s, v in results["late_noise"].items():
        print(f"| {s} | {v['changed_fraction']:.2f} | {v['mean_abs_change']:.3f} | {v['mean_change']:+.3f} |")
    if args.json is not None:
        write_text(args.json, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    with report_user_errors():
        main()
