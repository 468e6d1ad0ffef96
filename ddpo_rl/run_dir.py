"""The run directory as a guarded unit: one run owns it, nothing in it is lost or falsified.

Every recipe opens its output directory through :class:`RunDir`:

1. the path must be creatable (no regular file on the way), else a one-line error naming the field;
2. a lock (``.lock``, an ``flock`` held while the run lives) makes a second run into the same
   directory stop with an error naming the holder (pid, host, start time). The kernel drops the
   lock when its process dies (even on SIGKILL); the next run finds the dead holder's record, says
   so, and takes over;
3. a fresh run into a directory holding an earlier run (finished or interrupted) is refused unless
   told to overwrite; overwriting removes only the recipe's own files (its ``files``), and only once
   the new run can start (:meth:`RunDir.clear_earlier_run`, called by the recipe after its set-up):
   a set-up that fails on bad input (a model that does not load, ...) leaves the earlier run whole;
4. config.json holds the config that runs now plus a ``history`` list: the start, and every
   resume with the fields it changed (``{"from": old, "to": new}``) at the epoch it continued from.

Which config fields may change on resume is declared by each config (for DDPO:
:data:`ddpo_rl.config.CHANGEABLE_ON_RESUME`); :func:`resume_changes` refuses every other change,
so a field nobody declared changeable is fixed on resume.

The lock uses ``fcntl.flock`` (Linux, macOS; NFSv4 emulates it with byte-range locks). Without
``fcntl`` (Windows) the directory is not locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable, Iterable

from ddpo_rl.atomic import write_json
from ddpo_rl.config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows)
    fcntl = None

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
# files whose presence means the directory holds a run (any recipe)
_RUN_MARKERS = (CONFIG_NAME, "metrics.jsonl", "checkpoints", "checkpoint.pt", "summary.json")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def check_directory_path(path: str, field: str = "output_dir") -> None:
    """ConfigError unless ``path`` is, or can be created as, a directory (no file on the way)."""
    p = os.path.abspath(path)
    while True:
        if os.path.lexists(p):
            if not os.path.isdir(p):
                what = "is a file" if p != os.path.abspath(path) else "is a file, not a directory"
                raise ConfigError(f"{field}: {path} cannot be a directory: {p} {what}")
            if p == os.path.abspath(path) or os.access(p, os.W_OK | os.X_OK):
                return
            raise ConfigError(f"{field}: {path} cannot be created: no write permission in {p}")
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


def prepare_output_file(path: str, field: str) -> str:
    """Before any work is done: ConfigError naming ``field`` unless ``path`` can be written as a file
    (not a directory; its folder is, or can be created as, a directory, and takes a file), and that
    folder created, so that a long job (a benchmark, a pretraining) never ends unable to write what it
    made. Returns ``path``."""
    if os.path.isdir(path):
        raise ConfigError(f"{field}: {path} is a directory; give a file path")
    check_directory_path(os.path.dirname(os.path.abspath(path)), field)
    _probe_parent(path, field)
    return path


def prepare_output_dir(path: str, field: str) -> str:
    """:func:`prepare_output_file` for a directory written at the end as a whole (atomically, through
    a temporary sibling): ``path`` is, or can be created as, a directory, and its parent takes files."""
    check_directory_path(path, field)
    _probe_parent(path, field)
    return path


def _probe_parent(path: str, field: str) -> None:
    """Create ``path``'s parent folder and a file in it (removed again): what an atomic write needs."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".ddpo_rl-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"{field}: {path} cannot be written ({err.strerror})") from None


def _holder_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv)[:300],
    }


def _describe_holder(rec: dict | None) -> str:
    if not rec:
        return "its holder has not written its name yet"
    return f"pid {rec.get('pid')} on {rec.get('host')}, started {rec.get('started')}"


