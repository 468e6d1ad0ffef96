"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps run end to end on CPU (tiny sizes), so
the script cannot rot while no GPU is around. No timing is asserted."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_json_and_summary(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out), "--dry-run"],
        env=subprocess_env(PYTHON=sys.executable), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == "ddpo_rl.benchmarks.gpu_check/1" and report["dry_run"] is True
    assert set(report["steps"]) == {"gpu_tests", "throughput", "recipe_epochs"}
    assert all(step["ok"] for step in report["steps"].values()), {k: v["last_line"] for k, v in report["steps"].items()}
    tput = report["steps"]["throughput"]["result"]
    assert {"baseline_loop", "diffusers_pipeline", "ddpo_rl_eager", "ddpo_rl_graphed", "plain_policy_loop"} <= set(tput["collection"])
    assert tput["training"]["trainer_overhead_pct"] is not None
    targets = report["targets"]
    assert targets["targets_apply"] is False  # a CPU dry run answers no target
    for key in ("collection_vs_baseline", "collection_vs_pipeline", "env_overhead_pct", "trainer_overhead_pct"):
        assert targets[key]["measured"] is not None, key
    epochs = targets["recipe_per_epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["sampling_seconds"] > 0 and e["training_seconds"] > 0 for e in epochs)
    recipe = report["steps"]["recipe_epochs"]["result"]
    (run,) = recipe["runs"]["sampler=auto"]
    assert run["sampler_class"] == "EnvSampler" and run["mixed_precision"] == "no"  # "auto" on CPU
    assert recipe["config"]["samples_per_epoch"] == 4 and recipe["config"]["lora"] is True
    assert targets["paper_epoch_seconds"]["one_gpu"] > 0
    assert targets["paper_epoch_seconds"]["comparable"] is False  # a tiny model on a CPU is not the paper's epoch
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "recipe epoch 2" in summary
    assert "paper epoch: not extrapolated here" in summary and "on one GPU" not in summary
