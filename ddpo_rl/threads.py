"""CPU threads: the one place ddpo_rl chooses torch's intra-op threads.

torch's intra-op pool (OpenMP) makes a thread that reaches the end of a parallel region wait for
the others, spinning by default. Alone on the machine that is the fast choice; but when another
process takes a core, a descheduled pool thread stalls every small op of a tiny model. Measured on
this project's 2-core machine (default digits run, seconds per epoch, benchmarks/README.md "CPU
threads"): 2 spinning threads 5.7 alone but 20.7 beside ONE busy process (167 at load 7); 1 thread
10.6 alone and 11.9 beside it; and a passive wait (``OMP_WAIT_POLICY=PASSIVE``) loses both ways
(12.5 alone, 14.5 beside it). No fixed choice is fast alone AND graceful, so by default the thread
count follows the load:

1. ``threads = 0`` (the config default, "auto"): a :class:`ThreadGovernor` measures how much CPU the
   *other* processes used on this process's cores since its last look (``/proc/stat`` busy time of
   the cores in the affinity mask, minus this process's own CPU time), and sets
   ``torch.set_num_threads`` to the cores they left free, rounded, between 1 and torch's default
   (one per core, or ``OMP_NUM_THREADS``). The recipes look at setup (the interval since
   ``import ddpo_rl`` covers the model loading), then after each epoch's sampling, after each
   optimizer step and after each epoch, over intervals of at least 0.25 s; metrics.jsonl records
   ``sampling_threads`` and ``training_threads`` (the counts each phase of an epoch started with). The wait policy
   stays OpenMP's (spinning): with one thread there is no pool to wait for.
2. ``threads = N > 0``: exactly N threads, never changed. Also when the environment sets
   ``OMP_NUM_THREADS`` (the user's explicit choice) and ``threads`` is 0.

Reproducibility: the number of threads changes how reductions are split, hence float round-off
(a 2-epoch digits run: identical rewards, losses differing in the 7th digit). A run that must be
bitwise reproducible (across machines, loads, or a resume) sets ``threads`` (or ``OMP_NUM_THREADS``);
the test suite's recipe subprocesses get ``OMP_NUM_THREADS=1`` (tests/helpers.subprocess_env), and
tests/conftest.py applies the same governor between in-process tests.

Off Linux (no ``/proc/stat``) "auto" keeps torch's default.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

PROC_STAT = "/proc/stat"
MIN_INTERVAL_S = 0.25
"""Shortest interval a governor measures over: shorter ones are noise (and a thread change costs)."""


@dataclass(frozen=True)
class CpuSample:
    """One look at the machine: busy seconds of our cores (all processes), our own CPU seconds, wall."""

    busy_s: float
    own_s: float
    wall_s: float


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def read_cpu_sample(cores: list[int] | None = None, path: str = PROC_STAT) -> CpuSample | None:
    """Busy time of ``cores`` from ``/proc/stat`` (user, nice, system, irq, softirq, steal), this
    process's CPU time (all its threads) and the monotonic clock; None where /proc/stat is missing."""
    cores = _cores() if cores is None else cores
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted, busy_ticks = {f"cpu{c}" for c in cores}, 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
            busy_ticks += user + nice + system + irq + softirq + steal
    return CpuSample(busy_ticks / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic())


def threads_for_load(others: float, cores: int, max_threads: int) -> int:
    """Threads for ``cores`` cores of which other processes keep ``others`` busy on average:
    the free cores, rounded half up, between 1 and ``max_threads``."""
    return max(1, min(max_threads, int(cores - others + 0.5)))


class ThreadGovernor:
    """torch's intra-op threads for a config's ``threads`` field (see the module docstring).

    Args:
        threads: 0 = follow the load ("auto"), N > 0 = exactly N.
        read: the sampler of :class:`CpuSample` (tests inject one); None readings disable "auto".
        max_threads: the most threads "auto" uses; default torch's count when the governor is made
            (one per core, or ``OMP_NUM_THREADS``).
        min_interval_s: :meth:`update` changes nothing before this much wall time has passed.
        cores: the cores "auto" shares out; default those of the process's affinity mask.
        respect_env: with ``threads`` 0, an ``OMP_NUM_THREADS`` in the environment fixes the count.
    """

    def __init__(
        self,
        threads: int = 0,
        read: Callable[[], CpuSample | None] = read_cpu_sample,
        max_threads: int | None = None,
        min_interval_s: float = MIN_INTERVAL_S,
        cores: int | None = None,
        respect_env: bool = True,
    ):
        import torch

        if threads < 0:
            raise ValueError(f"threads={threads} must be >= 0 (0 = follow the machine's load)")
        self.cores = len(_cores()) if cores is None else int(cores)
        self.max_threads = int(max_threads or torch.get_num_threads())
        self.fixed = threads > 0 or (respect_env and "OMP_NUM_THREADS" in os.environ)
        self.read, self.min_interval_s = read, float(min_interval_s)
        self.others: float | None = None  # CPU cores the other processes used over the last interval
        if threads > 0:
            torch.set_num_threads(threads)
        self._last = None if self.fixed else (_first_sample() if read is read_cpu_sample else read())
        if self._last is None:
            self.fixed = True

    @property
    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def update(self, force: bool = False) -> int:
        """Measure the other processes' load since the last measurement and set the threads;
        returns the number in effect. A no-op for fixed threads, or before ``min_interval_s``."""
        if self.fixed:
            return self.threads
        now = self.read()
        if now is None:
            return self.threads
        wall = now.wall_s - self._last.wall_s
        if wall <= 0 or (wall < self.min_interval_s and not force):
            return self.threads
        self.others = max(0.0, (now.busy_s - self._last.busy_s) - (now.own_s - self._last.own_s)) / wall
        self._last = now
        want = threads_for_load(self.others, self.cores, self.max_threads)
        if want != self.threads:
            import torch

            torch.set_num_threads(want)
        return want


# the first look, taken when ddpo_rl is imported: the first governor's first update then covers the
# process's set-up (model loading), so a loaded machine is seen before the first epoch
_import_sample = read_cpu_sample()


def _first_sample() -> CpuSample | None:
    """The look taken at import for the first governor of the process, a fresh one for the others."""
    global _import_sample
    sample, _import_sample = _import_sample, None
    return sample or read_cpu_sample()


__all__ = ["CpuSample", "MIN_INTERVAL_S", "ThreadGovernor", "read_cpu_sample", "threads_for_load"]
