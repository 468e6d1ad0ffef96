"""A benchmark refuses a report path it could not write before it measures anything (one line, exit 2),
and writes its JSON into a folder it creates."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT, subprocess_env


def _env_overhead(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "env_overhead.py"), *args],
                          env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_report_path_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, what in ((tmp_path, "is a directory"), (tmp_path / "file" / "r.json", "is a file")):
        res = _env_overhead("--batch", "2", "--steps", "2", "--json", str(bad))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: json: "), res.stderr[-2000:]
        assert what in lines[0] and "ms/step" not in res.stdout + res.stderr  # nothing was measured (no table)


def test_the_report_goes_to_a_new_folder(tmp_path):
    out = tmp_path / "reports" / "env_overhead.json"
    res = _env_overhead("--batch", "2", "--steps", "2", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(out.read_text())["schema"] == "ddpo_rl.benchmarks.env_overhead/1"
