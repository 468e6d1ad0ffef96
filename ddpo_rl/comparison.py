"""Algorithms compared at equal reward queries: plan the runs, reuse finished ones, aggregate.

The paper's main comparison (Black et al. 2024, Sec. 6.1) trains DDPO-IS, DDPO-SF and RWR from
the same pretrained model with the same number of reward queries and compares the reward they
reach. Here every run of a comparison shares one configuration (a preset plus overrides) except
``algorithm`` and ``seed``, so ``epochs x samples_per_epoch`` reward queries each.

Layout of a comparison directory::

    OUT/<algorithm>/seed<S>/   one ordinary run directory each (config.json, metrics.jsonl, ...)
    OUT/comparison.json        :func:`aggregate`'s table
    OUT/comparison.md          :func:`to_markdown` of it
    OUT/comparison.png         training reward against reward queries, mean over seeds

A run directory is reused when it holds a finished run of the same configuration, resumed from
its checkpoint when it holds an interrupted one, and refused when it holds a different
configuration (nothing is overwritten), so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

from ddpo_rl.checkpoint import CHECKPOINT_NAME
from ddpo_rl.cli import option_groups
from ddpo_rl.config import ConfigError, DDPOConfig, options_used, parse_cli, stored_config, unused_fields
from ddpo_rl.jsonl import read_records
from ddpo_rl.objectives import LOSS_OPTIONS
from ddpo_rl.run_dir import describe_run

# config fields that may differ between a stored run and the planned one without changing it
# ("history" is config.json's record of starts and resumes, not a field)
_RUN_INDEPENDENT_FIELDS = ("progress", "resume", "overwrite", "history", "logger", "logger_kwargs")
# fields the comparison sets per run itself
_PER_RUN_FLAGS = ("--algorithm", "--seed", "--output-dir", "--resume", "--overwrite")


@dataclass
class PlannedRun:
    """One (algorithm, seed) run of a comparison and what to do with its directory."""

    algorithm: str
    seed: int
    cfg: DDPOConfig
    status: str
    """"done" (finished: reuse), "resume" (interrupted: continue from its checkpoint) or "new"."""
    overrides: tuple[str, ...] = ()
    """The comparison's ``--FIELD VALUE`` options that this run reads (another algorithm's loss settings left out)."""

    @property
    def out(self) -> str:
        return self.cfg.output_dir

    def cli_args(self) -> list[str]:
        """Arguments of the recipe script that runs (or resumes) this run."""
        args = [*self.overrides, "--seed", str(self.seed), "--output-dir", self.out, "--progress", "false"]
        if self.status == "resume":
            return args + ["--resume", self.out]
        if describe_run(self.out) is not None:  # started but never checkpointed: start it again
            return args + ["--overwrite", "true"]
        return args


def _differences(stored: dict, planned: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    keys = (set(stored) | set(planned)) - set(_RUN_INDEPENDENT_FIELDS) - set(ignore)
    return sorted(k for k in keys if stored.get(k) != planned.get(k))


def run_status(cfg: DDPOConfig, ignore: tuple[str, ...] = ()) -> str:
    """"done", "resume" or "new" for ``cfg.output_dir``; ConfigError if it holds another configuration
    (fields in ``ignore`` may differ: settings that do not change training, recomputed by the caller)."""
    out = cfg.output_dir
    cfg_path = os.path.join(out, "config.json")
    if not os.path.exists(cfg_path):
        return "new"
    stored, why = stored_config(out)  # a damaged config.json: the checkpoint's record of it
    if stored is None:
        raise ConfigError(f"output_dir: {cfg_path} cannot be read (it is {why}) and no checkpoint records the run's "
                          "config; delete that run directory")
    # a field the run does not read (another loss's setting) does not make it another run
    diff = _differences(stored, json.loads(json.dumps(cfg.to_dict())), (*ignore, *unused_fields(cfg)))
    if diff:
        raise ConfigError(
            f"output_dir: {out} holds a run with another configuration (differs in {', '.join(diff)}); "
            "use another --output-dir or delete that directory"
        )
    summary = read_summary(out)
    if summary is not None and os.path.isdir(os.path.join(out, "final")):
        if summary.get("final", {}).get("epoch") == cfg.epochs:
            return "done"
    if os.path.exists(os.path.join(out, "checkpoints", CHECKPOINT_NAME)):
        return "resume"
    return "new"


def options_left_out(overrides: list[str], run_args: dict) -> dict[str, list]:
    """For each ``--FIELD VALUE`` option of ``overrides`` shared by a multi-run recipe's runs, the runs (keys
    of ``run_args``: each run's own arguments, after :func:`~ddpo_rl.config.options_used`) that do not
    get it because they would not read it; an empty list where every run gets it."""
    has = {run: {name for name, _ in option_groups(DDPOConfig, list(args))} for run, args in run_args.items()}
    return {name: [run for run in run_args if name not in has[run]] for name, _ in option_groups(DDPOConfig, overrides)}


def read_summary(run_dir: str) -> dict | None:
    """``run_dir``'s summary.json, or None when it has none that can be read (a damaged one: the run is then
    not counted as done, and resuming it writes the summary again)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def plan_runs(algorithms: list[str], seeds: list[int], overrides: list[str], output_dir: str) -> list[PlannedRun]:
    """Every (algorithm, seed) run with its config and status. Validates everything before any run starts."""
    for flag in _PER_RUN_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in overrides):
            raise ConfigError(f"{flag[2:].replace('-', '_')}: set per run by the comparison; "
                              "use --algorithms / --seeds / the comparison's --output-dir")
    if len(set(seeds)) != len(seeds) or len(set(algorithms)) != len(algorithms):
        raise ConfigError("seeds/algorithms: each may appear once")
    # each algorithm's runs get the options it reads: a loss setting (--clip-epsilon) goes to its own
    # loss's runs; one that no compared algorithm reads is refused as a single run would refuse it
    own = {algo: options_used(overrides, algorithm=algo) for algo in algorithms}
    for name, without in options_left_out(overrides, own).items():
        if len(without) < len(algorithms):
            continue
        if any(name in options for options in LOSS_OPTIONS.values()):
            raise ConfigError(f"{name}: set, but none of the compared algorithms ({', '.join(algorithms)}) reads it; "
                              f"add its algorithm to --algorithms, or drop --{name.replace('_', '-')}")
        parse_cli(overrides, algorithm=algorithms[0])  # raises, naming the field and why
    runs = []
    for algo in algorithms:
        for seed in seeds:
            out = os.path.join(output_dir, algo, f"seed{seed}")
            cfg = parse_cli([*own[algo], "--seed", str(seed), "--output-dir", out, "--progress", "false"], algorithm=algo)
            runs.append(PlannedRun(algo, seed, cfg, run_status(cfg), tuple(own[algo])))
    # every setting but algorithm and seed, and those some run does not read (another loss's settings)
    unread = {"algorithm", "seed", "output_dir"}.union(*(unused_fields(r.cfg) for r in runs))
    shared = [{k: v for k, v in r.cfg.to_dict().items() if k not in unread} for r in runs]
    if any(s != shared[0] for s in shared):  # e.g. an algorithm-specific preset default
        raise ConfigError("the runs of a comparison must share every setting but algorithm and seed")
    return runs


