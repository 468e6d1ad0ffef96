"""The README's composition example runs as written, and every recipe command the docs show parses."""

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
PLACEHOLDERS = {"K": "0.1", "S": "0", "G": "3", "L": "10", "DIR": "/tmp/a-model-directory"}
"""What the docs write for a value the reader chooses; ARGS and ... (more options) are left out."""


def _doc_commands(text: str) -> list[str]:
    """Every ``python recipes/<ddpo script>.py ...`` command of a Markdown text: the lines of fenced code
    blocks (backslash continuations joined) and the inline code spans elsewhere (which may wrap)."""
    pattern = re.compile(r"python recipes/(?:%s)\.py\b.*" % "|".join(DDPO_SCRIPTS))
    commands = []
    parts = re.split(r"^```.*$", text, flags=re.M)  # even parts: prose; odd parts: fenced blocks
    for i, part in enumerate(parts):
        if i % 2:
            lines = re.sub(r"\\\n\s*", " ", part).splitlines()
        else:
            lines = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", part)]
            lines += [line.strip() for line in part.splitlines() if line.startswith("    python recipes/")]
        commands += [m.group(0) for line in lines if (m := pattern.search(line))]
    return commands


def test_every_recipe_command_in_the_docs_parses():
    """The training commands the README and docs/ show (and benchmarks/README) name existing fields with
    valid values: a renamed or removed option fails here, not for a reader."""
    import glob
    import shlex

    from ddpo_rl.config import parse_cli

    paths = ["README.md", "benchmarks/README.md", *sorted(glob.glob("docs/**/*.md", root_dir=ROOT, recursive=True))]
    checked = 0
    for path in paths:
        with open(os.path.join(ROOT, path)) as f:
            for command in _doc_commands(f.read()):
                words = shlex.split(command)
                script = re.match(r"recipes/(\w+)\.py", words[1]).group(1)
                args = [PLACEHOLDERS.get(w, w) for w in words[2:] if w not in ("ARGS", "...")]
                try:
                    parse_cli(args, **DDPO_SCRIPTS[script])
                except Exception as err:
                    raise AssertionError(f"{path}: `{command}`: {err}") from None
                checked += 1
    assert checked >= 20  # the docs hold about 30 such commands: the extraction still finds them
