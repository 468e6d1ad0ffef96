"""End-of-run reports: the reward curve PNG, summary.json (base vs final, in base-std units) and the
few lines a run prints when it ends (:func:`format_summary`, read from summary.json).

Both include the monitor rewards (ddpo_rl.monitors): a second panel of the curve shows each
monitor's change from its base value in base-std units, with the tolerance line; the summary gives
each monitor's base and final values, the over-optimisation alarm, and the best evaluation's epoch.
"""

from __future__ import annotations

import math
import os

from ddpo_rl.atomic import write_json
from ddpo_rl.checkpoint import read_weights_info
from ddpo_rl.jsonl import read_records
from ddpo_rl.monitors import PROMPT_SETS, alarm_message, best_evaluation, drop_in_base_std, first_alarm
from ddpo_rl.plotting import save_curve_png, save_curve_panels


def write_reward_curve(run_dir: str, title: str = "reward", tolerance: float | None = None) -> str:
    """reward_curve.png: training-batch reward (mean ± std) per epoch, and the fixed-seed evaluations;
    with monitors, a second panel: each monitor's change from base in base-std units (and -tolerance)."""
    metrics = read_records(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_records(os.path.join(run_dir, "eval.jsonl"))
    series = {
        "training batch": ([m["epoch"] for m in metrics], [m["reward_mean"] for m in metrics]),
        "eval: training prompts": ([e["epoch"] for e in evals], [e["train_prompts_reward_mean"] for e in evals]),
        "eval: held-out prompts": ([e["epoch"] for e in evals], [e["eval_reward_mean"] for e in evals]),
    }
    bands = {"training batch": [m["reward_std"] for m in metrics]}
    path = os.path.join(run_dir, "reward_curve.png")
    names = list(evals[0].get("monitors", {})) if evals else []
    if not names:
        return save_curve_png(path, series, title=title, bands=bands)
    base = evals[0]["monitors"]
    monitor_series = {}
    for name in names:
        for s in PROMPT_SETS:
            values = [(base[name][f"{s}_mean"], base[name][f"{s}_std"], e["monitors"][name][f"{s}_mean"]) for e in evals]
            ys = [None if None in v else -drop_in_base_std(*v) for v in values]
            short = {"train": "train", "eval": "held-out"}[s]  # fits the legend
            monitor_series[f"{name}, {short}"] = ([e["epoch"] for e in evals], ys)
    if tolerance is not None:
        monitor_series["tolerance"] = ([evals[0]["epoch"], evals[-1]["epoch"]], [-tolerance, -tolerance])
    panels = [
        dict(series=series, title=title, bands=bands, ylabel="reward"),
        dict(series=monitor_series, title="monitor rewards (never trained on)", ylabel="change from base, in base std"),
    ]
    return save_curve_panels(path, panels)


def write_summary(
    run_dir: str, eval_history, cfg, stopped_on_monitor_drop: bool = False,
    epochs_trained: int | None = None, interrupted: bool = False,
) -> dict:
    """summary.json: the first and last evaluations ("base", "final": the last evaluation, which
    is the run's end only when the run is not ``interrupted``) and the change in units of the base
    std, for the reward and every monitor; the over-optimisation alarm (or null) and the best
    evaluation's epoch. ``epochs_trained`` of ``cfg.epochs`` and ``interrupted`` (stopped by a
    signal before its last epoch: final/ not written by it, ``--resume`` continues) say how far the
    run got, so that a stopped run's summary never passes for a finished one; ``final_weights_epoch``
    is the epoch of the weights in final/ (from its ddpo_rl.json; None when there are none), which
    differs from ``epochs_trained`` when a finished run was resumed for more epochs and stopped;
    ``best_weights_epoch`` the same for best/ (``best_epoch`` is the evaluation it should hold)."""
    final_info = read_weights_info(os.path.join(run_dir, "final"))
    best_info = read_weights_info(os.path.join(run_dir, "best"))
    summary = {"algorithm": cfg.algorithm, "reward": cfg.reward, "model": cfg.model, "seed": cfg.seed,
               "kl_coef": getattr(cfg, "kl_coef", 0.0),
               "reference_interpolation": getattr(cfg, "reference_interpolation", 1.0),  # what final/, best/ hold
               "epochs": cfg.epochs, "epochs_trained": epochs_trained,
               "interrupted": bool(interrupted),
               "final_weights_epoch": final_info.get("epoch") if final_info else None,
               "best_weights_epoch": best_info.get("epoch") if best_info else None}
    if eval_history:
        base, final = eval_history[0], eval_history[-1]

        def gain(b_mean, b_std, f_mean):
            if b_mean is None or b_std is None or f_mean is None:  # a monitor with nothing to measure
                return None
            return (f_mean - b_mean) / b_std if b_std > 0 else None

        summary.update(
            base=base.as_dict(),
            final=final.as_dict(),
            train_prompts_gain_in_base_std=gain(base.train_mean, base.train_std, final.train_mean),
            eval_prompts_gain_in_base_std=gain(base.eval_mean, base.eval_std, final.eval_mean),
        )
        tolerance = getattr(cfg, "monitor_tolerance", None)
        records = [e.as_dict() for e in eval_history]
        monitors = {}
        for name, b in records[0].get("monitors", {}).items():
            f = records[-1]["monitors"].get(name, {})
            monitors[name] = {
                label: dict(
                    base_mean=b[f"{s}_mean"], base_std=b[f"{s}_std"], final_mean=f.get(f"{s}_mean"),
                    final_std=f.get(f"{s}_std"),
                    change_in_base_std=gain(b[f"{s}_mean"], b[f"{s}_std"], f.get(f"{s}_mean")),
                    final_over_base=f[f"{s}_mean"] / b[f"{s}_mean"] if f.get(f"{s}_mean") is not None and b[f"{s}_mean"] else None,
                    # values that were not finite, left out of the means (only when there were some)
                    **{k: n for k, n in (("base_left_out", b.get(f"{s}_left_out")), ("final_left_out", f.get(f"{s}_left_out"))) if n},
                )
                for s, label in PROMPT_SETS.items()
            }
        if tolerance is not None:
            best = best_evaluation(records, tolerance)
            summary.update(
                monitors=monitors,
                monitor_tolerance=tolerance,
                monitor_alarm=first_alarm(records, tolerance),
                best_epoch=best["epoch"],
                best_train_prompts_gain_in_base_std=gain(base.train_mean, base.train_std, best["train_prompts_reward_mean"]),
                stopped_on_monitor_drop=stopped_on_monitor_drop,
            )
    write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


def format_or_na(value, spec: str = ".4g") -> str:
    """``format(value, spec)``, or "n/a" for no value: None (a mean with no finite value to average, as
    JSON holds it), or a NaN not yet written."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_summary(summary: dict, run_dir: str) -> list[str]:
    """The lines a run prints when it ends, all read from its ``summary`` (:func:`write_summary`):
    how far it got and where its files are, the reward's change on both prompt sets, each monitor's
    final/base and change in base std (marked where it fell beyond the tolerance), the
    over-optimisation alarm, and which epochs final/ and best/ hold (and their interpolation towards
    the base model, when ``reference_interpolation`` < 1)."""
    trained = summary.get("epochs_trained")
    done = f"{summary['epochs'] if trained is None else trained} of {summary['epochs']} epochs"
    if summary.get("interrupted"):
        head = f"stopped after {done} (interrupted)"
    elif summary.get("stopped_on_monitor_drop"):
        head = f"stopped after {done} (stop_on_monitor_drop)"
    else:
        head = f"finished {done}"
    lines = [f"{head}; run directory {run_dir} (summary.json, reward_curve.png, before_after.png, samples/)"]
    if "base" not in summary:  # no evaluation was made
        return lines
    base, final = summary["base"], summary["final"]
    last = "final" if not summary.get("interrupted") else f"epoch {final['epoch']}"
    lines.append(
        f"reward {summary['reward']} (base -> {last}): training prompts {format_or_na(base['train_prompts_reward_mean'])} -> "
        f"{format_or_na(final['train_prompts_reward_mean'])} ({format_or_na(summary['train_prompts_gain_in_base_std'], '+.2f')} base std), "
        f"held-out {format_or_na(base['eval_reward_mean'])} -> {format_or_na(final['eval_reward_mean'])} "
        f"({format_or_na(summary['eval_prompts_gain_in_base_std'], '+.2f')} base std)"
    )
    dropped = [f"{n} {label} samples of the {when} evaluation" for when, record in (("base", base), (last, final))
               for label, key in (("training-prompt", "train_left_out"), ("held-out", "eval_left_out"))
               if (n := record.get(key))]
    if dropped:  # --on-invalid-reward drop
        lines.append("rewards not finite, left out of the means above: " + ", ".join(dropped))
    tolerance = summary.get("monitor_tolerance")
    for name, sets in summary.get("monitors", {}).items():
        parts = []
        for label, m in sets.items():
            change = m["change_in_base_std"]
            beyond = tolerance is not None and change is not None and -change > tolerance
            parts.append(
                f"{label.split()[0]} {format_or_na(m['base_mean'])} -> {format_or_na(m['final_mean'])} "
                f"({format_or_na(m['final_over_base'], '.2f')} x, {format_or_na(change, '+.2f')} base std"
                + (", beyond tolerance" if beyond else "")
                + "".join(f", {m[k]} {when} values not finite, left out" for k, when in
                          (("base_left_out", "base"), ("final_left_out", "final")) if m.get(k))
                + ")"
            )
        lines.append(f"monitor {name}: " + ", ".join(parts))
    if tolerance is not None:
        alarm = summary.get("monitor_alarm")
        if alarm is None:
            lines.append(f"over-optimisation alarm: none (tolerance {tolerance:g} base std)")
        else:
            lines.append(alarm_message(alarm))
    weights = []
    if summary.get("final_weights_epoch") is not None:
        weights.append(f"final/ epoch {summary['final_weights_epoch']}")
    best, held = summary.get("best_epoch"), summary.get("best_weights_epoch")
    if best is not None and held == best:
        weights.append(
            f"best/ epoch {best} ({format_or_na(summary.get('best_train_prompts_gain_in_base_std'), '+.2f')} "
            "base std, the best evaluation with its monitors within tolerance)"
        )
    elif best is not None:
        weights.append(f"best/ {'epoch ' + str(held) if held is not None else 'none'}, not the best evaluation "
                       f"(epoch {best}), whose weights no longer exist")
    if weights:
        lam = summary.get("reference_interpolation", 1.0)
        how = f" (base + {lam:g} x (trained - base), as evaluated: reference_interpolation)" if lam != 1.0 else ""
        lines.append(f"weights{how}: " + "; ".join(weights))
    return lines
