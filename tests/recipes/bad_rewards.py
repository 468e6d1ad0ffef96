"""Misbehaving reward functions for the recipe tests, loaded by name as
``--reward tests.recipes.bad_rewards:FACTORY`` (the registry's "package.module:factory" form).

Each factory accepts (and ignores) ``resize``, which the digits-sized presets pass by default."""

from __future__ import annotations

import torch


def _brightness(images):
    return images.float().mean(dim=(1, 2, 3))


def nan_for_some(every: int = 2, resize=None):
    """Brightness, but NaN for every ``every``-th sample of a batch (starting with the first)."""

    def nan_for_some_reward(images, prompts):
        r = _brightness(images)
        r[::every] = float("nan")
        return r

    return nan_for_some_reward


def inf_for_all(resize=None):
    def inf_for_all_reward(images, prompts):
        return torch.full((images.shape[0],), float("inf"))

    return inf_for_all_reward


def wrong_shape(resize=None):
    def wrong_shape_reward(images, prompts):
        return _brightness(images)[:, None].expand(-1, 2)

    return wrong_shape_reward


def raises(resize=None):
    def raising_reward(images, prompts):
        raise RuntimeError("reward server unreachable")

    return raising_reward


CALLS: dict[str, int] = {}
"""Calls of each ``fail_once`` reward, by its marker path (read by the tests)."""


def fail_once(call: int, marker: str, resize=None):
    """Brightness, but the ``call``-th call raises, once: it then creates ``marker``, and no reward whose
    marker exists raises again (a reward server that was down for a while)."""
    import os

    CALLS[marker] = 0

    def fail_once_reward(images, prompts):
        CALLS[marker] += 1
        if CALLS[marker] == call and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("reward server unreachable")
        return _brightness(images)

    return fail_once_reward


def fail_once_on_ranks(calls: dict, marker: str, resize=None):
    """Brightness, but in the process of rank r (``RANK``, set by torchrun) the ``calls[str(r)]``-th call
    raises, once: it then creates ``marker.r``, and no process whose marker exists raises again. Ranks
    missing from ``calls`` never raise."""
    import os

    rank = os.environ.get("RANK", "0")
    mine, count = f"{marker}.{rank}", [0]

    def fail_once_on_ranks_reward(images, prompts):
        count[0] += 1
        if count[0] == calls.get(rank) and not os.path.exists(mine):
            open(mine, "w").close()
            raise RuntimeError(f"reward server unreachable (rank {rank})")
        return _brightness(images)

    return fail_once_on_ranks_reward


def fails_to_load(resize=None):
    """A reward whose model cannot be loaded (the run must stop before any model loads)."""
    raise OSError("weights not found: /nonexistent/monitor.safetensors")


def falling():
    """A monitor that only falls: every call returns a constant one lower than the call before
    (std 0, so any fall is beyond any tolerance): the over-optimisation alarm must fire."""
    calls = [0]

    def falling_monitor(images, prompts):
        calls[0] += 1
        return torch.full((images.shape[0],), -float(calls[0]))

    return falling_monitor
