"""Monitors: loading errors, drops in base std, the alarm (first evaluation out of tolerance), the best evaluation."""

import json
import math

import pytest
import torch

from ddpo_rl.config import ConfigError
from ddpo_rl.monitors import (
    alarm_message,
    best_evaluation,
    build_monitors,
    drop_in_base_std,
    first_alarm,
    score_monitors,
    summarize,
)


def _record(epoch, reward, train_mean, eval_mean=None, std=0.1):
    eval_mean = train_mean if eval_mean is None else eval_mean
    m = {"train_mean": train_mean, "train_std": std, "eval_mean": eval_mean, "eval_std": std}
    return {"epoch": epoch, "train_prompts_reward_mean": reward, "monitors": {"digit_alignment": m}}


def test_drop_is_in_base_std_units():
    assert drop_in_base_std(0.8, 0.2, 0.7) == pytest.approx(0.5)
    assert drop_in_base_std(0.8, 0.2, 0.9) == pytest.approx(-0.5)
    assert drop_in_base_std(0.8, 0.0, 0.8) == 0.0 and drop_in_base_std(0.8, 0.0, 0.7) == math.inf


def test_alarm_is_the_first_evaluation_beyond_tolerance_on_either_prompt_set():
    history = [_record(0, 1.0, 0.8), _record(10, 2.0, 0.77), _record(20, 3.0, 0.8, eval_mean=0.7), _record(30, 4.0, 0.5)]
    alarm = first_alarm(history, tolerance=0.5)
    assert alarm["epoch"] == 20 and alarm["prompts"] == "held-out prompts" and alarm["monitor"] == "digit_alignment"
    assert alarm["drop_in_base_std"] == pytest.approx(1.0)
    assert "digit_alignment" in alarm_message(alarm) and "epoch 20" in alarm_message(alarm)
    assert first_alarm(history[:2], tolerance=0.5) is None
    assert first_alarm(history, tolerance=5.0) is None


def test_an_alarm_on_a_monitor_without_base_spread_is_said_also_after_a_json_round_trip():
    """A monitor constant on the base samples (base std 0) that falls: an infinite drop, which summary.json
    and eval.jsonl write as null; the run's closing lines read it back and must still say the alarm."""
    from ddpo_rl.jsonl import dumps

    history = [_record(0, 1.0, 0.8, std=0.0), _record(10, 2.0, 0.7, std=0.0)]
    alarm = first_alarm(history, tolerance=1.0)
    assert alarm["epoch"] == 10 and alarm["drop_in_base_std"] == math.inf
    for a in (alarm, json.loads(dumps(alarm))):
        message = alarm_message(a)
        assert "fell (its base std is 0, so by no finite number of them) below its base value at epoch 10" in message


def test_best_is_the_highest_reward_within_tolerance():
    history = [_record(0, 1.0, 0.8), _record(10, 2.0, 0.77), _record(20, 3.0, 0.8, eval_mean=0.7), _record(30, 4.0, 0.5)]
    assert best_evaluation(history, tolerance=0.5)["epoch"] == 10
    assert best_evaluation(history, tolerance=5.0)["epoch"] == 30
    # no monitors: every evaluation qualifies
    plain = [{"epoch": e, "train_prompts_reward_mean": r} for e, r in [(0, 1.0), (5, 3.0), (10, 2.0)]]
    assert best_evaluation(plain, 0.5)["epoch"] == 5 and first_alarm(plain, 0.5) is None
    # a monitor that measured nothing (None) neither alarms nor disqualifies
    empty = [_record(0, 1.0, None), _record(5, 2.0, None)]
    assert first_alarm(empty, 0.5) is None and best_evaluation(empty, 0.5)["epoch"] == 5


def test_build_monitors_names_the_field():
    monitors = build_monitors(["digit_alignment", "sample_diversity"], {"digit_alignment": {"C": 1.0}})
    assert set(monitors) == {"digit_alignment", "sample_diversity"}
    assert monitors["digit_alignment"].classifier.C == 1.0
    with pytest.raises(ConfigError, match="monitor_rewards: 'beauty' is not a reward"):
        build_monitors(["beauty"])
    with pytest.raises(ConfigError, match="monitor_reward_kwargs"):
        build_monitors(["digit_alignment"], {"digit_alignment": {"nope": 1}})
    with pytest.raises(ConfigError, match="monitor_rewards: monitor .* failed to load: OSError"):
        build_monitors(["tests.recipes.bad_rewards:fails_to_load"])


def test_score_and_summarize():
    images = torch.rand(6, 3, 8, 8)
    prompts = [f"a handwritten digit {d}" for d in (1, 2, 1, 2, 1, 3)]
    values = score_monitors(build_monitors(["digit_alignment", "sample_diversity"]), images, prompts)
    assert values["digit_alignment"].shape == (6,) and torch.isnan(values["sample_diversity"][5])
    mean, std = summarize(values["sample_diversity"])
    finite = values["sample_diversity"][:5]
    assert mean == pytest.approx(finite.mean().item()) and std == pytest.approx(finite.std(unbiased=False).item())
    assert summarize(torch.full((3,), float("nan"))) == (None, None)


def test_a_monitor_that_raises_or_returns_other_than_one_value_per_image_is_named():
    """A monitor's failure is one line naming it (not a traceback), and a wrong shape is refused rather
    than flattened into the statistics (a [B, 2] output would count every image twice)."""
    from ddpo_rl.rewards.transform import RewardError

    images = torch.rand(4, 3, 8, 8)
    prompts = ["a handwritten digit 1"] * 4
    for factory, match in [
        ("raises", r"monitor 'tests.recipes.bad_rewards:raises' raised: RuntimeError\('reward server unreachable'\)"),
        ("wrong_shape", r"monitor 'tests.recipes.bad_rewards:wrong_shape' returned shape \(4, 2\) for 4 images"),
    ]:
        monitors = build_monitors([f"tests.recipes.bad_rewards:{factory}"])
        with pytest.raises(RewardError, match=match):
            score_monitors(monitors, images, prompts)
