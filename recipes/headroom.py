"""Before fine-tuning: what a regularised objective can reach with the base model, per monitor.

    python recipes/headroom.py --preset digits --samples 2048 [--json OUT.json] [--png OUT.png] [--FIELD VALUE ...]

Draws ``--samples`` fixed-seed samples of the preset's base model on its training and held-out
prompts (the recipe's own sampler and evaluation path: CFG, steps, eta of the config), scores them
with the training reward and every monitor (``monitor_rewards``), and prints, for each monitor
(ddpo_rl.headroom holds the math):

1. the optimum of reward - beta x KL to the base model, for beta in per-prompt reward std (the
   scale of the per-prompt-standardised advantages DDPO trains on): reward gain in the training
   prompts' base std, the monitor's final/base ratio on both prompt sets, and the smallest
   effective sample size (a few units: the estimate rests on a few samples);
2. the best any re-weighting of the base samples can do while the monitor keeps >= r x its base
   value, with a density ratio <= K (KL <= log K): the bound on every KL- or chi^2-regularised
   objective. A target above it needs the model to draw what its base model does not.

Monitors are scores where higher is better and the base mean is positive (the ratios need it).
``--png`` draws each monitor's front (training gain against the smaller monitor ratio of the two
prompt sets). Analysis only: nothing is trained or written except ``--json`` and ``--png``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipes/: siblings by their own names, as a script finds them

import ddpo_rl  # noqa: F401  (first: CPU torchvision patch)
from ddpo_rl.atomic import write_json
from ddpo_rl.cli import HelpFormatter
from ddpo_rl.collector import terminal_rewards
from ddpo_rl.config import parse_cli
from ddpo_rl.errors import report_user_errors
from ddpo_rl.headroom import reweighting_bound, tilt
from ddpo_rl.keys import KEYS
from ddpo_rl.plotting import save_scatter_png
from ddpo_rl.run_dir import prepare_output_file

SEED = 12345  # not the evaluation seed: independent of the runs' evaluations
BETAS = (math.inf, 5.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3)  # in per-prompt reward std
RATIOS = (0.8, 0.85, 0.9, 0.95)  # monitor floors, x its base value
DENSITY_BOUNDS = (10.0, 100.0, 1000.0, None)  # largest density ratio to the base model (None: any)
SETS = {"train": "training prompts", "eval": "held-out prompts"}
MIN_ESS = 30  # tilts whose smallest ESS is below this are drawn as rings (few samples carry them)


def score_base_samples(recipe, samples: int, seed: int = SEED) -> dict[str, dict]:
    """``samples`` fixed-seed base samples per prompt set of a set-up DDPORecipe, scored.

    Returns {"train"|"eval": {"reward": [N], "monitors": {name: [N]}, "prompt_ids": [N]}}; samples
    whose reward or a monitor is not finite are dropped (their count in "dropped")."""
    from rich.console import Console
    from rich.progress import Progress

    out = {}
    n_batches = math.ceil(samples / recipe.cfg.sample_batch_size)
    with Progress(console=Console(stderr=True)) as bar:  # stdout keeps the tables only
        for name, env in recipe.eval_envs.items():
            task = bar.add_task(f"base samples, {SETS.get(name, name)}", total=n_batches)
            traj = recipe._fixed_seed_rollout(env, n_batches, seed, advance=lambda: bar.advance(task))
            out[name] = _scored(recipe, env, traj)
    return out


def _scored(recipe, env, traj) -> dict:
    """The reward and monitors of a rollout's samples, those with a non-finite value dropped."""
    reward = terminal_rewards(traj).float()
    monitors = {k: v.float() for k, v in recipe._monitor_values(env, traj).items()}
    ids = traj[KEYS.prompt_id][:, 0].reshape(-1)
    keep = torch.isfinite(reward)
    for v in monitors.values():
        keep &= torch.isfinite(v)
    return {"reward": reward[keep], "monitors": {k: v[keep] for k, v in monitors.items()},
            "prompt_ids": ids[keep], "dropped": int((~keep).sum())}


def _set_headroom(reward, values, ids, monitor: str, set_name: str, unit: float) -> tuple[list, list]:
    """One prompt set: the tilt's row per beta of BETAS, the bound's gain per (K, r) of
    DENSITY_BOUNDS x RATIOS (None where no re-weighting keeps r), gains in ``unit``."""
    scale = torch.ones(int(ids.max()) + 1, dtype=torch.float64)  # each prompt's reward std: beta's unit
    for g in ids.unique():
        std = reward[ids == g].double().std()
        scale[g] = std if std > 0 else 1.0
    base = tilt(reward, values, ids, math.inf)
    if not base.monitor > 0:
        raise ValueError(f"monitor_rewards: {monitor!r} has base mean {base.monitor:.4g} on the {SETS[set_name]}; "
                         "the ratios need a positive score")
    tilts = []
    for beta in BETAS:
        est = tilt(reward, values, ids, beta, scale)
        tilts.append({"gain": (est.reward - base.reward) / unit, "ratio": est.monitor / base.monitor,
                      "min_ess": est.min_ess})
    bounds = []
    for k, r in itertools.product(DENSITY_BOUNDS, RATIOS):
        best = reweighting_bound(reward, values, ids, r * base.monitor, k)
        bounds.append(None if best is None else (best[0] - base.reward) / unit)
    return tilts, bounds


