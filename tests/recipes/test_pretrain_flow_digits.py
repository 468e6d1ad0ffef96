"""recipes/pretrain_flow_digits.py end to end with a few steps: it saves a loadable model, a grid
and the prompted-digit scores."""

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
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT)
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
