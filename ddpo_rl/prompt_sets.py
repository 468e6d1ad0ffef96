"""The DDPO paper's prompt sets, shipped as data files in ``ddpo_rl/data/prompts/``.

=====================  ======================================================================
name                   prompts
=====================  ======================================================================
``simple_animals``     the 45 common animals of the aesthetic-quality experiment
``imagenet_animals``   ImageNet-1k classes 0-397 (the animal classes), one line per class with
                       its synonyms, as in the compressibility experiments
``imagenet_dogs``      ImageNet classes 151-268 (the dog breeds), a subset of the above
``activities``         the 3 activities of the prompt-image alignment experiment
``animal_activities``  "a(n) <animal> <activity>": the 45 animals x 3 activities (135 prompts)
=====================  ======================================================================

>>> from ddpo_rl.prompt_sets import load_prompt_set
>>> len(load_prompt_set("simple_animals"))
45
>>> load_prompt_set("animal_activities")[:2]
['a cat washing dishes', 'a cat playing chess']

A name that is not built in may be a path to a text file with one prompt per line.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from typing import Sequence

_DATA_PACKAGE = "ddpo_rl"  # data files ship as package data of ddpo_rl (pyproject: data/**/*)
_FILES = {
    "simple_animals": "simple_animals.txt",
    "imagenet_animals": "imagenet_animals.txt",
    "activities": "activities.txt",
}
IMAGENET_DOGS = slice(151, 269)
"""The dog-breed classes within ImageNet's first 398 (animal) classes."""


@functools.lru_cache(maxsize=None)
def _read_lines(name: str) -> tuple[str, ...]:
    text = resources.files(_DATA_PACKAGE).joinpath("data", "prompts", name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _read_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def indefinite_article(noun: str) -> str:
    """``"a"`` or ``"an"`` for ``noun`` by its first letter (vowel -> "an").

    A spelling rule, not a phonetic one ("an hour", "a unicorn" need a dictionary); it is exact
    for the built-in animal list.
    """
    return "an" if noun[:1].lower() in "aeiou" else "a"


def with_article(noun: str) -> str:
    """``"a cat"``, ``"an ant"``."""
    return f"{indefinite_article(noun)} {noun}"


def noun_activity_prompts(nouns: Sequence[str], activities: Sequence[str]) -> list[str]:
    """Every "a(n) <noun> <activity>" prompt, nouns in the outer loop (a deterministic order)."""
    return [f"{with_article(n)} {a}" for n in nouns for a in activities]


def list_prompt_sets() -> list[str]:
    """Names accepted by :func:`load_prompt_set`."""
    return sorted([*_FILES, "imagenet_dogs", "animal_activities"])


def load_prompt_set(name: str) -> list[str]:
    """The prompts of a built-in set (see the module docstring) or of a text file (one per line).

    Raises:
        KeyError: ``name`` is neither a built-in set nor an existing file.
    """
    if name in _FILES:
        return list(_read_lines(_FILES[name]))
    if name == "imagenet_dogs":
        return list(_read_lines(_FILES["imagenet_animals"])[IMAGENET_DOGS])
    if name in ("animal_activities", "nouns_activities"):
        return noun_activity_prompts(_read_lines(_FILES["simple_animals"]), _read_lines(_FILES["activities"]))
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        return _read_file(path)
    raise KeyError(f"unknown prompt set {name!r}: use one of {list_prompt_sets()} or a path to a text file")
