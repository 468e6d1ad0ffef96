"""End-of-run reports: the reward curve PNG and summary.json (base vs final, in base-std units)."""

from __future__ import annotations

import json
import os

from ddpo_rl.plotting import save_curve_png


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def write_reward_curve(run_dir: str, title: str = "reward") -> str:
    """reward_curve.png: training-batch reward (mean ± std) per epoch, and the fixed-seed evaluations."""
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    series = {
        "training batch": ([m["epoch"] for m in metrics], [m["reward_mean"] for m in metrics]),
        "eval: training prompts": ([e["epoch"] for e in evals], [e["train_prompts_reward_mean"] for e in evals]),
        "eval: held-out prompts": ([e["epoch"] for e in evals], [e["eval_reward_mean"] for e in evals]),
    }
    bands = {"training batch": [m["reward_std"] for m in metrics]}
    return save_curve_png(os.path.join(run_dir, "reward_curve.png"), series, title=title, bands=bands)


def write_summary(run_dir: str, eval_history, cfg) -> dict:
    """summary.json: the first and last evaluations and the change in units of the base std."""
    summary = {"algorithm": cfg.algorithm, "reward": cfg.reward, "model": cfg.model, "seed": cfg.seed}
    if eval_history:
        base, final = eval_history[0], eval_history[-1]

        def gain(b_mean, b_std, f_mean):
            return (f_mean - b_mean) / b_std if b_std > 0 else None

        summary.update(
            base=base.as_dict(),
            final=final.as_dict(),
            train_prompts_gain_in_base_std=gain(base.train_mean, base.train_std, final.train_mean),
            eval_prompts_gain_in_base_std=gain(base.eval_mean, base.eval_std, final.eval_mean),
        )
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
