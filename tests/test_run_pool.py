"""ddpo_rl.run_pool: runs as child processes, ``jobs`` at a time; failures named; Ctrl-C / SIGTERM
forwarded once to the running runs, which finish their epoch, and the pool exits 130.

The runs here are small Python scripts standing in for recipes (no model): they log "epochs" to
metrics.jsonl the way a recipe does, and one of them checkpoints on SIGTERM the way a recipe does.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ddpo_rl.run_pool import INTERRUPTED_EXIT_CODE, PoolRun, epochs_logged, run_pool
from tests.helpers import ROOT, subprocess_env

# logs EPOCHS lines to metrics.jsonl, recording when it started and ended (to check the concurrency)
EPOCH_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    out, epochs, code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    start = time.monotonic()
    for e in range(1, epochs + 1):
        time.sleep(0.05)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": e}) + "\\n")
    with open(os.path.join(out, "span"), "w") as f:
        f.write(f"{start} {time.monotonic()} {os.environ['OMP_NUM_THREADS']}")
    print("ran", out)
    sys.exit(code)
""")

# runs "epochs" until SIGTERM, then finishes the epoch, writes a checkpoint marker and exits 0 (a recipe's way)
STOPPABLE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1]
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    open(os.path.join(out, "started"), "w").close()
    while not stop:
        time.sleep(0.02)
    with open(os.path.join(out, "checkpointed"), "w") as f:
        f.write(str(len(stop)))
""")


def _run(tmp_path, name, epochs=3, code=0) -> PoolRun:
    script = tmp_path / "epochs.py"
    script.write_text(EPOCH_SCRIPT)
    out = tmp_path / name
    return PoolRun(name, [sys.executable, str(script), str(out), str(epochs), str(code)], str(out), epochs)


def test_runs_every_run_at_most_jobs_at_a_time_with_the_threads(tmp_path):
    runs = [_run(tmp_path, f"r{i}") for i in range(4)]
    assert run_pool(runs, jobs=2, threads=3, progress=False, poll_seconds=0.02) == []
    spans = []
    for r in runs:
        assert epochs_logged(r.out) == 3
        assert "ran" in open(os.path.join(r.out, "log.txt")).read()  # the run's output goes to its log.txt
        start, end, threads = open(os.path.join(r.out, "span")).read().split()
        spans.append((float(start), float(end)))
        assert threads == "3"
    # never more than 2 at once: at each run's start, at most one other run is between its start and end
    for s, _ in spans:
        assert sum(1 for a, b in spans if a <= s < b) <= 2


def test_a_failed_run_is_returned_and_named_with_its_log(tmp_path, capsys):
    ok, bad = _run(tmp_path, "ok"), _run(tmp_path, "bad", code=3)
    failed = run_pool([bad, ok], jobs=1, threads=1, progress=False, poll_seconds=0.02)
    assert failed == [bad]
    err = capsys.readouterr().err
    assert "bad failed (exit 3)" in err and os.path.join(bad.out, "log.txt") in err
    assert epochs_logged(ok.out) == 3  # the others still ran


def test_runs_from_a_thread_other_than_the_main_one(tmp_path):
    """Signal handlers can only be set in the main thread: elsewhere the pool leaves them alone."""
    import threading

    result = []
    worker = threading.Thread(target=lambda: result.append(
        run_pool([_run(tmp_path, "r")], jobs=1, threads=1, progress=False, poll_seconds=0.02)))
    worker.start()
    worker.join(60)
    assert result == [[]] and epochs_logged(str(tmp_path / "r")) == 3


def test_nothing_to_run_returns_at_once():
    assert run_pool([], jobs=1, threads=1, progress=False) == []
    with pytest.raises(ValueError, match="jobs"):
        run_pool([], jobs=0, threads=1)


def test_epochs_logged_counts_complete_lines_only(tmp_path):
    assert epochs_logged(str(tmp_path)) == 0
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')  # a line being written
    assert epochs_logged(str(tmp_path)) == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_reaches_each_running_run_once_and_the_pool_exits_130(tmp_path, sig):
    """The pool is stopped while its runs work: each running run gets one SIGTERM, finishes (here:
    writes its checkpoint marker), the pool waits for it and exits 130; the pending run never starts."""
    (tmp_path / "stoppable.py").write_text(STOPPABLE_SCRIPT)
    pool = textwrap.dedent(f"""
        import sys
        from ddpo_rl.run_pool import PoolRun, run_pool
        runs = [PoolRun(n, [sys.executable, {str(tmp_path / "stoppable.py")!r}, {str(tmp_path)!r} + "/" + n],
                        {str(tmp_path)!r} + "/" + n, 1) for n in ("a", "b", "c")]
        run_pool(runs, jobs=2, threads=1, progress=False, poll_seconds=0.02)
    """)
    # SIGINT at its default, as in a terminal: a shell without job control starts background commands
    # (pytest too, e.g. `pytest &` in a script) with SIGINT ignored, which a child inherits, and Python
    # then raises no KeyboardInterrupt (the pool rightly leaves an ignored Ctrl-C ignored)
    proc = subprocess.Popen([sys.executable, "-c", pool], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not all((tmp_path / n / "started").exists() for n in ("a", "b")):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # stop the pool (SIGTERM: it forwards it to its runs) rather than leave them
        proc.terminate()
        proc.communicate(timeout=60)
        raise
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err
    assert "run the same command again" in err
    for n in ("a", "b"):  # each got exactly one SIGTERM and finished before the pool exited
        assert (tmp_path / n / "checkpointed").read_text() == "1"
    assert not (tmp_path / "c" / "started").exists()
