"""The run directory's JSON: standard JSON that every reader parses, a record per line appended whole.

Python's ``json`` writes a non-finite float as ``NaN`` / ``Infinity``, which is not JSON: ``jq``,
JavaScript, pandas' ``lines=True`` reader in strict mode and most dashboards refuse the whole file.
A run records values that can be non-finite (the loss of an optimizer step that was undone, the
reward of an evaluation whose every sample was dropped), so every JSON file of a run goes through
:func:`dumps`, which writes such a value as ``null``: "no value", the same as a figure that was not
measured. Nothing else changes: finite floats keep their exact ``repr``.

metrics.jsonl and eval.jsonl get one :func:`append_record` per epoch: the line is written with a
single ``write`` and flushed, so a reader (or a kill) never sees half a line followed by another
record; :func:`read_records` reads them back (a torn last line, left by a kill mid-write, is
``RunDir``'s to cut on resume).
"""

from __future__ import annotations

import json
import math
import os


def finite_or_none(obj):
    """``obj`` with every non-finite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` that writes standard JSON: non-finite floats become ``null``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` to the JSON-lines file ``path`` as one line (one write, flushed)."""
    line = dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of the JSON-lines file ``path`` (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
