"""The run directory as a guarded unit: lock, stale-lock takeover, fresh-run refusal, resume changes."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ddpo_rl.config import ConfigError
from ddpo_rl.run_dir import (
    LOCK_NAME, RunDir, RunLock, check_directory_path, describe_run, lines_up_to_epoch, prepare_output_dir,
    prepare_output_file, resume_changes,
)

FILES = ("config.json", "metrics.jsonl", "checkpoints", "summary.json")


def _fake_run(d, last_epoch: int, epochs: int, finished: bool):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"epochs": epochs}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, last_epoch + 1)))
    (d / "checkpoints").mkdir(exist_ok=True)
    if finished:
        (d / "summary.json").write_text("{}")


def test_output_dir_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir: .* is a file"):
        check_directory_path(str(tmp_path / "f" / "run"))
    with pytest.raises(ConfigError, match="output_dir: .*is a file, not a directory"):
        RunDir(str(tmp_path / "f"), FILES).open()


def test_second_lock_on_a_directory_names_the_holder_and_is_free_after_release(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    with pytest.raises(ConfigError) as err:
        RunLock(str(tmp_path)).acquire()
    assert f"in use by another run (pid {os.getpid()} on " in str(err.value) and "started" in str(err.value)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(str(tmp_path)).acquire().release()


def test_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path, capsys):
    read_end, write_end = os.pipe()
    pid = os.fork()  # the holder: a process that takes the lock and is then SIGKILLed (no cleanup runs)
    if pid == 0:
        try:
            RunLock(str(tmp_path)).acquire()
            os.write(write_end, b"L")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(read_end, 1) == b"L"
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {pid} "):
            RunLock(str(tmp_path)).acquire()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    assert (tmp_path / LOCK_NAME).exists()
    lock = RunLock(str(tmp_path)).acquire()
    try:
        assert lock.taken_over["pid"] == pid
        assert f"taking over the lock of {tmp_path} left by pid {pid}" in capsys.readouterr().err
    finally:
        lock.release()


@pytest.mark.parametrize("finished, described", [(True, "a finished run (3 of 3 epochs)"),
                                                  (False, "an interrupted run (stopped after epoch 2 of 3)")])
def test_fresh_run_into_an_earlier_run_is_refused_unless_overwrite(tmp_path, finished, described):
    run = tmp_path / "run"
    _fake_run(run, 3 if finished else 2, 3, finished)
    (run / "notes.txt").write_text("mine")  # not a run file: never removed
    assert describe_run(str(run)) == described
    before = sorted(os.listdir(run))
    with pytest.raises(ConfigError) as err:
        RunDir(str(run), FILES).open()
    msg = str(err.value)
    assert described in msg and "--overwrite true" in msg and f"--resume {run}" in msg
    assert sorted(os.listdir(run)) == before  # refused: nothing changed, no lock left
    d = RunDir(str(run), FILES).open(overwrite=True)
    kept = sorted(n for n in os.listdir(run) if n != LOCK_NAME)
    assert d.earlier_run == described and kept == before  # kept until the run can start
    d.clear_earlier_run()
    d.close()
    assert sorted(os.listdir(run)) == ["notes.txt"]


def test_resume_of_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="resume: .* is not a run directory"):
        RunDir(str(tmp_path / "nope"), FILES).open(resume=True)
    assert not (tmp_path / "nope").exists()


def test_resume_changes_refuse_fixed_fields_and_record_changeable_ones():
    stored = {"algorithm": "ddpo_is", "epochs": 2, "learning_rate": 3e-4, "resume": None}
    new = {"algorithm": "ddpo_is", "epochs": 5, "learning_rate": 1e-2, "resume": "/r", "added_later": 0}
    changes = resume_changes(stored, new, {"epochs", "learning_rate"}, defaults={"added_later": 0})
    assert changes == {"epochs": {"from": 2, "to": 5}, "learning_rate": {"from": 3e-4, "to": 1e-2}}
    with pytest.raises(ConfigError, match=r"^algorithm: cannot change on resume \(the run has 'ddpo_is'"):
        resume_changes(stored, {**new, "algorithm": "rwr"}, {"epochs", "learning_rate"})
    # a field nobody declared changeable is fixed, including one added to the code since the run
    with pytest.raises(ConfigError, match="^added_later: cannot change"):
        resume_changes(stored, {**new, "added_later": 1}, {"epochs", "learning_rate"}, defaults={"added_later": 0})



# --- lines_up_to_epoch: what a resumed run keeps of its logs


def _log(path, text: str):
    path.write_text(text)
    return str(path)


def test_lines_after_the_checkpoint_and_a_torn_last_line_are_dropped(tmp_path):
    lines = [json.dumps({"epoch": e, "reward_mean": 0.1 * e}) + "\n" for e in (1, 2, 3, 4)]
    assert lines_up_to_epoch(_log(tmp_path / "m.jsonl", "".join(lines)), 2) == lines[:2]
    assert lines_up_to_epoch(_log(tmp_path / "m.jsonl", "".join(lines) + "\n"), 4) == lines  # blank lines skipped
    torn = "".join(lines[:3]) + lines[3][:10]  # a kill during the write of epoch 4's line
    assert lines_up_to_epoch(_log(tmp_path / "m.jsonl", torn), 4) == lines[:3]
    no_newline = "".join(lines[:3]) + lines[3].rstrip("\n")  # complete JSON, but its write did not finish
    assert lines_up_to_epoch(_log(tmp_path / "m.jsonl", no_newline), 4) == lines[:3]


@pytest.mark.parametrize("bad, what", [('{"epoch": 1, "re\n', "line 2 is not JSON"),
                                       ('{"reward_mean": 1.0}\n', "line 2 has no integer 'epoch'")])
def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, bad, what):
    path = _log(tmp_path / "eval.jsonl", '{"epoch": 0}\n' + bad + '{"epoch": 2}\n')
    with pytest.raises(ValueError, match=f"eval.jsonl: {what}"):
        lines_up_to_epoch(path, 5)


def test_prepare_output_file_refuses_what_cannot_be_written_and_makes_the_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="^json: .* is a directory; give a file path"):
        prepare_output_file(str(tmp_path), "json")
    with pytest.raises(ConfigError, match="^json: .* is a file"):
        prepare_output_file(str(tmp_path / "file" / "report.json"), "json")
    target = tmp_path / "new" / "deeper" / "report.json"
    assert prepare_output_file(str(target), "json") == str(target)
    assert target.parent.is_dir() and not target.exists()  # the folder only: the file comes with the results


def test_prepare_output_dir_checks_what_an_atomic_save_needs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="^out: .* is a file"):
        prepare_output_dir(str(tmp_path / "file" / "model"), "out")
    target = tmp_path / "models" / "digits"
    assert prepare_output_dir(str(target), "out") == str(target)
    assert sorted(os.listdir(tmp_path / "models")) == []  # the parent made, the probe file gone
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="^out: "):
            prepare_output_dir(str(locked / "model"), "out")


def test_a_directory_made_for_a_run_that_wrote_nothing_is_removed_on_close(tmp_path):
    """Set-up can fail after the directory is made (a model's own limits are known once it is loaded):
    no empty run directory is left behind. One the run wrote into, or one that was there before, stays."""
    fresh = tmp_path / "fresh"
    RunDir(str(fresh), ["config.json"]).open().close()
    assert not fresh.exists()

    used = tmp_path / "used"
    run_dir = RunDir(str(used), ["config.json"]).open()
    (used / "config.json").write_text("{}")
    run_dir.close()
    assert (used / "config.json").exists()

    there = tmp_path / "there"
    there.mkdir()
    RunDir(str(there), ["config.json"]).open().close()
    assert there.is_dir()
