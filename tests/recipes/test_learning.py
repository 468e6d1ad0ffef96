"""DDPO learns, and the monitors tell whether the model is still good (embedded digits model).

Fixed seed; rewards and monitors are measured by the recipe's own fixed-seed evaluation (the same
prompts and the same initial noise before and after), so every comparison is paired and does not
depend on the noise of one training batch.

1. The default preset (KL to the reference model on) raises JPEG compressibility while the digit
   classifier's monitor stays within tolerance: no over-optimisation alarm.
2. The same preset with kl_coef=0 and 10 epochs: the digits break (measured, seed 0: the prompted
   digit's probability falls from 0.94 to 0.77 on the training prompts and 0.66 on the held-out
   ones, more than 2 base std) and the alarm fires, so the alarm of test 1 is not vacuous.
"""

import json

import pytest

from ddpo_rl.config import parse_cli
from recipes.ddpo_recipe import run

SHORT = ["--progress", "false", "--seed", "0", "--sample-batch-size", "32", "--num-batches-per-epoch", "2",
         "--eval-num-samples", "64"]


@pytest.mark.slow
def test_ddpo_is_raises_compressibility_and_keeps_the_digits(tmp_path):
    cfg = parse_cli(["--output-dir", str(tmp_path / "run"), *SHORT, "--epochs", "12", "--eval-every", "12",
                     "--save-every", "12"])
    assert cfg.kl_coef > 0 and cfg.monitor_rewards == ["digit_alignment"]  # the default preset
    summary = run(cfg)
    base, final = summary["base"], summary["final"]
    gain = final["train_prompts_reward_mean"] - base["train_prompts_reward_mean"]
    # the reward rose, by a margin well outside the evaluation's noise (paired seeds)
    assert gain > 0.15 * base["train_prompts_reward_std"], summary
    # and the digits are still the prompted digits
    assert summary["monitor_alarm"] is None, summary["monitors"]
    for prompts in ("training prompts", "held-out prompts"):
        assert summary["monitors"]["digit_alignment"][prompts]["final_over_base"] > 0.9, summary["monitors"]
    metrics = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(metrics) == 12 and all(m["kl_to_reference"] is not None for m in metrics)


@pytest.mark.slow
def test_without_kl_the_digits_break_and_the_alarm_fires(tmp_path):
    cfg = parse_cli(["--output-dir", str(tmp_path / "run"), *SHORT, "--epochs", "10", "--eval-every", "10",
                     "--save-every", "10", "--kl-coef", "0"])
    summary = run(cfg)
    alarm = summary["monitor_alarm"]
    assert alarm is not None and alarm["monitor"] == "digit_alignment" and alarm["epoch"] == 10, summary["monitors"]
    assert summary["best_epoch"] == 0  # the only evaluation within tolerance: the base model
