"""CPU threads on a shared machine: the DDIM digits run under thread counts and OpenMP wait
policies, alone and beside busy processes this script starts itself.

    python benchmarks/cpu_threads.py --json threads.json [--epochs 4] [--busy 1] [--repeats 1]

Each condition runs ``recipes/ddpo_is.py --preset digits-ddim --epochs N`` in a fresh process (the
wait policy is read when torch loads, so it needs one), with ``--threads T`` (0 = the default:
follow the load, ddpo_rl/threads.py) and ``OMP_WAIT_POLICY`` set explicitly (DEFAULT: not set);
"beside busy" starts ``--busy`` single-threaded spinning processes (``python -c "while True: pass"``)
for the duration of the run and stops them by pid; "busy later" starts them ``--busy-after``
seconds into the run (a load that arrives mid-run).
Conditions are interleaved (every repeat runs every condition once), so a change of the machine's
load hits all of them alike; the load average is recorded around each run. Reported: median
seconds per epoch (metrics.jsonl's ``seconds``, which includes the evaluation of the last epoch),
and the median sampling and training seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONDITIONS = [  # (threads, wait policy, busy: 0 none, 1 from the start, 2 from --busy-after seconds)
    (0, "DEFAULT", 0),
    (2, "ACTIVE", 0),
    (1, "ACTIVE", 0),
    (0, "DEFAULT", 1),
    (2, "ACTIVE", 1),
    (1, "ACTIVE", 1),
    (0, "DEFAULT", 2),
]
BUSY_NAMES = {0: "as-is", 1: "busy", 2: "busy later"}


def run_once(threads: int, policy: str, busy: int, epochs: int, extra: list[str], busy_after: float = 0.0) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    if policy != "DEFAULT":
        env["OMP_WAIT_POLICY"] = policy
    spinners = []

    def start_spinners():
        spinners.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy))

    timer = threading.Timer(busy_after, start_spinners)
    timer.start()
    try:
        with tempfile.TemporaryDirectory() as out:
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            cmd = [sys.executable, os.path.join(ROOT, "recipes", "ddpo_is.py"), "--preset", "digits-ddim",
                   "--epochs", str(epochs), "--output-dir", out, "--progress", "false", "--threads", str(threads), *extra]
            res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            with open(os.path.join(out, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f if line.strip()]
    finally:
        timer.cancel()
        for p in spinners:
            p.kill()
            p.wait()
    return {
        "epoch_seconds": [m["seconds"] for m in metrics],
        "sampling_threads": [m.get("sampling_threads") for m in metrics],
        "training_threads": [m.get("training_threads") for m in metrics],
        "median_epoch_s": statistics.median(m["seconds"] for m in metrics),
        "median_sampling_s": statistics.median(m["sampling_seconds"] for m in metrics),
        "median_training_s": statistics.median(m["training_seconds"] for m in metrics),
        "wall_s": wall,
        "loadavg_1min_start": load0,
        "loadavg_1min_end": os.getloadavg()[0],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4, help="epochs of each run")
    ap.add_argument("--busy", type=int, default=1, help="spinning processes in the 'beside busy' conditions")
    ap.add_argument("--busy-after", type=float, default=20.0, help="seconds into the run the 'busy later' spinners start")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each condition (interleaved)")
    ap.add_argument("--conditions", default=None,
                    help="comma-separated THREADS:POLICY:BUSY (THREADS 0 = auto; POLICY ACTIVE/PASSIVE/DEFAULT; "
                         "BUSY 0 none, 1 from the start, 2 from --busy-after s), e.g. 0:DEFAULT:0,2:ACTIVE:1")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("extra", nargs="*", help="more recipe arguments (after --)")
    args = ap.parse_args(argv)
    if args.json:
        from ddpo_rl.run_dir import prepare_output_file

        prepare_output_file(args.json, "json")  # before the runs: a bad path loses nothing
    conditions = CONDITIONS
    if args.conditions:
        conditions = [(int(t), p.upper(), int(b)) for t, p, b in (c.split(":") for c in args.conditions.split(","))]
    results = {f"threads={t} {p} {BUSY_NAMES[b]}": [] for t, p, b in conditions}
    for r in range(args.repeats):
        for t, p, b in conditions:
            key = f"threads={t} {p} {BUSY_NAMES[b]}"
            res = run_once(t, p, args.busy if b else 0, args.epochs, args.extra, args.busy_after if b == 2 else 0.0)
            results[key].append(res)
            print(f"[{r}] {key}: median {res['median_epoch_s']:.2f} s/epoch (load {res['loadavg_1min_start']:.1f})", flush=True)
    report = {
        "schema": "ddpo_rl.benchmarks.cpu_threads/1",
        "config": {"epochs": args.epochs, "busy": args.busy, "busy_after": args.busy_after, "repeats": args.repeats, "extra": args.extra,
                   "cpu_count": os.cpu_count()},
        "conditions": {
            k: {"median_epoch_s": statistics.median(x["median_epoch_s"] for x in v), "runs": v} for k, v in results.items()
        },
    }
    if args.json:
        from ddpo_rl.atomic import write_json

        write_json(args.json, report)
    return report


if __name__ == "__main__":
    from ddpo_rl.errors import report_user_errors

    with report_user_errors():
        main()
