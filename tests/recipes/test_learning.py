"""DDPO learns, and the monitors tell whether the model is still good (embedded digits model).

Fixed seed; rewards and monitors are measured by the recipe's own fixed-seed evaluation (the same
prompts and the same initial noise before and after), so every comparison is paired and does not
depend on the noise of one training batch.

1. The default preset (KL to the reference model, kl_coef 0.1) for 20 epochs raises JPEG
   compressibility while the digit classifier's monitor stays within tolerance: no alarm.
   Measured (seed 0; the same numbers as the 20th-epoch evaluation of the README's 30-epoch run,
   evaluations do not touch the training's random streams): +0.36 base std on the training
   prompts, P(prompted digit) 0.915 / 0.921 against 0.937 / 0.943 for the base model; closeness to
   real digits (digit_realism) 1.125 / 1.121 against 1.162 / 1.125.
2. The same preset with kl_coef=0 for 10 epochs: the digits break (measured, seed 0: 0.765 on the
   training prompts, 0.655 on the held-out ones, 2.2 and 6.4 base std below the base model; realism
   0.833 / 0.792, 1.6 and 2.9 base std down) and the alarm fires, naming the classifier (the largest
   drop), so the alarm of test 1 is not vacuous.
"""

import json

import pytest

from ddpo_rl.config import parse_cli
from recipes.ddpo_recipe import run

SHORT = ["--progress", "false", "--seed", "0"]


@pytest.mark.slow
def test_ddpo_is_raises_compressibility_and_keeps_the_digits(tmp_path):
    cfg = parse_cli(["--output-dir", str(tmp_path / "run"), *SHORT, "--epochs", "20", "--eval-every", "20",
                     "--save-every", "20"])
    assert cfg.kl_coef > 0 and cfg.monitor_rewards == ["digit_alignment", "digit_realism"]  # the default preset
    summary = run(cfg)
    base, final = summary["base"], summary["final"]
    gain = final["train_prompts_reward_mean"] - base["train_prompts_reward_mean"]
    # the reward rose, by a margin well outside the evaluation's noise (paired seeds)
    assert gain > 0.2 * base["train_prompts_reward_std"], summary
    # and the digits are still the prompted digits
    assert summary["monitor_alarm"] is None, summary["monitors"]
    for monitor in ("digit_alignment", "digit_realism"):
        for prompts in ("training prompts", "held-out prompts"):
            assert summary["monitors"][monitor][prompts]["final_over_base"] > 0.9, summary["monitors"]
    metrics = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(metrics) == 20 and all(m["kl_to_reference"] is not None for m in metrics)


@pytest.mark.slow
def test_without_kl_the_digits_break_and_the_alarm_fires(tmp_path):
    cfg = parse_cli(["--output-dir", str(tmp_path / "run"), *SHORT, "--epochs", "10", "--eval-every", "10",
                     "--save-every", "10", "--kl-coef", "0"])
    summary = run(cfg)
    alarm = summary["monitor_alarm"]
    assert alarm is not None and alarm["monitor"] == "digit_alignment" and alarm["epoch"] == 10, summary["monitors"]
    assert summary["best_epoch"] == 0  # the only evaluation within tolerance: the base model
