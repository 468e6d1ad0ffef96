"""The reward / "model still good" trade-off over KL coefficients: runs, table, plot.

    python recipes/kl_front.py --preset digits --kl-coefs 0 0.01 0.1 1 --seeds 0 1 2 --jobs 2 \
        --runs-dir outputs/kl_front --out docs/results [--FIELD VALUE ...]

Every run is the preset (plus the extra ``--FIELD VALUE`` overrides) with one ``kl_coef`` and one
seed, run by recipes/<algorithm>.py in its own process with one thread, ``--jobs`` at a time, in
RUNS_DIR/<preset>/kl<C>/seed<S>/ (log in log.txt; ddpo_rl.run_pool, with a progress bar over the
runs' epochs). A directory holding the finished run of the same configuration is reused, an
interrupted one resumed; Ctrl-C or SIGTERM makes the running runs checkpoint and stop (run the
same command again to continue). A failed or unfinished run stops it before anything is written
(``--no-run`` aggregates what is finished and names the missing runs in the tables). Then it
writes, from the runs' summary.json and metrics.jsonl (ddpo_rl.comparison.front_row / front_table /
front_markdown):

    OUT/kl_front_<preset>.json   every run's reward gains, monitor ratios, alarm and best epochs, seconds
    OUT/kl_front_<preset>.md     the same as tables (per run, and per kl_coef over seeds)
    OUT/kl_front_<preset>.png    reward gain (training prompts, base std) against the smallest monitor
                                 final/base ratio, one colour per kl_coef (and one for each kl_coef's
                                 earlier evaluations, epochs 10, 20, ...), with the two criteria
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ddpo_rl  # noqa: F401  (first: CPU torchvision patch)
from ddpo_rl.atomic import write_json, write_text
from ddpo_rl.cli import HelpFormatter
from ddpo_rl.comparison import (
    FRONT_MONITOR_RATIO, FRONT_REWARD_GAIN, front_markdown, front_row, front_table, options_left_out, read_summary, run_status,
)
from ddpo_rl.config import options_used, parse_cli
from ddpo_rl.errors import report_user_errors
from ddpo_rl.plotting import save_scatter_png
from ddpo_rl.jsonl import read_records
from ddpo_rl.run_dir import check_directory_path, describe_run
from ddpo_rl.run_pool import PoolRun, run_pool

HERE = os.path.dirname(os.path.abspath(__file__))


def _plan(preset: str, kl_coefs, seeds, overrides, runs_dir):
    runs = []
    for kl in kl_coefs:
        for seed in seeds:
            out = os.path.join(runs_dir, preset, f"kl{kl:g}", f"seed{seed}")
            # the options this run reads: a KL weighting (--kl-sigma-scale) goes to the kl_coef > 0 runs
            given = ["--preset", preset, *overrides, "--kl-coef", f"{kl:g}"]
            args = [*options_used(given), "--seed", str(seed), "--output-dir", out, "--progress", "false"]
            cfg = parse_cli(args)
            # the tolerance only changes the alarm and best epochs, recomputed below from eval.jsonl
            runs.append((cfg, args, run_status(cfg, ignore=("monitor_tolerance",))))
    if any(len(without) == len(runs) for without in _left_out(overrides, runs).values()):  # read by no run
        parse_cli(["--preset", preset, *overrides, "--kl-coef", f"{kl_coefs[0]:g}"])  # raises, naming the field
    return runs


def _left_out(overrides, runs) -> dict[str, list[float]]:
    """For each shared option, the kl_coef of every run that does not get it (comparison.options_left_out)."""
    left = options_left_out(overrides, {(cfg.kl_coef, cfg.seed): args for cfg, args, _ in runs})
    return {name: [kl for kl, _ in without] for name, without in left.items()}


def _pool_run(cfg, args, status) -> PoolRun:
    cmd = [sys.executable, os.path.join(HERE, f"{cfg.algorithm}.py"), *args]
    if status == "resume":
        cmd += ["--resume", cfg.output_dir]
    elif describe_run(cfg.output_dir) is not None:  # started but never checkpointed: start it again
        cmd += ["--overwrite", "true"]
    return PoolRun(
        name=f"kl {cfg.kl_coef:g} seed {cfg.seed}",
        command=cmd,
        out=cfg.output_dir,
        epochs=cfg.epochs,
        extra_env={"PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")]))},
    )


def _finished(cfg) -> dict | None:
    """The run's summary.json if it ran to its last epoch (or was stopped by the monitor alarm), else None."""
    summary = read_summary(cfg.output_dir)
    if summary is None:
        return None
    if summary.get("final", {}).get("epoch") == cfg.epochs or summary.get("stopped_on_monitor_drop"):
        return summary
    return None


