"""The paper's main comparison on the testbed: DDPO-IS vs DDPO-SF vs RWR at equal reward queries.

    python recipes/compare_algorithms.py --seeds 0 1 2 --jobs 2 --output-dir outputs/compare [--FIELD VALUE ...]

(the paper's comparison has no KL term and samples with DDIM: the README's is
``--preset digits-ddim --kl-coef 0``; the default digits preset runs the digits-flow model with kl 0.03)

Every run uses the same preset and overrides, so the same number of reward queries
(epochs x samples per epoch); only the algorithm and the seed change. Each run is its own
process (recipes/<algorithm>.py, log in its directory's log.txt; ddpo_rl.run_pool); ``--jobs`` runs
that many at once, each with cores/jobs threads. Writes comparison.json, comparison.md and comparison.png
(see ddpo_rl.comparison). Run it again after an interruption: finished runs are reused and
interrupted ones resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys

import ddpo_rl  # noqa: F401  (first: CPU torchvision patch)
from ddpo_rl.atomic import write_json, write_text
from ddpo_rl.comparison import aggregate, options_left_out, plan_runs, run_status, to_markdown, training_curves
from ddpo_rl.cli import HelpFormatter
from ddpo_rl.config import ALGORITHMS
from ddpo_rl.errors import report_user_errors
from ddpo_rl.run_dir import check_directory_path
from ddpo_rl.plotting import save_curve_png
from ddpo_rl.run_pool import PoolRun, run_pool

HERE = os.path.dirname(os.path.abspath(__file__))


def _pool_run(run) -> PoolRun:
    root = os.path.dirname(HERE)  # so that module-path rewards (pkg.module:factory) resolve as here
    return PoolRun(
        name=f"{run.algorithm} seed {run.seed}",
        command=[sys.executable, os.path.join(HERE, f"{run.algorithm}.py"), *run.cli_args()],
        out=run.out,
        epochs=run.cfg.epochs,
        extra_env={"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))},
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds of each algorithm")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS,
                        help="the algorithms compared")
    parser.add_argument("--output-dir", default="outputs/compare", help="where the runs and the comparison go")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores/jobs threads)")
    parser.add_argument("--progress", default="true", choices=["true", "false"], help="a progress bar over the runs' epochs")
    args, overrides = parser.parse_known_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    # 1. plan: every run's config and whether its directory is done, interrupted or new
    with report_user_errors():
        args.output_dir = os.path.expanduser(args.output_dir)
        check_directory_path(args.output_dir)
        runs = plan_runs(args.algorithms, args.seeds, overrides, args.output_dir)
    todo = [r for r in runs if r.status != "done"]
    # a loss setting goes to its own loss's runs only
    for name, without in options_left_out(overrides, {r.algorithm: r.overrides for r in runs}).items():
        if without:
            readers = [a for a in args.algorithms if a not in without]
            print(f"note: --{name.replace('_', '-')} goes to the {', '.join(readers)} runs only (the other "
                  "algorithms do not read it)", flush=True)
    for r in runs:
        print(f"{r.algorithm} seed {r.seed}: {r.status} -> {r.out}", flush=True)

    # 2. run what is not done, --jobs at a time, with a progress bar over all epochs (ddpo_rl.run_pool:
    #    a Ctrl-C or SIGTERM makes the running runs checkpoint and stop; the same command resumes them)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    failed = run_pool([_pool_run(r) for r in todo], jobs=args.jobs, threads=threads,
                      progress=args.progress == "true", title="comparison",
                      planned=[_pool_run(r) for r in runs])
    if failed:
        print(f"error: {len(failed)} run(s) failed; fix and run the same command again to finish", file=sys.stderr)
        raise SystemExit(1)
    unfinished = [r for r in runs if run_status(r.cfg) != "done"]
    if unfinished:  # e.g. a run stopped by SIGTERM: it checkpointed instead of finishing
        print(f"error: {len(unfinished)} run(s) did not finish ({unfinished[0].out}, ...); "
              "run the same command again to resume them", file=sys.stderr)
        raise SystemExit(1)

    # 3. aggregate into the table and the curve
    table = aggregate(runs)
    write_json(os.path.join(args.output_dir, "comparison.json"), table)
    md = to_markdown(table)
    write_text(os.path.join(args.output_dir, "comparison.md"), md)
    save_curve_png(os.path.join(args.output_dir, "comparison.png"), training_curves(runs),
                   title=f"training reward, mean over seeds {args.seeds}", xlabel="reward queries", ylabel=table["reward"])
    print(md)
    return table


if __name__ == "__main__":
    main()
