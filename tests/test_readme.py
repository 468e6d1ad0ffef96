"""The README's composition example runs as written, and every command the docs show parses."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("1 ")


DDPO_SCRIPTS = {  # the recipe scripts built on ddpo_rl.config.parse_cli, with their own defaults
    "ddpo_is": {"algorithm": "ddpo_is"},
    "ddpo_sf": {"algorithm": "ddpo_sf"},
    "rwr": {"algorithm": "rwr"},
    "flow_grpo": {"algorithm": "ddpo_is", "preset": "flow-digits"},
}
PLACEHOLDERS = {"K": "0.1", "S": "0", "G": "3", "L": "10", "N": "8", "NAME": "digits", "P": "tiny",
                "DIR": "/tmp/a-model-directory", "OUT": "/tmp/out.json", "OUT.png": "/tmp/out.png"}
"""What the docs write for a value the reader chooses. ARGS and [optional parts] are left out; ``...``
too, except as a path after --json."""
COMMAND = re.compile(r"python ((?:recipes|benchmarks|docs/results)/\w+\.py)\b.*")


def _doc_commands(text: str) -> list[str]:
    """Every ``python recipes|benchmarks|docs/results/<script>.py ...`` command of a Markdown text: the
    lines of fenced code blocks (backslash continuations joined), the inline code spans elsewhere (which
    may wrap) and indented code lines."""
    commands = []
    parts = re.split(r"^```.*$", text, flags=re.M)  # even parts: prose; odd parts: fenced blocks
    for i, part in enumerate(parts):
        if i % 2:
            lines = re.sub(r"\\\n\s*", " ", part).splitlines()
        else:
            lines = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", part)]
            lines += [line.strip() for line in part.splitlines() if line.startswith("    python ")]
        commands += [m.group(0) for line in lines if (m := COMMAND.search(line))]
    return commands


def _words(command: str) -> list[str]:
    """The script and its arguments, placeholders filled in."""
    import shlex

    words, optional = [], False
    for word in shlex.split(command)[1:]:
        optional = optional or word.startswith("[")
        if not optional and word != "ARGS":
            if word != "...":
                words.append(PLACEHOLDERS.get(word, word))
            elif words and words[-1] == "--json":
                words.append(PLACEHOLDERS["OUT"])
        optional = optional and not word.endswith("]")
    return words


class _Parsed(BaseException):
    """Raised instead of returning from an argparse parse: the script stops before any work."""


def _check_command(words: list[str], monkeypatch) -> None:
    """Parse a documented command as its script would, without running it: the DDPO recipes through
    parse_cli, dppo_gym through its own parser, the argparse scripts (benchmarks, pretraining, kl_front,
    headroom, ...) run as __main__ until their parser returns; arguments they hand to a recipe (after
    ``--``, or those their parser does not know) through parse_cli."""
    import argparse
    import runpy
    import sys

    from ddpo_rl.config import parse_cli

    script, args = words[0], words[1:]
    name = os.path.splitext(os.path.basename(script))[0]
    if script.startswith("recipes/") and name in DDPO_SCRIPTS:
        parse_cli(args, **DDPO_SCRIPTS[name])
        return
    if name == "dppo_gym":
        from recipes.dppo_gym import parse_args

        parse_args(args)
        return
    known = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        raise _Parsed(*known(self, args, namespace))

    def parse_args(self, args=None, namespace=None):
        ns, extras = known(self, args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        raise _Parsed(ns, [])

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
        m.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        m.setattr(sys, "argv", [os.path.join(ROOT, script), *args])
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        except _Parsed as parsed:
            ns, extras = parsed.args
        else:
            raise AssertionError("no argument parser ran")
    recipe = [w for w in [*extras, *getattr(ns, "extra", []), *getattr(ns, "recipe_args", [])] if w != "--"]
    if recipe:
        preset = getattr(ns, "preset", None)
        parse_cli([*(["--preset", preset] if preset and "--preset" not in recipe else []), *recipe])


def test_every_command_in_the_docs_parses(monkeypatch):
    """The commands that README.md, benchmarks/README.md and docs/ show (training, pretraining, kl_front,
    headroom, benchmarks, the docs/results scripts) name existing options with valid values: a renamed
    or removed option fails here, not for a reader."""
    import glob

    paths = ["README.md", "benchmarks/README.md", *sorted(glob.glob("docs/**/*.md", root_dir=ROOT, recursive=True))]
    checked = 0
    for path in paths:
        with open(os.path.join(ROOT, path)) as f:
            for command in _doc_commands(f.read()):
                try:
                    _check_command(_words(command), monkeypatch)
                except (Exception, SystemExit) as err:
                    raise AssertionError(f"{path}: `{command}`: {type(err).__name__}: {err}") from None
                checked += 1
    assert checked >= 50  # the docs hold about 65 such commands: the extraction still finds them
