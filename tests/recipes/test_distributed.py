"""Multi-process training through torchrun on CPU (gloo), 2 processes, tiny model.

The guard against the reference DDPO's LoRA gradient-sync bug: after training, every rank
must hold bit-identical trainable weights (LoRA adapters, and the full UNet).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, free_port, read_jsonl, subprocess_env

WORKER = os.path.join(ROOT, "tests", "recipes", "dist_worker.py")
WORLD = 2
TINY = ["--preset", "tiny", "--epochs", "2"]


def torchrun_cmd(*args):
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args,
    ]




@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """One torchrun launch, two recipes in the same process group: LoRA and full fine-tuning."""
    root = tmp_path_factory.mktemp("dist")
    variants = {"lora": [*TINY, "--use-lora", "true"], "full": TINY}
    res = subprocess.run(
        torchrun_cmd(WORKER, str(root), json.dumps(variants)),
        capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT,
    )
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return root


def load_ranks(run_dir):
    states = [torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [s["rank"] for s in states] == list(range(WORLD))
    assert all(s["world_size"] == WORLD for s in states)
    return states


@pytest.mark.parametrize("variant", ["lora", "full"])
def test_every_rank_ends_with_identical_weights(two_rank_runs, variant):
    ranks = load_ranks(two_rank_runs / variant)
    final0 = ranks[0]["final"]
    if variant == "lora":
        assert final0 and all("lora" in name for name in final0)
    for other in ranks[1:]:
        assert other["final"].keys() == final0.keys()
        for name in final0:
            assert torch.equal(other["final"][name], final0[name]), f"rank {other['rank']} differs at {name}"
    moved = max((final0[n] - ranks[0]["initial"][n]).abs().max().item() for n in final0)
    assert moved > 0, "training did not change the weights: the comparison would be vacuous"


@pytest.mark.parametrize("variant", ["lora", "full"])
def test_ranks_sample_their_own_batches_and_share_the_statistics(two_rank_runs, variant):
    run_dir = two_rank_runs / variant
    ranks = load_ranks(run_dir)
    per_rank = 4  # tiny preset: sample_batch_size 4 x 1 batch
    # each rank trained on its own samples (own seed stream: prompts and noise differ)
    for epoch in range(2):
        r0, r1 = (s["seen"][epoch] for s in ranks)
        assert r0["rewards"].numel() == r1["rewards"].numel() == per_rank
        assert not torch.equal(r0["rewards"], r1["rewards"])
    # the per-prompt statistics saw every rank's rewards: 2 epochs x 2 ranks x 4 samples
    for s in ranks:
        assert sum(len(b) for b in s["tracker"]["buffers"].values()) == 2 * WORLD * per_rank
    assert ranks[0]["tracker"] == ranks[1]["tracker"]
    # only rank 0 writes: one log line per epoch, global sample count
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["num_samples"] == WORLD * per_rank for m in metrics)
    assert [e["epoch"] for e in read_jsonl(run_dir / "eval.jsonl")] == [0, 1, 2]
    # the checkpoint holds one RNG state per rank, and they differ
    ckpt = torch.load(run_dir / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert len(ckpt["rng"]) == WORLD
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


def assert_same_metrics(full, part, epochs: int) -> None:
    """``part`` (stopped or failed, then resumed) logged every epoch once, with ``full``'s figures."""
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [m["epoch"] for m in b] == list(range(1, epochs + 1))
    for ma, mb in zip(a, b):
        for k in ("reward_mean", "reward_std", "num_samples", "loss", "grad_norm"):
            assert ma[k] == pytest.approx(mb[k], rel=1e-6, abs=1e-9), (ma["epoch"], k)


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (Linux /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if environ.get(b"RANK") == str(rank).encode():
            return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's pid in /proc")
def test_sigterm_on_one_rank_stops_all_ranks_and_resume_matches(tmp_path):
    script = os.path.join(ROOT, "recipes", "ddpo_is.py")
    common = ["--preset", "tiny", "--epochs", "4", "--eval-every", "100", "--save-every", "100", "--progress", "false"]
    full = tmp_path / "full"
    res = subprocess.run(torchrun_cmd(script, *common, "--output-dir", str(full)),
                         capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]

    part = tmp_path / "part"
    proc = subprocess.Popen(torchrun_cmd(script, *common, "--output-dir", str(part)), env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, sent = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        p = part / "metrics.jsonl"
        if p.exists() and len(read_jsonl(p)) >= 1:
            pid = _rank_pid(proc.pid, rank=1)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)  # the non-writing rank only
                sent = True
                break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=240)
    assert sent, "the run ended before the signal could be sent"
    assert proc.returncode == 0, err[-4000:]
    assert "stopped at epoch" in out
    ckpt = torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert 1 <= ckpt["epoch"] < 4 and len(ckpt["rng"]) == WORLD
    assert not (part / "final").exists()

    res = subprocess.run(torchrun_cmd(script, *common, "--output-dir", str(part), "--resume", str(part)),
                         capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    assert_same_metrics(full, part, 4)


FAILING = ["--preset", "tiny", "--epochs", "4", "--eval-every", "100", "--save-every", "100", "--progress", "false",
           "--reward", "tests.recipes.bad_rewards:fail_once_on_ranks"]


def _failing_run(out, calls: dict, marker, *extra):
    kwargs = json.dumps({"calls": calls, "marker": str(marker)})
    return subprocess.run(torchrun_cmd(os.path.join(ROOT, "recipes", "ddpo_is.py"), *FAILING, "--reward-kwargs", kwargs,
                                       "--output-dir", str(out), *extra),
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def unfailing_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("unfailing") / "run"
    res = _failing_run(out, {}, out.parent / "never")
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("calls, failed", [
    # every rank's reward raises while epoch 3 samples (rank 0 also scored the base evaluation: 3 calls)
    ({"0": 6, "1": 3}, "sampling epoch 3 failed"),
    # rank 1's alone: rank 0's gather of the rewards ends with an error (gloo) and it writes the checkpoint
    ({"1": 3}, "the update of epoch 3 failed"),
])
def test_a_failure_under_torchrun_keeps_the_epochs_since_the_last_checkpoint(unfailing_run, tmp_path, calls, failed):
    """With torchrun, rank 0 writes the failure checkpoint alone (every rank's random state was gathered at
    the epoch's start, so no collective is needed): the run that failed in epoch 3, resumed, ends exactly
    as the run that never failed, although its last regular checkpoint was none."""
    part, marker = tmp_path / "part", tmp_path / "failed"
    res = _failing_run(part, calls, marker)
    assert res.returncode != 0
    assert f"note: {failed}; the checkpoint of epoch 2 is saved" in res.stderr, res.stderr[-4000:]
    ckpt = torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and len(ckpt["rng"]) == WORLD

    res = _failing_run(part, calls, marker, "--resume", str(part))  # the markers exist: no failure now
    assert res.returncode == 0, res.stderr[-4000:]
    assert_same_metrics(unfailing_run, part, 4)
    wa = torch.load(unfailing_run / "checkpoints" / "checkpoint.pt", weights_only=False)["trainable"]
    wb = torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)["trainable"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.mark.slow
def test_an_evaluation_failing_under_torchrun_is_done_first_on_resume(unfailing_run, tmp_path):
    """Rank 0 alone evaluates: a monitor failing in the evaluation of epoch 2 (its 3rd call: the base
    evaluation scored two prompt sets) writes the checkpoint of epoch 2 with that evaluation pending while
    rank 1 waits in a collective; the resumed run evaluates epoch 2 first and trains as the run that never
    failed (evaluations do not touch the training's random streams)."""
    part, marker = tmp_path / "part", tmp_path / "failed"
    monitor = "tests.recipes.bad_rewards:fail_once_on_ranks"
    extra = ["--eval-every", "2", "--monitor-rewards", monitor,
             "--monitor-reward-kwargs", json.dumps({monitor: {"calls": {"0": 3}, "marker": str(marker)}})]
    res = _failing_run(part, {}, tmp_path / "never", *extra)
    assert res.returncode != 0
    assert "note: the evaluation of epoch 2 failed; the checkpoint of epoch 2 is saved and a resumed run evaluates it first" \
        in res.stderr, res.stderr[-4000:]
    assert torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)["pending_evaluation"]["epoch"] == 2

    res = subprocess.run(torchrun_cmd(os.path.join(ROOT, "recipes", "ddpo_is.py"), "--resume", str(part), "--progress", "false"),
                         capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    assert [e["epoch"] for e in read_jsonl(part / "eval.jsonl")] == [0, 2, 4]
    assert_same_metrics(unfailing_run, part, 4)
