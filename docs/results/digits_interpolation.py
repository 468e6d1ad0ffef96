"""Interpolating towards the base model against stopping earlier, on the default run's KL front.

Every run of the KL front (recipes/kl_front.py, reference_interpolation 1: its evaluations measure
the trained weights) was evaluated after 12, 24, 36 and 48 epochs: the path training walks. The
same runs' final weights interpolated back towards the base model, base + lambda (trained - base),
were then evaluated for several lambda (recipes/interpolate.py, the runs' own evaluation). This draws
both, per kl_coef, averaged over the seeds: the training-reward gain (training prompts' base std)
against the digit classifier's smaller final/base ratio of the two prompt sets, the issue's two
numbers; and prints the table.

    python recipes/interpolate.py RUNS/kl*/seed* --lambdas 1 0.9 0.85 0.8 0.7 0.6 \
        --json docs/results/digits_interpolation.json --md docs/results/digits_interpolation_runs.md
    python docs/results/digits_interpolation.py docs/results/digits_interpolation.json \
        --png docs/results/digits_interpolation.png

The runs' eval.jsonl are read from the run directories the JSON names (or ``--runs-root``, for
runs moved since).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import ddpo_rl  # noqa: F401  (first: CPU torchvision patch)
from ddpo_rl.comparison import FRONT_MONITOR_RATIO, FRONT_REWARD_GAIN, evaluation_point
from ddpo_rl.jsonl import read_records
from ddpo_rl.plotting import save_scatter_png

MONITOR = "digit_alignment"


def curves(measured: dict, runs_root: str | None = None) -> dict[float, dict]:
    """Per kl_coef: {"path": {epoch: [(gain, ratio) per seed]}, "lambda": {lambda: [(gain, ratio) per seed]}}."""
    out: dict[float, dict] = {}
    for run in measured["runs"]:
        kl = run["kl_coef"]
        c = out.setdefault(kl, {"path": {}, "lambda": {}})
        run_dir = run["run_dir"]
        if runs_root:
            run_dir = os.path.join(runs_root, *run_dir.split(os.sep)[-2:])
        evals = list(read_records(os.path.join(run_dir, "eval.jsonl")))
        for record in evals[1:]:
            p = evaluation_point(evals[0], record)
            c["path"].setdefault(record["epoch"], []).append((p["train_gain"], p["monitor_ratios"][MONITOR]))
        for p in run["points"]:
            c["lambda"].setdefault(p["lambda"], []).append((p["train_gain"], p["monitor_ratios"][MONITOR]))
    return out


def _mean(points):
    return statistics.fmean(g for g, _ in points), statistics.fmean(r for _, r in points), min(r for _, r in points)


def table(c: dict[float, dict]) -> str:
    lines = ["| kl_coef | weights | reward gain, mean over seeds (base std) | classifier final/base, mean (smallest seed) |",
             "|---|---|---|---|"]
    for kl in sorted(c):
        for epoch, pts in sorted(c[kl]["path"].items()):
            g, r, lo = _mean(pts)
            lines.append(f"| {kl:g} | trained, epoch {epoch} | {g:+.2f} | {r:.3f} ({lo:.3f}) |")
        for lam, pts in sorted(c[kl]["lambda"].items(), reverse=True):
            if lam != 1.0:
                g, r, lo = _mean(pts)
                lines.append(f"| {kl:g} | epoch 48, lambda {lam:g} | {g:+.2f} | {r:.3f} ({lo:.3f}) |")
    return "\n".join(lines)


def plot(c: dict[float, dict], path: str) -> str:
    groups, colors, hollow = {}, {}, []
    for i, kl in enumerate(sorted(c)):
        path_name, lam_name = f"kl {kl:g}, epochs", f"kl {kl:g}, lambda"
        groups[path_name] = [_mean(pts)[1::-1] for _, pts in sorted(c[kl]["path"].items())]
        groups[lam_name] = [_mean(pts)[1::-1] for lam, pts in sorted(c[kl]["lambda"].items()) if lam != 1.0]
        colors[path_name] = colors[lam_name] = i
        hollow.append(path_name)
    return save_scatter_png(
        path, groups, title="stopping earlier (rings: epochs 12-48) or interpolating epoch 48 towards the base model (dots: lambda 0.9-0.6), mean of 3 seeds",
        xlabel=f"{MONITOR} final/base, smaller of training & held-out prompts", ylabel="training reward gain (base std)",
        hlines=(FRONT_REWARD_GAIN,), vlines=(FRONT_MONITOR_RATIO,), colors=colors, hollow=hollow, size=(980, 520),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", help="recipes/interpolate.py's --json of the front's runs")
    parser.add_argument("--png", default=None)
    parser.add_argument("--runs-root", default=None, help="where the runs are now: ROOT/kl<C>/seed<S>")
    args = parser.parse_args(argv)
    with open(args.measured) as f:
        c = curves(json.load(f), args.runs_root)
    print(table(c))
    if args.png:
        plot(c, args.png)


if __name__ == "__main__":
    main()
