"""ddpo_rl/threads.py: the OpenMP wait policy is set before torch loads, a config's threads apply."""

import subprocess
import sys

import pytest
import torch

from ddpo_rl.threads import set_threads
from tests.helpers import ROOT, subprocess_env

PROBE = "import ddpo_rl, os, torch; print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())"


def _probe(**env) -> list[str]:
    base = {k: v for k, v in subprocess_env().items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_import_sets_a_passive_wait_policy_unless_the_user_set_one():
    assert _probe()[0] == "PASSIVE"
    assert _probe(OMP_WAIT_POLICY="ACTIVE")[0] == "ACTIVE"


def test_the_wait_policy_is_set_before_torch_is_imported():
    """OpenMP reads the variable when torch loads: it must already be set at ddpo_rl's first torch import."""
    code = (
        "import os, sys\n"
        "seen = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not seen:\n"
        "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import ddpo_rl\n"
        "print(seen[0])\n"
    )
    base = {k: v for k, v in subprocess_env().items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=base, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "PASSIVE"


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(0) == 1  # 0 keeps what is in effect
        with pytest.raises(ValueError, match="threads"):
            set_threads(-1)
    finally:
        torch.set_num_threads(before)
