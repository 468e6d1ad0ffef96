"""Command lines built by tyro from dataclass configs (ddpo_rl.cli), and what the recipes rely on."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest

from ddpo_rl import cli, config

MODES = ("a", "b")


@dataclass
class Example:
    """An example config."""

    count: int = 1
    """How many."""
    mode: Literal[MODES] = "a"
    """A choice."""
    tags: list[str] = field(default_factory=list)
    """Any number of words."""
    options: dict = field(default_factory=dict)
    """A JSON object."""
    name: str | None = None
    """Optional."""
    flag: bool = False
    """A boolean."""


def test_any_field_is_an_option_and_explicit_fields_are_reported():
    parsed, given = cli.parse(
        Example, ["--tags", "x", "y", "--options", '{"k": [1, 2]}', "--name", "null", "--flag=yes", "--mode", "b"]
    )
    assert parsed == Example(1, "b", ["x", "y"], {"k": [1, 2]}, None, True)
    assert set(given) == {"tags", "options", "name", "flag", "mode"}  # count kept its default: not given
    _, given = cli.parse(Example, ["--count", "1"])
    assert given == {"count": 1}  # given, even though equal to the default


@pytest.mark.parametrize(
    "argv, start",
    [
        (["--mode", "c"], "mode: cannot read 'c' as one of a, b"),
        (["--count", "x"], "count: cannot read 'x'"),
        (["--options", "[1]"], "options: "),
        (["--flag", "perhaps"], "flag: "),
        (["--cuont", "1"], "cuont: unknown config field; did you mean count?"),
        (["--count"], "count: missing value"),
        (["count", "1"], "count: expected --FIELD VALUE"),
    ],
)
def test_errors_are_one_line_naming_the_field(argv, start, capsys):
    with pytest.raises(cli.CLIError) as err:
        cli.parse(Example, argv)
    assert str(err.value).startswith(start) and "\n" not in str(err.value)
    assert capsys.readouterr().err == ""  # tyro's boxed messages are not shown


def test_help_shows_each_docstring(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse(Example, ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "Any number of words." in text and "A JSON object." in text
    assert cli.help_text(Example).count("\n  --") == len(Example.__dataclass_fields__)


def test_parse_cli_gives_preset_config_only_the_explicit_fields(monkeypatch):
    seen = {}
    real = config.preset_config

    def spy(name, **overrides):
        seen.update(name=name, overrides=overrides)
        return real(name, **overrides)

    monkeypatch.setattr(config, "preset_config", spy)
    cfg = config.parse_cli(["--preset", "tiny", "--epochs", "2", "--seed", "0"], algorithm="rwr")
    assert seen == {"name": "tiny", "overrides": {"algorithm": "rwr", "epochs": 2, "seed": 0}}
    assert cfg.sample_batch_size == config.PRESETS["tiny"]["sample_batch_size"]


def test_choice_fields_are_literals_of_the_library_constants():
    from ddpo_rl.ddim import LOG_PROB_REDUCTIONS
    from ddpo_rl.loggers import LOGGERS
    from ddpo_rl.objectives import LOSSES
    from ddpo_rl.objectives.rwr import RWR_MODES
    from ddpo_rl.precision import MIXED_PRECISION_MODES
    from ddpo_rl.rewards.transform import ON_INVALID

    hints = typing.get_type_hints(config.DDPOConfig)
    expected = {
        "algorithm": LOSSES, "log_prob_reduction": LOG_PROB_REDUCTIONS, "mixed_precision": MIXED_PRECISION_MODES,
        "on_invalid_reward": ON_INVALID, "rwr_mode": RWR_MODES, "logger": LOGGERS,
    }
    for name, values in expected.items():
        assert typing.get_origin(hints[name]) is Literal and typing.get_args(hints[name]) == values, name
    with pytest.raises(config.ConfigError, match="^rwr_mode: 'soft' is not one of"):
        config.preset_config("tiny", rwr_mode="soft").validate()  # built in code: validate checks it


def test_dppo_command_line(capsys):
    from recipes.dppo_gym import main, parse_args

    cfg = parse_args(["--env", "MountainCarContinuous-v0", "--ratio", "chain", "--progress", "false"])
    assert (cfg.env, cfg.ratio, cfg.progress) == ("MountainCarContinuous-v0", "chain", False)
    for argv, start in [(["--ratio", "joint"], "error: ratio: "), (["--epochs", "0"], "error: epochs: "), (["--eta", "1.5"], "error: eta: "),
                        (["--seed", "-1"], "error: seed: "), (["--gamma", "1.5"], "error: gamma: "),
                        (["--critic-coeff", "-1"], "error: critic_coeff: "), (["--demo-noise", "-1"], "error: demo_noise: "),
                        (["--denoising-steps", "200"], "error: denoising_steps: "),
                        (["--epoch", "3"], "error: epoch: unknown config field; did you mean epochs?")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(start), err


def _argparse_parser(main, argv=("--help",)):
    """The argparse parser ``main`` builds (caught when it parses, before anything runs)."""
    import argparse

    class Caught(Exception):
        pass

    built = []

    def parse(self, args=None, namespace=None):
        built.append(self)
        raise Caught

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_known_args", parse)
        with pytest.raises(Caught):
            main(list(argv))
    return built[0]


@pytest.mark.parametrize("name", ["kl_front", "compare_algorithms", "headroom", "pretrain_digits", "pretrain_flow_digits"])
def test_every_option_of_the_argparse_recipes_has_help_and_shows_its_default(name):
    import importlib

    module = importlib.import_module(f"recipes.{name}")
    parser = _argparse_parser(module.main)
    assert parser.formatter_class is cli.HelpFormatter
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options and all(a.help for a in options), [a.dest for a in options if not a.help]
    text = parser.format_help()
    for a in options:
        if a.default not in (None, False):
            assert f"(default: {a.default})" in " ".join(text.split()), a.dest
