"""After a run: its final numbers at other weight interpolations towards the base model.

    python recipes/interpolate.py RUN_DIR [RUN_DIR ...] --lambdas 1 0.9 0.85 0.8 0.7 \
        [--json OUT.json] [--md OUT.md] [--png OUT.png]

A run's training does not depend on ``reference_interpolation`` (lambda): it only sets which weights
the evaluations measure and final/ and best/ hold, theta_ref + lambda (theta - theta_ref)
(ddpo_rl/interpolation.py). So one finished run answers "what would another lambda have given":
for each RUN_DIR this takes the trained weights theta of its last checkpoint (checkpoints/, the
weights the optimizer left, never interpolated), sets the run's own recipe up in a temporary
directory (same model, prompts, reward, monitors, sampler, evaluation seeds), evaluates the base
model, then theta_lambda for every ``--lambdas`` value, and prints per lambda: the training-prompt
reward gain in base std, each monitor's final/base on the training and held-out prompts, and whether
the front's two criteria (gain >= +2, every monitor >= 0.85 x; ddpo_rl.comparison) hold. The run
directories are only read. ``--json``/``--md``/``--png`` (gain against the smallest monitor ratio,
one colour per lambda) are written at the end; every output path is checked before any work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import ddpo_rl  # noqa: F401  (first: CPU torchvision patch)
from ddpo_rl.atomic import write_json, write_text
from ddpo_rl.checkpoint import CheckpointError, find_checkpoint, read_checkpoint
from ddpo_rl.cli import HelpFormatter
from ddpo_rl.comparison import FRONT_MONITOR_RATIO, FRONT_REWARD_GAIN, evaluation_point
from ddpo_rl.config import ConfigError, DDPOConfig, with_added_fields
from ddpo_rl.errors import report_user_errors
from ddpo_rl.interpolation import ReferenceInterpolation
from ddpo_rl.plotting import save_scatter_png
from ddpo_rl.run_dir import prepare_output_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipes/: siblings by their own names


def read_run(run_dir: str) -> dict:
    """What measuring ``run_dir`` needs from its last checkpoint, read once: {"config" (its fields),
    "epoch", "trainable" (the trained weights)}; the optimizer state and the rest are dropped."""
    try:
        find_checkpoint(run_dir)
    except CheckpointError:
        raise ConfigError(f"run_dirs: {run_dir} holds no checkpoint (checkpoints/checkpoint.pt); only a run that "
                          "saved one can be measured") from None
    # a DDPO run's (another recipe's, or a damaged one, is refused naming the file)
    state = read_checkpoint(run_dir, kind="ddpo", required=("epoch", "config", "trainable"), field_name="run_dirs").state
    fields = with_added_fields(state["config"])
    DDPOConfig.from_dict(fields)  # a config this version can run, before any evaluation
    return {"config": fields, "epoch": state["epoch"], "trainable": state["trainable"]}


def measure_run(run_dir: str, run: dict, lambdas: list[float], progress=None) -> dict:
    """The base evaluation and one per lambda of ``run`` (:func:`read_run` of ``run_dir``): {"run_dir",
    "epoch", "kl_coef", "seed", "trained_with" (the run's own lambda), "points": [{lambda, train_gain,
    monitor_ratios, min_monitor_ratio, passes, record}]}. ``progress()`` is called after each evaluation."""
    from ddpo_recipe import DDPORecipe

    with tempfile.TemporaryDirectory() as out:
        cfg = DDPOConfig.from_dict(dict(run["config"], output_dir=out, resume=None, overwrite=True, progress=False))
        recipe = DDPORecipe(cfg).setup()
        try:
            net = recipe.policy.noise_model
            interp = ReferenceInterpolation(net, min([lam for lam in lambdas if lam < 1] or [1.0]))  # base values
            base = recipe._evaluation_rollouts(0)[0].as_dict()  # the weights as built: the base model
            if progress:
                progress()
            trainable = run["trainable"]
            with torch.no_grad():
                params = dict(recipe.policy.named_parameters())
                missing = sorted(set(trainable) - set(params))
                if missing:
                    raise ConfigError(f"run_dirs: {run_dir}'s checkpoint holds {missing[0]!r}, which its recipe does not build")
                for name, value in trainable.items():
                    params[name].copy_(value)
            points = []
            for lam in lambdas:
                with interp.applied(lam):
                    record = recipe._evaluation_rollouts(run["epoch"])[0].as_dict()
                points.append({"lambda": lam, **evaluation_point(base, record), "record": record})
                if progress:
                    progress()
        finally:
            recipe.cleanup()
    return {"run_dir": os.path.abspath(run_dir), "epoch": run["epoch"], "kl_coef": cfg.kl_coef, "seed": cfg.seed,
            "trained_with": cfg.reference_interpolation, "base": base, "points": points}


def markdown(results: list[dict]) -> str:
    """One row per (run, lambda): gain, each monitor's final/base on both prompt sets, criteria met."""
    monitors = list(results[0]["base"].get("monitors", {})) if results else []
    lines = ["| run (kl_coef, seed, epoch) | lambda | reward gain, training prompts (base std) | "
             + " | ".join(f"{m} final/base (train / held-out)" for m in monitors) + " | both criteria |",
             "|---" * (4 + len(monitors)) + "|"]
    for r in results:
        for p in r["points"]:
            cells = []
            for m in monitors:
                base, rec = r["base"]["monitors"][m], p["record"]["monitors"][m]
                cells.append(" / ".join(f"{rec[f'{s}_mean'] / base[f'{s}_mean']:.3f}" for s in ("train", "eval")))
            lines.append(f"| {r['kl_coef']:g}, {r['seed']}, {r['epoch']} | {p['lambda']:g} | {p['train_gain']:+.2f} | "
                         + " | ".join(cells) + f" | {'yes' if p['passes'] else 'no'} |")
    return "\n".join(lines) + "\n"


