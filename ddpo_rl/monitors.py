"""Monitor rewards, the over-optimisation alarm and the choice of the best evaluation.

A monitor is a reward function (any name :func:`ddpo_rl.rewards.registry.make_reward` accepts)
computed on every evaluation's samples and never trained on: it shows what fine-tuning for the
training reward costs (the digit classifier while training JPEG compressibility, the sample
diversity while training digit alignment, ...).

An evaluation record (a dict, as written to eval.jsonl) holds ``epoch``,
``train_prompts_reward_mean`` and ``monitors``::

    {"digit_alignment": {"train_mean": .., "train_std": .., "eval_mean": .., "eval_std": ..}, ...}

on the training ("train") and the held-out ("eval") prompts. Against the base evaluation (epoch
0, before any update) a monitor's drop, in base-std units, is

    drop = (base_mean - mean) / base_std

and an evaluation is *within tolerance* when every monitor's drop on both prompt sets is at most
``tolerance``. The *alarm* is the first evaluation that is not; the *best* evaluation is the one
with the highest training-prompt reward among those within tolerance (the base included).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

PROMPT_SETS = {"train": "training prompts", "eval": "held-out prompts"}


def build_monitors(names: Sequence[str], kwargs: Mapping[str, dict] | None = None) -> dict[str, Callable]:
    """Load each monitor reward; a ``ConfigError`` naming ``monitor_rewards`` if one is unknown or fails to load.

    Call it before loading any model: the names and the monitors' own models are checked first.
    """
    from ddpo_rl.config import ConfigError
    from ddpo_rl.errors import failed_to_load
    from ddpo_rl.rewards.registry import get_reward_factory, make_reward

    kwargs = dict(kwargs or {})
    monitors = {}
    for name in names:
        try:
            get_reward_factory(name)
        except ValueError as err:
            raise ConfigError(f"monitor_rewards: {name!r} is not a reward: {err}") from err
        try:
            monitors[name] = make_reward(name, **kwargs.get(name, {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"monitor_reward_kwargs: {kwargs.get(name, {})} rejected by monitor {name!r}: {err}") from err
        except Exception as err:  # a monitor's model that cannot be loaded (missing weights, no hub, ...)
            option = f"--monitor-reward-kwargs '{{\"{name}\": {{...}}}}'"
            more = "; choose other monitors with --monitor-rewards NAME,..., or none with --monitor-rewards ''"
            raise ConfigError(f"monitor_rewards: monitor {name!r} {failed_to_load(err, option, more)}") from err
    return monitors


@torch.no_grad()
def score_monitors(monitors: Mapping[str, Callable], images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every monitor's values [B] (float32, on the images' device) for one batch of images. A monitor that
    raises, or returns other than one value per image, is a :class:`~ddpo_rl.rewards.transform.RewardError`
    naming it (non-finite values are kept: :func:`summarize` leaves them out)."""
    from ddpo_rl.rewards.transform import RewardError, one_per_image

    values = {}
    for name, fn in monitors.items():
        try:
            v = fn(images, list(prompts))
        except Exception as err:
            raise RewardError(f"monitor {name!r} raised: {err!r}") from err
        values[name] = one_per_image(v, images.shape[0], f"monitor {name!r}").float().to(images.device)
    return values


def summarize(values: torch.Tensor) -> tuple[float | None, float | None]:
    """(mean, std) of the finite values (population std, as for the rewards); (None, None) if there are none."""
    v = values[torch.isfinite(values)]
    if v.numel() == 0:
        return None, None
    return v.mean().item(), v.std(unbiased=False).item()


def drop_in_base_std(base_mean: float, base_std: float, mean: float) -> float:
    """How far ``mean`` fell below ``base_mean``, in units of ``base_std`` (negative: it rose)."""
    if base_std > 0:
        return (base_mean - mean) / base_std
    return 0.0 if mean >= base_mean else math.inf


def monitor_drops(base: dict, record: dict) -> dict[tuple[str, str], float]:
    """{(monitor, prompt set): drop in base std} of ``record`` against ``base`` (skipping values that
    could not be measured: NaN, e.g. a diversity with one sample per prompt)."""
    out = {}
    for name, m in record.get("monitors", {}).items():
        b = base.get("monitors", {}).get(name)
        if b is None:
            continue
        for s in PROMPT_SETS:
            values = (b[f"{s}_mean"], b[f"{s}_std"], m[f"{s}_mean"])
            if all(v is not None and math.isfinite(v) for v in values):
                out[(name, s)] = drop_in_base_std(*values)
    return out


def first_alarm(history: Sequence[dict], tolerance: float) -> dict | None:
    """The first evaluation of ``history`` (base first) with a monitor beyond ``tolerance``, described."""
    if not history:
        return None
    base = history[0]
    for record in history[1:]:
        drops = monitor_drops(base, record)
        bad = {k: d for k, d in drops.items() if d > tolerance}
        if bad:
            (name, s), d = max(bad.items(), key=lambda kv: kv[1])
            return dict(
                epoch=record["epoch"], monitor=name, prompts=PROMPT_SETS[s], drop_in_base_std=d, tolerance=tolerance,
                base_mean=base["monitors"][name][f"{s}_mean"], mean=record["monitors"][name][f"{s}_mean"],
            )
    return None


def within_tolerance(base: dict, record: dict, tolerance: float) -> bool:
    return all(d <= tolerance for d in monitor_drops(base, record).values())


def best_evaluation(history: Sequence[dict], tolerance: float) -> dict | None:
    """The evaluation with the highest training-prompt reward among those within tolerance (base included)."""
    if not history:
        return None
    ok = [history[0]] + [r for r in history[1:] if within_tolerance(history[0], r, tolerance)]
    return max(ok, key=lambda r: r["train_prompts_reward_mean"])  # the base is always within tolerance


def alarm_message(alarm: dict) -> str:
    """The alarm in one line. Its drop is infinite (null once read back from JSON) when the monitor had no
    spread on the base samples: then it is said without a number."""
    drop = alarm["drop_in_base_std"]
    by = (f"{drop:.2f} base std " if drop is not None and math.isfinite(drop)
          else "(its base std is 0, so by no finite number of them) ")
    return (
        f"over-optimisation: monitor {alarm['monitor']} on the {alarm['prompts']} fell {by}below its base value "
        f"at epoch {alarm['epoch']} ({alarm['base_mean']:.4g} -> {alarm['mean']:.4g}; tolerance {alarm['tolerance']:g})"
    )
