"""recipes/pretrain_flow_digits.py end to end with a few steps: it saves a loadable model, a grid
and the prompted-digit scores; both pretraining scripts refuse an output they could not write first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env


@pytest.mark.slow  # ~40 s on the shared 2-core machine (a subprocess importing diffusers)
def test_pretrain_flow_digits_recipe(tmp_path):
    out, grid = tmp_path / "flow-digits", tmp_path / "grid.png"
    cmd = [
        sys.executable, os.path.join(ROOT, "recipes", "pretrain_flow_digits.py"), "--out", str(out), "--half",
        "--steps", "3", "--batch-size", "8", "--per-digit", "1", "--num-inference-steps", "2", "--grid", str(grid),
        "--threads", "1",
    ]
    # as a user runs it: from another directory, the repository root not on PYTHONPATH (the
    # installed package is importable; the recipes folder only as the script's own)
    env = subprocess_env(PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CFG 1, 2 Euler steps" in res.stdout and "CFG 3, 2 Euler steps" in res.stdout
    assert grid.exists()

    import ddpo_rl  # noqa: F401
    import torch

    from ddpo_rl.models.flow_digits import load_flow_digits_model

    m = load_flow_digits_model(out)
    assert next(m.transformer.parameters()).dtype == torch.float32
    st = out / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(st).values()} == {torch.float16}


@pytest.mark.slow  # ~20-40 s on the shared 2-core machine (a subprocess importing diffusers)
def test_ddpo_recipe_runs_the_flow_digits_model(tmp_path):
    """--model flow-digits: the recipe picks the flow-matching policy from the model's scheduler, the
    env carries the pooled embeddings the SD3 transformer needs, and a GRPO epoch trains."""
    import json

    out = tmp_path / "run"
    cmd = [
        sys.executable, os.path.join(ROOT, "recipes", "ddpo_is.py"), "--model", "flow-digits", "--epochs", "1",
        "--sample-batch-size", "8", "--num-batches-per-epoch", "1", "--minibatch-size", "8", "--group-size", "4",
        "--eval-num-samples", "8", "--num-inference-steps", "4", "--output-dir", str(out), "--progress", "false",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["mean_ratio"] == 1.0  # on-policy at the first inner step
    assert metrics[0]["grad_norm"] > 0
    assert not (out / "final" / "unet").exists()  # the pipeline's component name for a transformer
    saved = json.loads((out / "final" / "transformer" / "config.json").read_text())
    assert saved["_class_name"] == "SD3Transformer2DModel"


@pytest.mark.parametrize("script", ["pretrain_digits.py", "pretrain_flow_digits.py"])
def test_pretraining_refuses_an_output_it_could_not_write_before_training(script, tmp_path):
    (tmp_path / "file").write_text("x")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", script), "--out", str(tmp_path / "file" / "m"),
                          "--steps", "5"], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: out: "), res.stderr[-2000:]
    assert "trained" not in res.stdout  # refused before the first step