def _mean_std(xs: list[float | None]) -> dict:
    xs = [x for x in xs if x is not None]  # a gain is None where the base std was 0
    if not xs:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def aggregate(runs: list[PlannedRun]) -> dict:
    """The comparison table from the finished runs' summary.json / metrics.jsonl.

    Per algorithm: the final fixed-seed evaluation on the training and held-out prompts (mean and
    population std over seeds), the gain in units of the base model's reward std, the last
    epoch's clip fraction and the per-seed values.
    """
    cfg = runs[0].cfg
    table = {
        "reward": cfg.reward, "preset": cfg.preset, "epochs": cfg.epochs, "samples_per_epoch": cfg.samples_per_epoch,
        "reward_queries": cfg.epochs * cfg.samples_per_epoch, "seeds": sorted({r.seed for r in runs}),
        "eval_num_samples": cfg.eval_num_samples, "methods": {},
    }
    by_algo: dict[str, list[dict]] = {}
    for r in runs:
        with open(os.path.join(r.out, "summary.json")) as f:
            s = json.load(f)
        metrics = read_records(os.path.join(r.out, "metrics.jsonl"))
        s["last_clip_fraction"] = metrics[-1].get("clip_fraction") if metrics else None
        by_algo.setdefault(r.algorithm, []).append(s)
    # the base model's evaluation, averaged over runs (its sampling noise depends on the seed)
    bases = [s["base"] for summaries in by_algo.values() for s in summaries]
    table["base"] = {
        "train_prompts": {"mean": statistics.fmean(b["train_prompts_reward_mean"] for b in bases),
                          "std": statistics.fmean(b["train_prompts_reward_std"] for b in bases)},
        "eval_prompts": {"mean": statistics.fmean(b["eval_reward_mean"] for b in bases),
                         "std": statistics.fmean(b["eval_reward_std"] for b in bases)},
    }
    for algo, summaries in by_algo.items():
        table["methods"][algo] = {
            "train_prompts": _mean_std([s["final"]["train_prompts_reward_mean"] for s in summaries]),
            "eval_prompts": _mean_std([s["final"]["eval_reward_mean"] for s in summaries]),
            "train_prompts_gain_in_base_std": _mean_std([s["train_prompts_gain_in_base_std"] for s in summaries]),
            "eval_prompts_gain_in_base_std": _mean_std([s["eval_prompts_gain_in_base_std"] for s in summaries]),
            "per_seed": {
                str(s["seed"]): {"train_prompts": s["final"]["train_prompts_reward_mean"],
                                 "eval_prompts": s["final"]["eval_reward_mean"],
                                 "last_clip_fraction": s["last_clip_fraction"]}
                for s in summaries
            },
        }
    return table