def _included_rows(paths, setup: dict) -> list[dict]:
    """Rows of earlier fronts (``--include``) of the same setup, one per (kl_coef, seed): the first file wins."""
    rows, have = [], set()
    for path in paths:
        try:
            with open(path) as f:
                earlier = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"include: cannot read {path} as a front's JSON ({e})") from None
        if not isinstance(earlier, dict) or not isinstance(earlier.get("rows"), list):
            raise ValueError(f"include: {path} is JSON but not a front's (no 'rows' list): give a kl_front_<preset>.json")
        if earlier.get("setup") != setup:
            raise ValueError(f"include: {path} is the front of another setup ({earlier.get('setup')}); this one is {setup}")
        for r in earlier["rows"]:
            if (r["kl_coef"], r["seed"]) not in have:
                have.add((r["kl_coef"], r["seed"]))
                rows.append(r)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="digits", help="the preset every run starts from")
    parser.add_argument("--kl-coefs", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0], help="the kl_coef values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds of each kl_coef")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--runs-dir", default="outputs/kl_front", help="where the runs' directories go")
    parser.add_argument("--out", default="docs/results", help="where the front's JSON, markdown and PNG go")
    parser.add_argument("--no-run", action="store_true",
                        help="only aggregate the runs that are finished (the tables then name the missing ones)")
    parser.add_argument("--progress", default="true", choices=["true", "false"], help="a progress bar over the runs' epochs")
    parser.add_argument("--include", nargs="*", default=[], metavar="FRONT_JSON",
                        help="also take the rows of earlier fronts (kl_front_<preset>.json) of the same setup; "
                             "their (kl_coef, seed) pairs are not run again")
    args, overrides = parser.parse_known_args(argv)
    with report_user_errors():
        args.runs_dir, args.out = os.path.expanduser(args.runs_dir), os.path.expanduser(args.out)
        check_directory_path(args.runs_dir, "runs_dir")
        check_directory_path(args.out, "out")
        runs = _plan(args.preset, args.kl_coefs, args.seeds, overrides, args.runs_dir)
        cfg = runs[0][0]
        setup = dict(preset=args.preset, overrides=overrides, algorithm=cfg.algorithm, reward=cfg.reward,
                     monitor_tolerance=cfg.monitor_tolerance,
                     monitors=cfg.monitor_rewards, epochs=cfg.epochs, eval_num_samples=cfg.eval_num_samples,
                     guidance_scale=cfg.guidance_scale)
        included = _included_rows(args.include, setup)
    for name, without in _left_out(overrides, runs).items():  # an option only some runs read (--kl-sigma-scale)
        without = sorted(set(without))
        if without:
            print(f"note: --{name.replace('_', '-')} does not go to the kl_coef {', '.join(f'{k:g}' for k in without)} "
                  "run(s), which do not read it", flush=True)
    done_before = {(r["kl_coef"], r["seed"]) for r in included}  # not run again
    pending = [] if args.no_run else [r for r in runs if r[2] != "done" and (r[0].kl_coef, r[0].seed) not in done_before]
    # one thread per run, --jobs at a time (ddpo_rl.run_pool: a Ctrl-C or SIGTERM makes the running
    # runs checkpoint and stop; the same command resumes them)
    failed = run_pool([_pool_run(*r) for r in pending], jobs=args.jobs, threads=1,
                      progress=args.progress == "true", title=f"kl front {args.preset}",
                      planned=[_pool_run(*r) for r in runs if (r[0].kl_coef, r[0].seed) not in done_before])
    if failed:
        print(f"error: {len(failed)} run(s) failed; no front written. Fix and run the same command again to finish",
              file=sys.stderr)
        raise SystemExit(1)
    rows = []
    for cfg, _, _ in runs:
        summary = _finished(cfg)
        if summary is not None:
            metrics = read_records(os.path.join(cfg.output_dir, "metrics.jsonl"))
            evals = read_records(os.path.join(cfg.output_dir, "eval.jsonl"))
            rows.append(front_row(summary, metrics, evals, cfg.monitor_tolerance))
    have = {(r["kl_coef"], r["seed"]) for r in rows}
    rows += [r for r in included if (r["kl_coef"], r["seed"]) not in have]
    rows.sort(key=lambda r: (r["kl_coef"], r["seed"]))  # tables and legend in kl_coef order, included rows too
    have |= {(r["kl_coef"], r["seed"]) for r in rows}
    missing = [cfg for cfg, _, _ in runs if (cfg.kl_coef, cfg.seed) not in have]
    if missing and not args.no_run:  # e.g. a run stopped by SIGTERM: it checkpointed instead of finishing
        print(f"error: {len(missing)} run(s) did not finish ({missing[0].output_dir}, ...); no front written. "
              "Run the same command again to resume them", file=sys.stderr)
        raise SystemExit(1)
    if not rows:
        print("no finished runs to aggregate", file=sys.stderr)
        return {}
    front = front_table(rows)
    extra = f" with {' '.join(overrides)}" if overrides else ""
    front["setup"] = setup
    if missing:  # --no-run over an unfinished front: the runs the tables lack
        front["missing"] = [dict(kl_coef=c.kl_coef, seed=c.seed) for c in missing]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kl_front_{args.preset}")
    write_json(stem + ".json", front)
    header = (f"KL front of the {args.preset} preset{extra}: {cfg.algorithm} on {cfg.reward}, {cfg.epochs} epochs, "
              f"monitors {', '.join(cfg.monitor_rewards)} at CFG {cfg.guidance_scale:g}, {cfg.eval_num_samples} "
              "fixed-seed samples per prompt set"
              + (f", evaluations of base + {cfg.reference_interpolation:g} x (trained - base)."
                 if cfg.reference_interpolation != 1 else ", evaluations of the trained weights."))
    if missing:
        header += (f" PARTIAL: {len(missing)} of the {len(runs)} planned runs are not finished and not in these "
                   f"tables ({', '.join(f'kl {c.kl_coef:g} seed {c.seed}' for c in missing)}).")
    write_text(stem + ".md", front_markdown(front, header))
    groups, colors, hollow = {}, {}, []
    kls = sorted({r["kl_coef"] for r in rows})
    for r in rows:
        name = f"kl_coef {r['kl_coef']:g}"
        groups.setdefault(name, []).append((r["min_monitor_ratio"], r["train_gain"]))
        colors[name] = kls.index(r["kl_coef"])
    for r in rows:  # the runs' earlier evaluations (rings): how each got there
        name = f"kl_coef {r['kl_coef']:g}, earlier evals"
        groups.setdefault(name, []).extend((p["min_monitor_ratio"], p["train_gain"]) for p in r["path"][:-1])
        colors[name], hollow = kls.index(r["kl_coef"]), hollow + [name]
    save_scatter_png(stem + ".png", groups, title=f"{args.preset}: reward gain vs monitor (each point a seed)",
                     xlabel="smallest monitor final/base (train & held-out)", ylabel="reward gain (base std)",
                     hlines=[FRONT_REWARD_GAIN], vlines=[FRONT_MONITOR_RATIO], colors=colors, hollow=hollow)
    print(front_markdown(front, header))
    return front


if __name__ == "__main__":
    main()