def headroom(data: dict[str, dict], monitor: str, unit: float) -> dict:
    """The tilt front and the re-weighting bound of one monitor on scored base samples (``data`` as
    :func:`score_base_samples` returns), gains in ``unit`` (the training prompts' base reward std)."""
    per_set = {name: _set_headroom(data[name]["reward"], data[name]["monitors"][monitor], data[name]["prompt_ids"],
                                   monitor, name, unit) for name in SETS}
    return {
        "tilt": [{"beta": None if math.isinf(beta) else beta, **{s: per_set[s][0][i] for s in SETS}}
                 for i, beta in enumerate(BETAS)],
        "bound": [{"density_bound": k, "ratio": r, **{s: per_set[s][1][j] for s in SETS}}
                  for j, (k, r) in enumerate(itertools.product(DENSITY_BOUNDS, RATIOS))],
    }


def markdown(monitor: str, result: dict) -> str:
    """The two tables of one monitor, as markdown."""
    lines = [f"\n### {monitor}\n", "Optimum of reward - beta x KL (beta in per-prompt reward std): training gain "
             "(base std), monitor final/base, min ESS; training / held-out prompts\n",
             "| beta | training prompts | held-out prompts |", "|---|---|---|"]
    for row in result["tilt"]:
        cells = [f"{row[s]['gain']:+.2f}, {row[s]['ratio']:.3f}, {row[s]['min_ess']:.0f}" for s in SETS]
        lines.append(f"| {'inf (base)' if row['beta'] is None else row['beta']} | {cells[0]} | {cells[1]} |")
    lines += ["", "Best re-weighting of the base samples: largest gain (base std) with the monitor >= r x base "
              "and a density ratio <= K; training / held-out (- : no re-weighting keeps it)\n",
              "| K | " + " | ".join(f"r {r}" for r in RATIOS) + " |", "|---" * (len(RATIOS) + 1) + "|"]
    bounds = {(b["density_bound"], b["ratio"]): b for b in result["bound"]}
    for k in DENSITY_BOUNDS:
        cells = [" / ".join("-" if bounds[k, r][s] is None else f"{bounds[k, r][s]:+.2f}" for s in SETS) for r in RATIOS]
        lines.append(f"| {'any' if k is None else f'{k:g}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(monitor: str, result: dict, path: str) -> str:
    """Training gain against the smaller monitor ratio of the two prompt sets: the tilt's points (rings
    where few samples carry them) and the best re-weighting at density ratio <= 100 and any."""
    groups = {"KL optimum (ESS >= 30)": [], "KL optimum (ESS < 30)": [],
              "re-weighting, <= 100x": [], "re-weighting, any": []}
    for row in result["tilt"]:
        trusted = min(row[s]["min_ess"] for s in SETS) >= MIN_ESS
        groups[f"KL optimum (ESS {'>=' if trusted else '<'} 30)"].append(
            (min(row[s]["ratio"] for s in SETS), row["train"]["gain"]))
    for b in result["bound"]:
        if b["density_bound"] in (100.0, None) and all(b[s] is not None for s in SETS):
            label = "re-weighting, any" if b["density_bound"] is None else "re-weighting, <= 100x"
            groups[label].append((b["ratio"], b["train"]))
    return save_scatter_png(
        path, groups, title=f"{monitor}: what reward - beta KL and any re-weighting of the base model reach",
        xlabel=f"smallest {monitor} final/base (training & held-out prompts)",
        ylabel="training reward gain (base std)", colors={"KL optimum (ESS >= 30)": 1, "KL optimum (ESS < 30)": 1,
                                                          "re-weighting, <= 100x": 4, "re-weighting, any": 5},
        hollow=("KL optimum (ESS < 30)",), size=(900, 480),
    )


def measure(cli: list[str], samples: int, seed: int = SEED) -> dict:
    """Set up the recipe of ``cli`` (any ``--FIELD VALUE``), score its base samples, and compute
    every monitor's headroom."""
    from ddpo_recipe import DDPORecipe

    with tempfile.TemporaryDirectory() as out:
        cfg = parse_cli([*cli, "--output-dir", out, "--epochs", "1", "--progress", "false"], algorithm="ddpo_is")
        if not cfg.monitor_rewards:
            raise ValueError("monitor_rewards: empty; name at least one monitor (e.g. --monitor-rewards digit_alignment)")
        recipe = DDPORecipe(cfg).setup()
        try:
            data = score_base_samples(recipe, samples, seed)
        finally:
            recipe.cleanup()
    unit = data["train"]["reward"].double().std(unbiased=False).item()
    return {
        "preset": cfg.preset, "reward": cfg.reward, "samples_per_set": samples, "seed": seed,
        "unit": unit, "dropped": {s: data[s]["dropped"] for s in SETS},
        "monitors": {m: headroom(data, m, unit) for m in cfg.monitor_rewards},
    }


def main(argv=None) -> dict:
    with report_user_errors():
        return _main(argv)


def _main(argv) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="base samples per prompt set")
    parser.add_argument("--sample-seed", type=int, default=SEED, help="seed of the samples")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None,
                        help="draw each monitor's front here (OUT.png; OUT_<monitor>.png with several monitors)")
    args, cli = parser.parse_known_args(argv)
    if args.samples < 2:
        raise ValueError(f"samples: need at least 2 per prompt set, got {args.samples}")
    for field in ("json", "png"):  # checked before the sampling, which takes minutes
        if getattr(args, field):
            prepare_output_file(getattr(args, field), field)
    results = measure(cli, args.samples, args.sample_seed)
    print(f"{results['preset']}: reward {results['reward']}, {args.samples} base samples per prompt set, "
          f"unit (training prompts' base std) {results['unit']:.4g}")
    for monitor, result in results["monitors"].items():
        print(markdown(monitor, result))
    if args.png:
        stem, ext = os.path.splitext(args.png)
        several = len(results["monitors"]) > 1
        for monitor, result in results["monitors"].items():
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in monitor)
            print("wrote", plot(monitor, result, f"{stem}_{safe}{ext or '.png'}" if several else args.png))
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
