"""Command lines for dataclass configs, built by tyro.

tyro makes the parser from the dataclass: one ``--field-name VALUE`` option per field (any
field, lists and dicts included), ``--help`` from the field docstrings, choices from
``Literal`` types. This module adds what the recipes promise on top of it:

- booleans read ``true/false/yes/no/on/off/1/0``, optional fields read ``none``/``null``,
  dict fields read one JSON object (``--reward-kwargs '{"resize": 32}'``), and lists of names
  read space- or comma-separated names or a JSON list (``""`` is the empty list);
- every error is one line that starts with the field's name (:class:`CLIError`), with close
  names suggested for an unknown option; tyro's boxed messages are not shown;
- the names given on the command line are returned with the values, so that a caller can
  tell an explicit setting from a default (presets apply below explicit settings).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import io
import json
import re
import typing
from typing import Any, Literal

import tyro
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null")


class CLIError(ValueError):
    """A command line that cannot be read; the message starts with the field's name."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """For the argparse command lines of the multi-run and pretraining recipes: the description
    (a module docstring) as written, and each option's default after its help (not for flags and
    options without a value, whose help says what their absence means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _read_bool(args: list[str]) -> bool:
    value = args[0].lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"{args[0]!r} is not a boolean")


def _read_none(args: list[str]) -> None:
    if args[0].lower() not in _NONE:
        raise ValueError(f"{args[0]!r} is not none")


def _read_json_object(args: list[str]) -> dict:
    value = json.loads(args[0])
    if not isinstance(value, dict):
        raise ValueError(f"{args[0]!r} is not a JSON object")
    return value


def _read_str_list(args: list[str]) -> list[str]:
    if len(args) == 1 and args[0].strip().startswith("["):
        value = json.loads(args[0])
        if not isinstance(value, list):
            raise ValueError(f"{args[0]!r} is not a JSON list")
        return [str(v) for v in value]
    return [item.strip() for arg in args for item in arg.split(",") if item.strip()]


REGISTRY = ConstructorRegistry()
"""tyro's default rules, with ours for bool, None, dict and list[str] on top."""


@REGISTRY.primitive_rule
def _bool_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    if info.type is not bool:
        return None
    return PrimitiveConstructorSpec(
        nargs=1, metavar="{true,false}", instance_from_str=_read_bool,
        is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda x: [str(x).lower()],
    )


@REGISTRY.primitive_rule
def _none_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    if info.type is not type(None):
        return None
    return PrimitiveConstructorSpec(
        nargs=1, metavar="none", instance_from_str=_read_none,
        is_instance=lambda x: x is None, str_from_instance=lambda x: ["none"],
    )


@REGISTRY.primitive_rule
def _dict_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    if info.type is not dict and info.type_origin is not dict:
        return None
    return PrimitiveConstructorSpec(
        nargs=1, metavar="JSON", instance_from_str=_read_json_object,
        is_instance=lambda x: isinstance(x, dict), str_from_instance=lambda x: [json.dumps(x)],
    )


@REGISTRY.primitive_rule
def _str_list_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    if info.type_origin is not list or typing.get_args(info.type) not in ((str,), ()):
        return None
    return PrimitiveConstructorSpec(
        nargs="*", metavar="NAME[,NAME...]", instance_from_str=_read_str_list,
        is_instance=lambda x: isinstance(x, list), str_from_instance=lambda x: [",".join(map(str, x))],
    )


def _tyro(cls: type, argv: list[str], default: Any, description: str | None, prog: str | None, quiet: bool = True):
    # quiet: tyro's error boxes are replaced by our one-line errors (its value errors print to
    # stderr even with console_outputs=False, hence the redirect)
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        return tyro.cli(
            cls, args=argv, default=cls() if default is None else default, description=description, prog=prog,
            registry=REGISTRY, config=(tyro.conf.FlagConversionOff,), console_outputs=not quiet,
        )


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return re.sub(r"\btyping\.|<class '(\w+)'>", r"\1", str(annotation))


def unknown_field_message(cls: type, name: str) -> str:
    """``unknown config field; did you mean ...?`` for a name that is not a field of ``cls``."""
    close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(cls)], n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"see {cls.__name__} for the fields"
    return f"unknown config field; {hint}"


def option_groups(cls: type, argv: list[str]) -> list[tuple[str, list[str]]]:
    """``--a 1 --b=x y`` -> [("a", ["--a", "1"]), ("b", ["--b=x", "y"])]: each option of ``argv`` with its
    field's name; an unknown name is a :class:`CLIError`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    groups: list[tuple[str, list[str]]] = []
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            if name not in fields:
                raise CLIError(f"{name}: {unknown_field_message(cls, name)}")
            groups.append((name, [arg]))
        elif not groups:
            raise CLIError(f"{arg}: expected --FIELD VALUE pairs (see --help)")
        else:
            groups[-1][1].append(arg)
    return groups


def parse(
    cls: type, argv: list[str], default: Any = None, description: str | None = None, prog: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Parse ``argv`` into ``cls``; returns ``(instance, {field: value given on the command line})``.

    Fields not on the command line take ``default``'s values (``cls()`` if None). ``--help``
    prints tyro's help text and exits. Any error raises :class:`CLIError`, one line naming the field.
    """
    if any(a in ("-h", "--help") for a in argv):
        _tyro(cls, ["--help"], default, description, prog, quiet=False)  # prints, exits 0
    groups = option_groups(cls, argv)
    try:
        parsed = _tyro(cls, argv, default, description, prog)
    except SystemExit:
        # tyro rejected the line: find the field by reading each option alone (error path only)
        hints = typing.get_type_hints(cls)
        for name, tokens in groups:
            try:
                _tyro(cls, tokens, default, description, prog)
            except SystemExit:
                values = [tokens[0].split("=", 1)[1]] if "=" in tokens[0] else []
                values += tokens[1:]
                if not values:
                    raise CLIError(f"{name}: missing value") from None
                raise CLIError(f"{name}: cannot read {' '.join(values)!r} as {_type_name(hints[name])}") from None
        raise CLIError(f"command line: cannot read {' '.join(argv)!r} (see --help)") from None
    return parsed, {name: getattr(parsed, name) for name, _ in groups}


def help_text(cls: type, default: Any = None, description: str | None = None, prog: str | None = None) -> str:
    """tyro's ``--help`` for ``cls`` as plain text: a ``  --field-name TYPE`` line per field, its docstring, its default."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        _tyro(cls, ["--help"], default, description, prog, quiet=False)
    # written to a non-terminal, tyro's help is plain text; drop colour codes and trailing blanks
    text = re.sub(r"\x1b\[[0-9;]*m", "", buf.getvalue())
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"
