"""The run directory's JSON is standard JSON: a non-finite value is written as null, never as NaN."""

import json
import math

import pytest

from ddpo_rl.atomic import write_json
from ddpo_rl.jsonl import append_record, dumps, finite_or_none, read_records


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_become_null_everywhere_and_finite_ones_keep_their_value():
    record = {"loss": float("nan"), "grad_norm": float("inf"), "x": -float("inf"), "reward_mean": 0.1 + 0.2,
              "nested": {"m": [1.5, float("nan"), {"k": float("inf")}], "t": (float("nan"), 2)}, "n": 3, "s": "NaN",
              "b": True, "none": None}
    out = _strict(dumps(record))
    assert out == {"loss": None, "grad_norm": None, "x": None, "reward_mean": 0.1 + 0.2,
                   "nested": {"m": [1.5, None, {"k": None}], "t": [None, 2]}, "n": 3, "s": "NaN", "b": True,
                   "none": None}
    assert finite_or_none(float("nan")) is None and finite_or_none(2.0) == 2.0
    with pytest.raises(ValueError):  # what the standard library writes, and what the reader refuses
        _strict(json.dumps({"loss": math.nan}))


def test_append_and_read_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_records(path) == []
    append_record(path, {"epoch": 1, "loss": float("nan")})
    append_record(path, {"epoch": 2, "loss": 0.5})
    lines = path.read_text().splitlines()
    assert [_strict(ln) for ln in lines] == [{"epoch": 1, "loss": None}, {"epoch": 2, "loss": 0.5}]
    assert read_records(path) == [{"epoch": 1, "loss": None}, {"epoch": 2, "loss": 0.5}]


def test_write_json_writes_standard_json(tmp_path):
    path = write_json(tmp_path / "summary.json", {"final": {"reward_mean": float("nan")}, "gain": 1.25})
    assert _strict(open(path).read()) == {"final": {"reward_mean": None}, "gain": 1.25}
