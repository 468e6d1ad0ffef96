"""The recipe scripts end to end on the tiny random model: outputs, errors, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_FIELDS = ("reward_mean", "reward_std", "loss", "kl_approx", "clip_fraction", "grad_norm")


def run_recipe(script, *args, timeout=300, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(ROOT, "recipes", script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **popen)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("script", ["ddpo_is.py", "ddpo_sf.py", "rwr.py"])
def test_recipe_smoke(script, tmp_path):
    out = tmp_path / "run"
    res = run_recipe(script, "--preset", "tiny", "--epochs", "2", "--output-dir", str(out), "--progress", "false")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("epoch", "reward_mean", "reward_std", "eval_reward_mean", "loss", "clip_fraction", "kl_approx", "seconds"):
            assert key in m
        assert m["loss"] is not None and torch.isfinite(torch.tensor(m["loss"]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["algorithm"] == script[:-3]
    for name in ("reward_curve.png", "summary.json", "samples/epoch_0000.png", "samples/epoch_0002.png",
                 "checkpoints/checkpoint.pt", "final/unet/diffusion_pytorch_model.safetensors"):
        assert (out / name).exists(), name


@pytest.mark.parametrize(
    "args, field",
    [
        (["--preset", "nope"], "preset"),
        (["--reward", "beauty"], "reward"),
        (["--epochs", "-1"], "epochs"),
        (["--minibatch-size", "3"], "minibatch_size"),
        (["--eta", "0"], "eta"),
        (["--prompts", "/nonexistent/prompts.txt"], "prompt"),
        (["--model", "/nonexistent/pipeline"], "/nonexistent/pipeline"),
        (["--bogus-field", "1"], "bogus_field"),
    ],
)
def test_bad_input_fails_fast_with_one_line(args, field, tmp_path, capsys):
    from ddpo_rl.recipe import main

    t = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--output-dir", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and field in err[0], err
    assert time.perf_counter() - t < 60


def _state_of(run_dir):
    return load_file(os.path.join(run_dir, "final", "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    common = ["--preset", "tiny", "--epochs", "4", "--eval-every", "10", "--save-every", "1", "--progress", "false"]
    full = tmp_path / "full"
    res = run_recipe("ddpo_is.py", *common, "--output-dir", str(full))
    assert res.returncode == 0, res.stderr[-3000:]

    # the same run, sent SIGTERM once its 2nd epoch is logged: it checkpoints and stops
    part = tmp_path / "part"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "ddpo_is.py"), *common, "--output-dir", str(part)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        p = part / "metrics.jsonl"
        if p.exists() and len(read_jsonl(p)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)["epoch"]
    assert 2 <= stopped_at < 4, "the signal should stop the run before its end"
    assert not (part / "final").exists()

    res = run_recipe("ddpo_is.py", *common, "--output-dir", str(part), "--resume", str(part))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [m["epoch"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        for k in TRAIN_FIELDS:
            assert ma[k] == pytest.approx(mb[k], rel=1e-6, abs=1e-9), (ma["epoch"], k)
    wa, wb = _state_of(full), _state_of(part)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path):
    from ddpo_rl.config import parse_cli
    from ddpo_rl.recipe import run

    def go(seed, name):
        out = tmp_path / name
        run(parse_cli(["--preset", "tiny", "--epochs", "2", "--seed", str(seed), "--output-dir", str(out), "--progress", "false"]))
        return [[m[k] for k in TRAIN_FIELDS] for m in read_jsonl(out / "metrics.jsonl")]

    assert go(0, "a") == go(0, "b")
    assert go(0, "a2") != go(1, "c")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from ddpo_rl import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_torch_save({"epoch": 1}, str(path))

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_torch_save({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["epoch"] == 1
