"""The paper's main comparison on the testbed: DDPO-IS vs DDPO-SF vs RWR at equal reward queries.

    python recipes/compare_algorithms.py --seeds 0 1 --output-dir outputs/compare [--FIELD VALUE ...]

Every run uses the same preset and the same number of epochs x samples per epoch (so the same
number of reward queries); only the algorithm and the seed change. Writes
``comparison.json`` and ``comparison.md`` (final reward mean ± std over seeds, on the training
prompts and on the held-out prompts, from each run's last fixed-seed evaluation) and a curve
PNG of the held-out reward of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import ddpo_rl  # noqa: F401
from ddpo_rl.config import ALGORITHMS, parse_cli
from ddpo_rl.plotting import save_curve_png
from ddpo_rl.recipe import run
from ddpo_rl.reporting import read_jsonl


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--output-dir", default="outputs/compare")
    args, overrides = parser.parse_known_args(argv)

    results: dict[str, list[dict]] = {}
    curves = {}
    for algo in args.algorithms:
        for seed in args.seeds:
            out = os.path.join(args.output_dir, algo, f"seed{seed}")
            cfg = parse_cli(overrides + ["--seed", str(seed), "--output-dir", out, "--progress", "false"], algorithm=algo)
            print(f"== {algo} seed {seed}: {cfg.epochs} epochs x {cfg.samples_per_epoch} samples -> {out}", flush=True)
            summary = run(cfg)
            results.setdefault(algo, []).append(summary)
            evals = read_jsonl(os.path.join(out, "eval.jsonl"))
            curves[f"{algo} s{seed}"] = ([e["epoch"] for e in evals], [e["eval_reward_mean"] for e in evals])

    table = {"reward": cfg.reward, "epochs": cfg.epochs, "samples_per_epoch": cfg.samples_per_epoch,
             "reward_queries": cfg.epochs * cfg.samples_per_epoch, "seeds": args.seeds, "methods": {}}
    base = next(iter(results.values()))[0]["base"]
    table["base"] = {"train_prompts": base["train_prompts_reward_mean"], "eval_prompts": base["eval_reward_mean"]}
    for algo, runs in results.items():
        tr = _mean_std([r["final"]["train_prompts_reward_mean"] for r in runs])
        ev = _mean_std([r["final"]["eval_reward_mean"] for r in runs])
        table["methods"][algo] = {"train_prompts": tr, "eval_prompts": ev}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "comparison.json"), "w") as f:
        json.dump(table, f, indent=2)
    lines = [
        f"| method | final reward, training prompts | held-out prompts |",
        "|---|---|---|",
        f"| base model | {table['base']['train_prompts']:.4f} | {table['base']['eval_prompts']:.4f} |",
    ]
    for algo, m in table["methods"].items():
        (a, b), (c, d) = m["train_prompts"], m["eval_prompts"]
        lines.append(f"| {algo} | {a:.4f} ± {b:.4f} | {c:.4f} ± {d:.4f} |")
    md = "\n".join(lines) + (
        f"\n\n{cfg.reward}, {table['reward_queries']} reward queries per run "
        f"({cfg.epochs} epochs x {cfg.samples_per_epoch}), seeds {args.seeds}, mean ± std over seeds.\n"
    )
    with open(os.path.join(args.output_dir, "comparison.md"), "w") as f:
        f.write(md)
    save_curve_png(os.path.join(args.output_dir, "comparison.png"), curves, title="held-out reward", ylabel=cfg.reward)
    print(md)
    return table


if __name__ == "__main__":
    main()
