"""The progress display's evaluation lines (ddpo_rl.progress)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

import ddpo_rl.progress
from ddpo_rl.progress import RunProgress


def _logged(ev, monkeypatch) -> str:
    console = Console(record=True, width=400, file=io.StringIO())  # what the display writes, recorded
    monkeypatch.setattr(ddpo_rl.progress, "Console", lambda **kwargs: console)
    with RunProgress(3) as progress:
        progress.log_eval(ev)
    return console.export_text()


def test_an_evaluation_line_shows_its_figures_and_counts(monkeypatch):
    ev = SimpleNamespace(epoch=2, train_mean=-1.25, train_std=0.1, eval_mean=-1.5, eval_std=0.2, n=128, eval_n=128,
                         monitors={"digit_alignment": {"train_mean": 0.9, "eval_mean": 0.8}})
    line = _logged(ev, monkeypatch)
    assert "eval after 2 epochs: train prompts -1.25±0.1, held-out -1.5±0.2 (n=128); digit_alignment 0.9 / 0.8" in line


def test_an_evaluation_with_nothing_finite_to_average_is_shown_not_a_crash(monkeypatch):
    """--on-invalid-reward drop may leave no reward of a set (its mean is None), and a monitor may have no
    finite value: the line says n/a, and the two sets' counts when they differ."""
    ev = SimpleNamespace(epoch=0, train_mean=None, train_std=None, eval_mean=-1.5, eval_std=0.2, n=0, eval_n=3,
                         monitors={"sample_diversity": {"train_mean": None, "eval_mean": 0.4}})
    line = _logged(ev, monkeypatch)
    assert "train prompts n/a±n/a, held-out -1.5±0.2 (n=0 / 3); sample_diversity n/a / 0.4" in line
