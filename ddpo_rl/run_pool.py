"""Run training runs as child processes, a few at a time, under one progress bar.

What the multi-run recipes share (recipes/compare_algorithms.py, recipes/kl_front.py): every run is
its own process (a recipe script and its arguments), started in its own session with its output in
``OUT/log.txt``; ``jobs`` of them run at once with ``threads`` intra-op threads each. The bar counts
the epochs that every planned run has logged (their metrics.jsonl), finished ones included, and names
the runs in progress.

Interruption: Ctrl-C or SIGTERM stops the pool, not the runs' work. Every running run gets one
SIGTERM (a recipe checkpoints at the end of its epoch and stops), the pool waits for them and exits
with status 130; the same command run again resumes them from their checkpoints. (The runs live in
their own sessions so that a terminal's Ctrl-C reaches the pool alone, which forwards it once:
a run is never left running without the pool, nor killed mid-epoch.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

INTERRUPTED_EXIT_CODE = 130


@dataclass
class PoolRun:
    """One run of a pool: the command that runs it and where it writes."""

    name: str
    """Shown in the progress bar and in error messages (e.g. "ddpo_is seed 0", "kl 0.1 seed 2")."""
    command: list[str]
    """The full command line, e.g. ``[sys.executable, "recipes/ddpo_is.py", "--seed", "0", ...]``."""
    out: str
    """The run's output directory: log.txt goes there, and its metrics.jsonl feeds the bar."""
    epochs: int
    """The run's epochs (the bar's share of this run)."""
    extra_env: dict = field(default_factory=dict)
    """Environment variables added to the pool's (e.g. PYTHONPATH)."""


def epochs_logged(out: str) -> int:
    """Epochs a run directory has logged: the complete lines of its metrics.jsonl (0 if none).

    Counted, not parsed: the run may be appending a line while the pool reads."""
    try:
        with open(os.path.join(out, "metrics.jsonl"), "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n") and line.strip())
    except FileNotFoundError:
        return 0


def launch(run: PoolRun, threads: int) -> subprocess.Popen:
    """Start ``run`` in its own session with ``threads`` intra-op threads, appending to OUT/log.txt."""
    os.makedirs(run.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.update(run.extra_env)
    with open(os.path.join(run.out, "log.txt"), "a") as log:
        return subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_pool(
    runs: list[PoolRun],
    *,
    jobs: int,
    threads: int,
    progress: bool = True,
    title: str = "runs",
    planned: list[PoolRun] | None = None,
    poll_seconds: float = 1.0,
) -> list[PoolRun]:
    """Run ``runs``, ``jobs`` at a time; returns those that failed (non-zero exit), each named on stderr.

    ``planned``: every run the bar covers (default ``runs``), e.g. with the finished ones a caller
    reuses, so that the bar starts where the work stands. A Ctrl-C or SIGTERM forwards one SIGTERM
    to each running run, waits for them and raises ``SystemExit(130)`` (see the module docstring).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if jobs < 1:
        raise ValueError(f"jobs={jobs}: at least 1")
    if not runs:  # nothing to run: no bar
        return []
    planned = list(planned) if planned is not None else list(runs)
    pending, active, failed = list(runs), [], []
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None  # SIGTERM = Ctrl-C
    try:
        with Progress(TextColumn(f"[bold blue]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[running]}"),
                      disable=not progress) as bar:
            task = bar.add_task(title, total=sum(r.epochs for r in planned), running="")
            try:
                while pending or active:
                    while pending and len(active) < jobs:
                        run = pending.pop(0)
                        active.append((run, launch(run, threads)))
                    for run, proc in list(active):
                        if proc.poll() is not None:
                            active.remove((run, proc))
                            if proc.returncode != 0:
                                failed.append(run)
                                print(f"error: {run.name} failed (exit {proc.returncode}); see "
                                      f"{os.path.join(run.out, 'log.txt')}", file=sys.stderr, flush=True)
                    bar.update(task, completed=sum(epochs_logged(r.out) for r in planned),
                               running=", ".join(r.name for r, _ in active))
                    if pending or active:
                        time.sleep(poll_seconds)
            except KeyboardInterrupt:  # SIGINT or SIGTERM: each running run checkpoints at its epoch's end
                print("interrupted: the running runs checkpoint and stop; run the same command again to continue",
                      file=sys.stderr, flush=True)
                for _, proc in active:
                    proc.send_signal(signal.SIGTERM)
                for _, proc in active:
                    proc.wait()
                raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return failed


__all__ = ["INTERRUPTED_EXIT_CODE", "PoolRun", "epochs_logged", "launch", "run_pool"]