def summary_lines(results: list[dict], lambdas: list[float]) -> list[str]:
    """Per lambda, over the runs: the smallest gain, the smallest monitor ratio, how many runs pass."""
    lines = []
    for lam in lambdas:
        pts = [p for r in results for p in r["points"] if p["lambda"] == lam]
        ratios = [p["min_monitor_ratio"] for p in pts if p["min_monitor_ratio"] is not None]
        lines.append(f"lambda {lam:g}: smallest gain {min(p['train_gain'] for p in pts):+.2f}, smallest monitor ratio "
                     + (f"{min(ratios):.3f}" if ratios else "n/a")
                     + f", {sum(p['passes'] for p in pts)} of {len(pts)} runs meet both criteria")
    return lines


def plot(results: list[dict], lambdas: list[float], path: str) -> str:
    groups = {f"lambda {lam:g}": [(p["min_monitor_ratio"], p["train_gain"]) for r in results for p in r["points"]
                                  if p["lambda"] == lam] for lam in lambdas}
    return save_scatter_png(
        path, groups, title="trained weights interpolated towards the base model",
        xlabel="smallest monitor final/base (training & held-out prompts)", ylabel="training reward gain (base std)",
        hlines=(FRONT_REWARD_GAIN,), vlines=(FRONT_MONITOR_RATIO,),
    )


def main(argv=None) -> list[dict]:
    with report_user_errors():
        return _main(argv)


def _main(argv) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories with a checkpoint (finished runs: the final weights)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 0.9, 0.85, 0.8, 0.7],
                        help="interpolation coefficients, each in (0, 1]")
    parser.add_argument("--json", default=None, help="write every evaluation here")
    parser.add_argument("--md", default=None, help="write the table here")
    parser.add_argument("--png", default=None, help="draw gain against the smallest monitor ratio here")
    args = parser.parse_args(argv)
    for lam in args.lambdas:
        if not 0 < lam <= 1:
            raise ConfigError(f"lambdas: each must be in (0, 1] (1 = the trained weights), got {lam:g}")
    for field in ("json", "md", "png"):  # checked before the evaluations, which take minutes
        if getattr(args, field):
            prepare_output_file(getattr(args, field), field)
    runs = [(d, read_run(d)) for d in args.run_dirs]  # every run readable before the first evaluation
    from rich.console import Console
    from rich.progress import Progress

    results = []
    with Progress(console=Console(stderr=True)) as bar:  # stdout keeps the tables only
        task = bar.add_task("evaluations", total=len(args.run_dirs) * (1 + len(args.lambdas)))
        for d, run in runs:
            results.append(measure_run(d, run, args.lambdas, progress=lambda: bar.advance(task)))
    table = markdown(results)
    print(table + "\n".join(summary_lines(results, args.lambdas)))
    if args.json:
        write_json(args.json, {"criteria": {"train_gain_in_base_std": FRONT_REWARD_GAIN,
                                            "monitor_final_over_base": FRONT_MONITOR_RATIO},
                               "lambdas": args.lambdas, "runs": results})
    if args.md:
        write_text(args.md, table)
    if args.png:
        plot(results, args.lambdas, args.png)
    return results


if __name__ == "__main__":
    main()
