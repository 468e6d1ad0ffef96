"""ddpo_rl.atomic: a file or directory is replaced whole or not at all, whatever fails in between."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from PIL import Image

from ddpo_rl import atomic
from tests.helpers import ROOT, subprocess_env


def _names(directory) -> set[str]:
    return set(os.listdir(directory))


def test_write_json_and_text_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"a": 2, "b": [1.5]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1.5]}
    atomic.write_text(tmp_path / "sub" / "table.md", "| x |\n")
    assert (tmp_path / "sub" / "table.md").read_text() == "| x |\n"
    assert _names(tmp_path / "sub") == {"summary.json", "table.md"}


def test_a_failure_while_writing_keeps_the_previous_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic.write_json(path, {"epoch": 3})
    with pytest.raises(TypeError):  # not JSON: fails before anything is written
        atomic.write_json(path, {"epoch": object()})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_file(path) as tmp:
            tmp.write_text('{"epoch": 4, "half')  # half a record written, then the writer dies
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"epoch": 3}
    assert _names(tmp_path) == {"summary.json"}


def test_a_failing_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic.write_json(path, {"v": 1})

    def no_rename(*args):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        atomic.write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and _names(tmp_path) == {"config.json"}


@pytest.mark.parametrize("ext", [".png", ".jpg", ""])
def test_save_image_in_the_extension_s_format(tmp_path, ext):
    path = tmp_path / f"grid{ext}"
    atomic.save_image(Image.new("RGB", (4, 3), "red"), path)
    with Image.open(path) as back:
        assert back.size == (4, 3) and back.format == {".png": "PNG", ".jpg": "JPEG", "": "PNG"}[ext]
    assert _names(tmp_path) == {path.name}


def test_directory_replaced_whole_and_kept_on_failure(tmp_path):
    path = tmp_path / "best"
    with atomic.atomic_directory(path) as tmp:
        (tmp / "weights.bin").write_bytes(b"epoch 10")
        (tmp / "unet").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(path) as tmp:
            (tmp / "weights.bin").write_bytes(b"epo")  # half of the new weights, then a kill
            raise KeyboardInterrupt
    assert (path / "weights.bin").read_bytes() == b"epoch 10" and (path / "unet").is_dir()
    assert _names(tmp_path) == {"best"}
    with atomic.atomic_directory(path) as tmp:
        (tmp / "weights.bin").write_bytes(b"epoch 20")
    assert _names(path) == {"weights.bin"} and (path / "weights.bin").read_bytes() == b"epoch 20"
    assert _names(tmp_path) == {"best"}


def test_a_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    """The old directory was moved aside and the new one not yet moved in: the next write (or
    recover_directory) puts the old one back first, so its content is never lost."""
    path = tmp_path / "final"
    with atomic.atomic_directory(path) as tmp:
        (tmp / "w").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the second rename: the new directory into place
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(path) as tmp:
            (tmp / "w").write_text("new")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not path.exists() and any(n.startswith(".final.old-") for n in _names(tmp_path))
    assert atomic.recover_directory(path) is True
    assert (path / "w").read_text() == "old"
    assert atomic.recover_directory(path) is False  # nothing to do when the directory is there


def test_sigkill_during_a_long_write_leaves_the_previous_file_whole(tmp_path):
    """A real kill (SIGKILL, no cleanup runs) while a large file is being written."""
    path = tmp_path / "summary.json"
    atomic.write_json(path, {"epoch": 1})
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        from ddpo_rl import atomic
        with atomic.atomic_file({str(path)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write('{{"epoch": 2, "pad": "')
                f.flush()
                open({str(started)!r}, "w").close()
                while True:
                    f.write("x" * 4096)
                    f.flush()
                    time.sleep(0.001)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env())
    try:
        for _ in range(600):
            if started.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert started.exists(), "the writer did not start"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert json.loads(path.read_text()) == {"epoch": 1}


def test_replace_directory_moves_a_complete_directory_over_another(tmp_path, monkeypatch):
    """A complete directory (a run's pending best weights) moved over best/: afterwards best/ is the
    moved one and nothing is left beside it; a kill between the two renames leaves the old best/ to
    recover and the source still in place, so the move can be made again."""
    (tmp_path / "checkpoints").mkdir()
    src, path = tmp_path / "checkpoints" / "pending", tmp_path / "best"
    for d, text in ((src, "new"), (path, "old")):
        d.mkdir()
        (d / "w").write_text(text)
    real_replace, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(a, b)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_directory(src, path)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not path.exists() and (src / "w").read_text() == "new"
    atomic.replace_directory(src, path)  # recovers the old best/ first, then moves
    assert (path / "w").read_text() == "new" and not src.exists()
    assert _names(tmp_path) == {"best", "checkpoints"} and _names(tmp_path / "checkpoints") == set()
