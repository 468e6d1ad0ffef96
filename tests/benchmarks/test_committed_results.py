"""The benchmark results committed under benchmarks/results/ say what they are."""

from __future__ import annotations

import glob
import json
import os

import pytest

RESULTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "*.json")))


@pytest.mark.parametrize("path", RESULTS, ids=os.path.basename)
def test_a_paper_epoch_extrapolation_says_whether_it_compares(path):
    """recipe_epoch.py extrapolates every run to the paper's 256-sample epoch; only the paper's setting (the
    SD-1.5 UNet, 50 steps, a GPU) may be set beside the paper's 8-A100 figure, and the file must say which."""
    with open(path) as f:
        result = json.load(f)
    epoch = result.get("paper_epoch")
    if epoch is None:
        return
    config = result["config"]
    # the run's device: "device" in each run since commit 64925cf, the machine's name before
    devices = {run.get("device", result["machine"]["device_name"]).split(":")[0]
               for runs in result["runs"].values() for run in runs}
    paper = config["model"] == "sd15" and config["steps"] == epoch["steps"] and devices <= {"cuda"}
    assert epoch.get("comparable") is paper


def test_the_results_folder_is_found():
    assert any("cpu_digits_samplers_options" in p for p in RESULTS)