class RunLock:
    """An exclusive, process-lifetime lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: str, field: str = "output_dir", log: Callable[[str], None] = _note):
        self.run_dir, self.field, self.log = run_dir, field, log
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd: int | None = None
        self.taken_over: dict | None = None
        """The record of a dead holder whose lock this run took over (None if the lock was free)."""

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            raw = os.pread(fd, 4096, 0)
            return json.loads(raw) if raw.strip() else None
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started": "? (unreadable lock record)"}

    def acquire(self) -> RunLock:
        if fcntl is None or self.fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise ConfigError(
                    f"{self.field}: {self.run_dir} is in use by another run ({_describe_holder(holder)}); "
                    "wait for it to end or stop it, or use another --output-dir"
                ) from None
            try:  # the holder we waited on may have released and unlinked this file: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._read(fd)
        if previous:  # a holder that died without releasing (SIGKILL, power loss): the kernel freed its lock
            self.taken_over = previous
            self.log(f"{self.field}: taking over the lock of {self.run_dir} left by {_describe_holder(previous)}, "
                     "which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiter that opened this file re-checks the inode
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _last_epoch(path: str) -> int | None:
    last = None
    try:
        with open(path) as f:
            for line in f:
                try:
                    last = json.loads(line).get("epoch", last)
                except (ValueError, AttributeError):
                    continue
    except OSError:
        return None
    return last


def lines_up_to_epoch(path: str, epoch: int) -> list[str]:
    """The lines of a run log (metrics.jsonl, eval.jsonl) whose ``epoch`` is <= ``epoch``, each ending
    in a newline: what a run resumed at ``epoch`` keeps. A torn last line (a kill during its write:
    not valid JSON, or no newline) is dropped; a damaged line before it raises ValueError naming the
    file and the line."""
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)
        try:
            record = json.loads(line)
        except ValueError:
            if last:
                break
            raise ValueError(f"{path}: line {number} is not JSON; the run log is damaged (by something else than "
                             "the run: a kill tears only the last line): repair or delete that line, then resume "
                             "again") from None
        if last and not line.endswith("\n"):
            break
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise ValueError(f"{path}: line {number} has no integer 'epoch'; the run log is damaged: repair or delete "
                             "that line, then resume again")
        if record["epoch"] <= epoch:
            keep.append(line)
    return keep


def describe_run(run_dir: str) -> str | None:
    """What earlier run ``run_dir`` holds ("a finished run (6 of 6 epochs)", ...), None if none."""
    found = [m for m in _RUN_MARKERS if os.path.lexists(os.path.join(run_dir, m))]
    if not found:
        return None
    try:
        with open(os.path.join(run_dir, CONFIG_NAME)) as f:
            epochs = json.load(f).get("epochs")
    except (OSError, ValueError, AttributeError):
        epochs = None
    last = _last_epoch(os.path.join(run_dir, "metrics.jsonl"))
    if last is not None and epochs is not None:
        if last >= epochs and os.path.exists(os.path.join(run_dir, "summary.json")):
            return f"a finished run ({last} of {epochs} epochs)"
        return f"an interrupted run (stopped after epoch {last} of {epochs})"
    return f"an earlier run's files ({', '.join(found)})"


def resume_changes(
    stored: dict, new: dict, changeable: Iterable[str], defaults: dict | None = None,
    unrecorded: Iterable[str] = ("resume", "overwrite"),
) -> dict:
    """The fields ``new`` changes from ``stored`` (``{name: {"from": old, "to": new}}``).

    ConfigError naming the first changed field that is not in ``changeable``. A field the stored
    config lacks (added to the code since) counts as having had its default (``defaults``).
    ``unrecorded`` fields (how this command was started) are allowed to differ and not listed.
    """
    changeable, defaults = set(changeable), defaults or {}

    def norm(x):
        return json.loads(json.dumps(x))

    changes = {}
    for name, value in new.items():
        old = stored[name] if name in stored else defaults.get(name)
        if norm(old) == norm(value) or name in unrecorded:
            continue
        if name not in changeable:
            raise ConfigError(
                f"{name}: cannot change on resume (the run has {old!r}, this command gives {value!r}); "
                f"resume with the run's value, or start a new run in another directory "
                f"(changeable on resume: {', '.join(sorted(set(changeable) - set(unrecorded)))})"
            )
        changes[name] = {"from": old, "to": value}
    return changes


def history_entry(event: str, epoch: int, changed: dict | None = None, **extra) -> dict:
    """One record of config.json's ``history``."""
    entry = {"event": event, "epoch": int(epoch), "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if changed is not None:
        entry["changed"] = changed
    entry.update(extra)
    return entry


class RunDir:
    """A recipe's output directory, owned by this run from :meth:`open` to :meth:`close`.

    Args:
        path: the directory.
        files: the names (files or folders) the recipe writes there; an overwrite removes these only.
        field: the config field holding ``path`` (starts error messages).
        overwrite_hint: how the user asks for an overwrite on this recipe's command line.
        resumable: whether the recipe can ``--resume`` (mentioned in the refusal).
    """

    def __init__(self, path: str, files: Iterable[str], field: str = "output_dir",
                 overwrite_hint: str = "--overwrite true", resumable: bool = True):
        self.path, self.files, self.field = path, tuple(files), field
        self.overwrite_hint, self.resumable = overwrite_hint, resumable
        self.lock = RunLock(path, field)
        self.earlier_run: str | None = None
        """The earlier run that :meth:`open` was told to overwrite (:func:`describe_run`), until
        :meth:`clear_earlier_run` removes it."""
        self.created = False
        """Whether :meth:`open` made the directory (:meth:`close` removes it again if nothing was written)."""

    def open(self, resume: bool = False, overwrite: bool = False) -> RunDir:
        """Check, create and lock the directory; refuse a fresh run over an earlier one unless ``overwrite``.

        On refusal nothing is left on disk (the lock is released). An earlier run to overwrite is
        only noted here (:attr:`earlier_run`); :meth:`clear_earlier_run` removes it.
        """
        check_directory_path(self.path, self.field)
        if resume and not os.path.isdir(self.path):
            raise ConfigError(f"resume: {self.path} is not a run directory")
        try:
            self.created = not os.path.lexists(self.path)
            os.makedirs(self.path, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"{self.field}: {self.path} cannot be created ({err.strerror})") from None
        self.lock.acquire()
        try:
            if not resume:
                held = describe_run(self.path)
                if held is not None and not overwrite:
                    how = f"continue it with --resume {self.path}, " if self.resumable else ""
                    raise ConfigError(
                        f"{self.field}: {self.path} holds {held}; use another --{self.field.replace('_', '-')}, "
                        f"{how}or replace it with {self.overwrite_hint}"
                    )
                self.earlier_run = held
        except BaseException:
            self.close()
            raise
        return self

    def clear_earlier_run(self) -> None:
        """Remove the earlier run that :meth:`open` was told to overwrite (the recipe's ``files`` only),
        with a note; nothing when there is none. A recipe calls it once its own set-up has succeeded,
        right before it writes its first file, so that bad input found during the set-up loses nothing."""
        if self.earlier_run is None:
            return
        self.remove_run_files()
        _note(f"{self.field}: removed the earlier run in {self.path} ({self.earlier_run}), "
              f"as asked by {self.overwrite_hint}")
        self.earlier_run = None

    def remove_run_files(self) -> None:
        for name in self.files:
            p = os.path.join(self.path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.remove(p)

    def close(self) -> None:
        """Release the lock; a directory that :meth:`open` made and nothing was written into (set-up failed
        on bad input found late, e.g. a model's own limits) is removed, so that no empty run is left."""
        self.lock.release()
        if self.created:
            with contextlib.suppress(OSError):  # not empty (the run wrote its files): kept
                os.rmdir(self.path)

    def write_config(self, config: dict, history: list[dict]) -> str:
        """config.json: ``config`` (what runs now) plus its ``history``, written atomically."""
        return write_config(self.path, config, history)


def write_config(run_dir: str, config: dict, history: list[dict]) -> str:
    return write_json(os.path.join(run_dir, CONFIG_NAME), {**config, "history": history})


def read_config(run_dir: str) -> tuple[dict, list[dict]]:
    """(config fields, history) from ``run_dir``'s config.json."""
    path = os.path.join(run_dir, CONFIG_NAME)
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a JSON object")
    history = d.pop("history", [])
    return d, history
