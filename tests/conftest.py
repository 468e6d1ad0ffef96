# First, before anything imports torch: ddpo_rl takes its first look at the machine's load
# (ddpo_rl/threads.py) and patches torchvision on CPU-only torch before transformers/diffusers.
import os

import ddpo_rl  # noqa: F401
import pytest
import torch

from ddpo_rl.threads import ThreadGovernor

# The in-process tests' intra-op threads follow the machine's load like a recipe's (ddpo_rl/threads.py):
# chosen between tests, fixed within one (OMP_NUM_THREADS, which a recipe's "auto" governor respects),
# so that two runs compared inside a test run with the same threads. Recipe subprocesses get one
# thread (tests/helpers.subprocess_env). A user's OMP_NUM_THREADS fixes it for the whole session.
_USER_THREADS = os.environ.get("OMP_NUM_THREADS")
_GOVERNOR = ThreadGovernor(0, respect_env=False) if _USER_THREADS is None else None


@pytest.fixture(autouse=True)
def _seed_and_threads():
    if _GOVERNOR is not None:
        os.environ["OMP_NUM_THREADS"] = str(_GOVERNOR.update())
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)  # whatever the test set