def to_markdown(table: dict) -> str:
    """The table as GitHub markdown, with a line saying what was compared."""
    b = table["base"]
    lines = [
        "| method | final reward, training prompts | held-out prompts | gain (base std), training / held-out |",
        "|---|---|---|---|",
        f"| base model | {b['train_prompts']['mean']:.4f} ± {b['train_prompts']['std']:.4f} (over samples) "
        f"| {b['eval_prompts']['mean']:.4f} ± {b['eval_prompts']['std']:.4f} (over samples) | 0 / 0 |",
    ]
    for algo, m in table["methods"].items():
        tr, ev = m["train_prompts"], m["eval_prompts"]
        gt, ge = m["train_prompts_gain_in_base_std"], m["eval_prompts_gain_in_base_std"]
        lines.append(f"| {algo} | {tr['mean']:.4f} ± {tr['std']:.4f} | {ev['mean']:.4f} ± {ev['std']:.4f} "
                     f"| {gt['mean']:+.1f} / {ge['mean']:+.1f} |")
    return "\n".join(lines) + (
        f"\n\n{table['reward']} (preset {table['preset']}), {table['reward_queries']} reward queries per run "
        f"({table['epochs']} epochs x {table['samples_per_epoch']} samples), seeds {table['seeds']}; "
        f"final fixed-seed evaluation on {table['eval_num_samples']} samples per prompt set; "
        "methods: mean ± std over seeds.\n"
    )


