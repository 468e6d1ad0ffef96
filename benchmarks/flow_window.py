"""Fewer trained steps (MixGRPO / Flow-GRPO-Fast): an SDE window vs SDE on every step, on the CPU.

    python benchmarks/flow_window.py --json benchmarks/results/cpu_flow_window.json

Runs recipes/flow_grpo.py's default preset (flow-digits, JPEG compressibility) twice with the same
seed and epoch budget: once with every one of the T steps an SDE step trained on (Flow-GRPO), once
with ``--sde-window-size W`` (SDE and training on W steps, deterministic Euler elsewhere). Reports,
for each: seconds per epoch (median; sampling and training separately), the training-prompt reward
gain after the budget in base standard deviations (the recipe's paired fixed-seed evaluation; each
run evaluates with its own sampler, so the window run's base is the mixed SDE/ODE sampler's and
both bases are reported), and the monitor (digit classifier) over its base value. Runs one after the other in this process: on a shared
machine compare the two only through figures from one invocation.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (_ROOT, os.path.join(_ROOT, "recipes")):
    if p not in sys.path:
        sys.path.insert(0, p)

import ddpo_rl  # noqa: E402,F401  (first: torchvision shim on CPU-only torch)
from ddpo_rl.atomic import write_text  # noqa: E402
from ddpo_rl.errors import report_user_errors  # noqa: E402
from ddpo_rl.jsonl import dumps, read_records  # noqa: E402
from ddpo_rl.run_dir import prepare_output_file  # noqa: E402

SCHEMA = "ddpo_rl.benchmarks.flow_window/1"


def run_variant(name: str, extra: list[str], args, out_root: str) -> dict:
    from ddpo_rl.config import parse_cli
    from ddpo_recipe import run

    out = os.path.join(out_root, name)
    argv = ["--output-dir", out, "--progress", "false", "--seed", str(args.seed), "--epochs", str(args.epochs),
            "--eval-every", str(args.epochs), "--save-every", str(args.epochs), "--threads", str(args.threads), *extra]
    cfg = parse_cli(argv, preset="flow-digits")
    t0 = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - t0
    metrics = read_records(os.path.join(out, "metrics.jsonl"))
    train_epochs = [m for m in metrics if m["eval_reward_mean"] is None] or metrics  # epochs without an evaluation
    med = lambda key: statistics.median(m[key] for m in train_epochs)  # noqa: E731
    mon = summary["monitors"].get("digit_alignment", {})
    return {
        "argv": argv,
        "sde_window_size": cfg.sde_window_size or cfg.num_inference_steps,
        "trained_steps_per_trajectory": cfg.sde_window_size or cfg.num_inference_steps,
        "seconds_per_epoch_median": med("seconds"),
        "sampling_seconds_median": med("sampling_seconds"),
        "training_seconds_median": med("training_seconds"),
        "wall_seconds": wall,
        "base_train_prompts_reward": [summary["base"]["train_prompts_reward_mean"], summary["base"]["train_prompts_reward_std"]],
        "final_train_prompts_reward_mean": summary["final"]["train_prompts_reward_mean"],
        "train_prompts_gain_in_base_std": summary["train_prompts_gain_in_base_std"],
        "eval_prompts_gain_in_base_std": summary["eval_prompts_gain_in_base_std"],
        "monitor_final_over_base": {k: v["final_over_base"] for k, v in mon.items()},
    }


def main(argv=None) -> dict:
    from ddpo_rl.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--epochs", type=int, default=12, help="the fixed budget, the same for both")
    ap.add_argument("--window", type=int, default=4, help="W, the SDE window's steps")
    ap.add_argument("--window-start", type=int, default=0, help="first step of the SDE window (0 = the noisiest)")
    ap.add_argument("--seed", type=int, default=0, help="seed of both runs")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.json:
        prepare_output_file(args.json, "json")  # before measuring: a bad path loses nothing
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "all_steps": run_variant("all", [], args, tmp),
            "window": run_variant(
                "window", ["--sde-window-size", str(args.window), "--sde-window-start", str(args.window_start)], args, tmp
            ),
        }
    a, w = results["all_steps"], results["window"]
    record = {
        "schema": SCHEMA,
        "preset": "flow-digits",
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "platform": platform.platform(),
        "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "results": results,
        "training_seconds_ratio_window_over_all": w["training_seconds_median"] / a["training_seconds_median"],
        "epoch_seconds_ratio_window_over_all": w["seconds_per_epoch_median"] / a["seconds_per_epoch_median"],
    }
    text = dumps(record, indent=2)  # standard JSON: a ratio that is not finite is null
    print(text)
    if args.json:
        write_text(args.json, text + "\n")
    return record


if __name__ == "__main__":
    with report_user_errors():
        main()
