"""CPU threads: the one place ddpo_rl sets OpenMP's wait policy and torch's intra-op threads.

torch's intra-op pool (OpenMP) makes a thread that reaches the end of a parallel region wait for
the others; by default it waits by spinning. On a machine whose cores are shared with other
processes, a descheduled pool thread then stalls every small op of a tiny model: measured on this
project's 2-core machine (the default digits run, seconds per epoch; benchmarks/README.md,
"CPU threads"), 2 threads went from 4.9 s alone to 15.8 s beside ONE busy process, and to
63-79 s beside a few. Waiting passively (the thread sleeps) costs ~10% alone and removes most of
the collapse. So:

1. :func:`set_default_wait_policy` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already
   sets it. OpenMP reads it once, when the library is loaded, i.e. at ``import torch``: so
   ``ddpo_rl/__init__.py`` calls it before anything imports torch. (Importing torch before
   ddpo_rl keeps OpenMP's default; set the variable yourself then.)
2. :func:`set_threads` applies a config's ``threads`` field (``torch.set_num_threads``; 0 keeps
   torch's default of one thread per core). The recipes call it first thing in setup, before
   any parallel work.

The test suite does the same (tests/conftest.py imports ddpo_rl first; tests/helpers.py gives
recipe subprocesses ``OMP_NUM_THREADS=1`` and the passive wait policy).
"""

from __future__ import annotations

import os

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"


def set_default_wait_policy() -> str:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set; returns the policy in effect.

    Must run before ``import torch`` to have any effect (see the module docstring)."""
    return os.environ.setdefault(WAIT_POLICY_ENV, DEFAULT_WAIT_POLICY)


def set_threads(threads: int) -> int:
    """``torch.set_num_threads(threads)`` when ``threads > 0``; returns the number in effect."""
    import torch

    if threads < 0:
        raise ValueError(f"threads={threads} must be >= 0 (0 = torch's default)")
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


__all__ = ["DEFAULT_WAIT_POLICY", "WAIT_POLICY_ENV", "set_default_wait_policy", "set_threads"]