def training_curves(runs: list[PlannedRun]) -> dict[str, tuple[list[float], list[float]]]:
    """Per algorithm: training-batch reward mean (averaged over seeds) against reward queries."""
    per_algo: dict[str, list[list[dict]]] = {}
    for r in runs:
        per_algo.setdefault(r.algorithm, []).append(read_records(os.path.join(r.out, "metrics.jsonl")))
    curves = {}
    for algo, logs in per_algo.items():
        n = min(len(m) for m in logs)
        spe = runs[0].cfg.samples_per_epoch
        xs = [logs[0][i]["epoch"] * spe for i in range(n)]
        ys = [statistics.fmean(m[i]["reward_mean"] for m in logs) for i in range(n)]
        curves[algo] = (xs, ys)
    return curves


# --- the reward / monitor trade-off over KL coefficients (recipes/kl_front.py) ----------------------
FRONT_MONITOR_RATIO = 0.85
"""A run keeps the model "still good" when each monitor's final mean is >= this fraction of its base mean
(on the training and on the held-out prompts)."""
FRONT_REWARD_GAIN = 2.0
"""... and "reward up" when its training-prompt reward gained >= this many base std."""


def front_row(summary: dict, metrics: list[dict], evals: list[dict] | None = None, tolerance: float | None = None) -> dict:
    """One run of a KL front: reward gains, each monitor's final/base ratio, alarm, best epoch, seconds.

    With ``evals`` (the run's eval.jsonl) and ``tolerance``, the alarm and best epochs are recomputed
    for that tolerance (they do not change training, so runs made with another tolerance are reused).
    """
    if evals is not None and tolerance is not None:
        from ddpo_rl.monitors import best_evaluation, first_alarm

        summary = dict(summary, monitor_alarm=first_alarm(evals, tolerance), best_epoch=best_evaluation(evals, tolerance)["epoch"])
    row = {
        "kl_coef": summary.get("kl_coef", 0.0), "seed": summary["seed"], "epochs": summary["final"]["epoch"],
        "train_gain": summary["train_prompts_gain_in_base_std"], "eval_gain": summary["eval_prompts_gain_in_base_std"],
        "monitors": {}, "alarm_epoch": (summary.get("monitor_alarm") or {}).get("epoch"),
        "best_epoch": summary.get("best_epoch"), "seconds": sum(m.get("seconds") or 0.0 for m in metrics),
        "final_kl_to_reference": metrics[-1].get("kl_to_reference") if metrics else None,
    }
    for name, sets in summary.get("monitors", {}).items():
        row["monitors"][name] = {
            s: {"base": v["base_mean"], "final": v["final_mean"], "ratio": v["final_over_base"]} for s, v in sets.items()
        }
    ratios = [v["ratio"] for sets in row["monitors"].values() for v in sets.values()]
    row["min_monitor_ratio"] = min(ratios) if ratios and None not in ratios else None
    row["path"] = [evaluation_point(evals[0], e) for e in evals[1:]] if evals else []
    row["passes"] = (
        row["train_gain"] is not None and row["train_gain"] >= FRONT_REWARD_GAIN
        and row["min_monitor_ratio"] is not None and row["min_monitor_ratio"] >= FRONT_MONITOR_RATIO
    )
    return row


def evaluation_point(base: dict, record: dict) -> dict:
    """An evaluation record against the base model's (eval.jsonl records): training-prompt gain (base
    std), each monitor's smaller final/base over the two prompt sets (``monitor_ratios``), the smallest
    of them, and whether it meets the front's two criteria (``passes``)."""
    gain = (record["train_prompts_reward_mean"] - base["train_prompts_reward_mean"]) / base["train_prompts_reward_std"]
    per_monitor = {}
    for n, b in base.get("monitors", {}).items():
        ratios = [record["monitors"][n][f"{s}_mean"] / b[f"{s}_mean"] for s in ("train", "eval")
                  if b.get(f"{s}_mean") and record["monitors"].get(n, {}).get(f"{s}_mean") is not None]
        if ratios:
            per_monitor[n] = min(ratios)
    smallest = min(per_monitor.values()) if per_monitor else None
    return {"epoch": record["epoch"], "train_gain": gain, "monitor_ratios": per_monitor, "min_monitor_ratio": smallest,
            "passes": gain >= FRONT_REWARD_GAIN and smallest is not None and smallest >= FRONT_MONITOR_RATIO}


