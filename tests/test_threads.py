"""ddpo_rl/threads.py: torch's intra-op threads, fixed or following the machine's load."""

import subprocess
import sys
import time

import pytest
import torch

from ddpo_rl.threads import CpuSample, ThreadGovernor, read_cpu_sample, threads_for_load


@pytest.mark.parametrize(
    "others, cores, max_threads, want",
    [(0.0, 2, 2, 2), (0.3, 2, 2, 2), (0.67, 2, 2, 1), (1.0, 2, 2, 1), (2.5, 2, 2, 1), (3.0, 16, 8, 8), (12.4, 16, 8, 4)],
)
def test_threads_for_load_gives_the_free_cores(others, cores, max_threads, want):
    assert threads_for_load(others, cores, max_threads) == want


class FakeMachine:
    """CpuSample readings of a machine on which the other processes use ``others`` cores."""

    def __init__(self):
        self.busy = self.own = self.wall = 0.0

    def run(self, seconds: float, others: float, own: float) -> None:
        self.wall += seconds
        self.own += own * seconds
        self.busy += (own + others) * seconds

    def __call__(self) -> CpuSample:
        return CpuSample(self.busy, self.own, self.wall)


def test_auto_threads_follow_the_other_processes_load():
    before = torch.get_num_threads()
    machine = FakeMachine()
    gov = ThreadGovernor(0, read=machine, max_threads=2, cores=2, respect_env=False)
    try:
        machine.run(5.0, others=0.05, own=2.0)  # alone: all cores
        assert gov.update() == 2 == torch.get_num_threads()
        machine.run(5.0, others=0.7, own=1.3)  # one busy process takes its share: one thread
        assert gov.update() == 1 == torch.get_num_threads()
        assert gov.others == pytest.approx(0.7)
        machine.run(5.0, others=1.0, own=1.0)  # still there
        assert gov.update() == 1
        machine.run(0.1, others=0.0, own=1.0)  # gone, but too short an interval to tell
        assert gov.update() == 1
        machine.run(5.0, others=0.0, own=1.0)  # gone: all cores again
        assert gov.update() == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_fixed_threads_never_change(monkeypatch):
    before = torch.get_num_threads()
    machine = FakeMachine()
    try:
        gov = ThreadGovernor(1, read=machine, max_threads=2, cores=2)
        assert torch.get_num_threads() == 1
        machine.run(5.0, others=0.0, own=1.0)
        assert gov.update() == 1 and gov.fixed
        # an OMP_NUM_THREADS of the environment is the user's choice: "auto" keeps it
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        gov = ThreadGovernor(0, read=machine, max_threads=2, cores=2)
        machine.run(5.0, others=0.0, own=1.0)
        assert gov.fixed and gov.update() == 1
        # no reading (not Linux): torch's default stays
        assert ThreadGovernor(0, read=lambda: None, respect_env=False).fixed
        with pytest.raises(ValueError, match="threads"):
            ThreadGovernor(-1)
    finally:
        torch.set_num_threads(before)


def test_read_cpu_sample_sums_the_busy_time_of_our_cores(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  30 0 30 900 0 0 0 0 0 0\n"
        "cpu0 10 1 10 400 5 1 1 2 0 0\n"  # busy: user+nice+system+irq+softirq+steal = 25 ticks
        "cpu1 20 0 20 500 0 0 0 0 0 0\n"
        "intr 1 2 3\n"
    )
    import os

    tick = os.sysconf("SC_CLK_TCK")
    assert read_cpu_sample([0], str(stat)).busy_s == pytest.approx(25 / tick)
    assert read_cpu_sample([0, 1], str(stat)).busy_s == pytest.approx(65 / tick)
    assert read_cpu_sample([0], str(tmp_path / "missing")) is None


@pytest.mark.skipif(read_cpu_sample() is None, reason="needs /proc/stat (Linux)")
def test_a_busy_process_is_seen_as_load_of_the_others():
    """On the real machine: a spinning process counts as (about) one core of the others' load."""
    before = torch.get_num_threads()
    gov = ThreadGovernor(0, respect_env=False, min_interval_s=0.0)
    gov.update(force=True)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        gov.update(force=True)  # start of the interval: the spinner is running
        time.sleep(2.0)
        gov.update(force=True)
        assert gov.others >= 0.5, gov.others
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(before)