def front_table(rows: list[dict]) -> dict:
    """Per kl_coef: mean ± std over seeds of the gains and the smallest monitor ratio, and how many seeds pass."""
    by_kl: dict[float, list[dict]] = {}
    for r in rows:
        by_kl.setdefault(r["kl_coef"], []).append(r)
    table = {}
    for kl, rs in sorted(by_kl.items()):
        table[str(kl)] = {
            "train_gain": _mean_std([r["train_gain"] for r in rs]),
            "eval_gain": _mean_std([r["eval_gain"] for r in rs]),
            "min_monitor_ratio": _mean_std([r["min_monitor_ratio"] for r in rs]),
            "seconds": _mean_std([r["seconds"] for r in rs]),
            "passing_seeds": sum(r["passes"] for r in rs), "seeds": sorted(r["seed"] for r in rs),
        }
    return {"criteria": {"train_gain_in_base_std": FRONT_REWARD_GAIN, "monitor_final_over_base": FRONT_MONITOR_RATIO},
            "rows": rows, "by_kl_coef": table}


def front_markdown(front: dict, header: str = "") -> str:
    """Per-run rows and the per-kl_coef summary as markdown."""
    rows = front["rows"]
    names = list(rows[0]["monitors"]) if rows else []
    cols = [f"{n} final/base (train / held-out)" for n in names]
    lines = [header, "" if header else None,
             "| kl_coef | seed | reward gain, train / held-out (base std) | " + " | ".join(cols)
             + " | alarm epoch | best epoch | KL at end | seconds | passes | evaluations (epoch: gain, smallest ratio) |",
             "|---" * (9 + len(cols)) + "|"]
    lines = [ln for ln in lines if ln is not None]
    for r in sorted(rows, key=lambda r: (r["kl_coef"], r["seed"])):
        mons = [f"{m['training prompts']['final']:.3f}/{m['training prompts']['base']:.3f} = "
                f"{m['training prompts']['ratio']:.2f} / {m['held-out prompts']['ratio']:.2f}" for m in r["monitors"].values()]
        kl_end = "-" if r["final_kl_to_reference"] is None else f"{r['final_kl_to_reference']:.3g}"
        lines.append(
            f"| {r['kl_coef']:g} | {r['seed']} | {r['train_gain']:+.2f} / {r['eval_gain']:+.2f} | " + " | ".join(mons)
            + f" | {r['alarm_epoch'] if r['alarm_epoch'] is not None else '-'} | {r['best_epoch']} | {kl_end} "
            f"| {r['seconds']:.0f} | {'yes' if r['passes'] else 'no'} | "
            + "; ".join(f"{p['epoch']}: {p['train_gain']:+.2f}, "
                        + ("-" if p["min_monitor_ratio"] is None else f"{p['min_monitor_ratio']:.2f}") for p in r.get("path", []))
            + " |"
        )
    lines += ["", "| kl_coef | reward gain, train (base std) | held-out | smallest monitor final/base | seeds passing |",
              "|---|---|---|---|---|"]
    for kl, t in front["by_kl_coef"].items():
        g, e, m = t["train_gain"], t["eval_gain"], t["min_monitor_ratio"]
        lines.append(f"| {float(kl):g} | {g['mean']:+.2f} ± {g['std']:.2f} | {e['mean']:+.2f} ± {e['std']:.2f} "
                     f"| {m['mean']:.3f} ± {m['std']:.3f} | {t['passing_seeds']}/{len(t['seeds'])} |")
    c = front["criteria"]
    lines.append(f"\npasses: training-prompt reward >= +{c['train_gain_in_base_std']:g} base std AND every monitor's final "
                 f"mean >= {c['monitor_final_over_base']:g} x its base mean on the training and the held-out prompts; "
                 "mean ± std over seeds.\n")
    return "\n".join(lines)
