"""Files and directories written whole or not at all: a run directory never holds a torn file.

Every file a run (or a multi-run recipe) writes at once, rather than appends to, goes through here:
summary.json, config.json, the sample grids and reward curves, the tables of kl_front and
compare_algorithms, and the trained weights under final/ and best/. A kill (SIGKILL, OOM, power)
at any instant leaves either the complete previous version or the complete new one, never a
truncated JSON or half a safetensors file under the real name.

How (POSIX ``rename`` is atomic):

1. write into a temporary sibling (``.NAME.tmp-PID``: same directory, so same filesystem),
   flush and fsync it;
2. ``os.replace`` it over the real name, then fsync the directory so the rename is durable.

A directory cannot be renamed over a non-empty one, so :func:`atomic_directory` moves the old one
aside first (``.NAME.old-PID``) and removes it once the new one is in place; a kill between the two
renames leaves the previous version under that name (:func:`recover_directory` puts it back). A
failure while writing removes the temporary and leaves the previous version untouched.
Checkpoints have their own writer (ddpo_rl/checkpoint.py: checksummed and rotated) on the same rule.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ddpo_rl.jsonl import dumps


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames inside ``directory`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; whatever the body writes there replaces ``path``
    when the body returns (fsync, rename), and is removed if it raises. Creates parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return os.fspath(path)


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> str:
    """``obj`` as standard JSON (plus a newline; a non-finite float as null, :func:`ddpo_rl.jsonl.dumps`)
    to ``path`` atomically; returns ``path``. A value JSON cannot encode raises before anything is
    written."""
    return write_text(path, dumps(obj, indent=indent) + "\n")


def save_image(image, path: str | os.PathLike) -> str:
    """Save a PIL image atomically, in the format its extension names (PNG when it has none)."""
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "": "PNG"}.get(ext, ext.upper())
    with atomic_file(path) as tmp:
        image.save(tmp, format=fmt)
    return os.fspath(path)


def recover_directory(path: str | os.PathLike) -> bool:
    """If a kill struck :func:`atomic_directory` between its two renames (``path`` missing, its
    previous version set aside as ``.NAME.old-PID``), move that version back. True if it did."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not aside:
        return False
    os.replace(aside[-1], path)
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory next to ``path``; when the body returns it replaces
    ``path`` (the previous version is moved aside, then removed); if the body raises, it is removed
    and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = _sibling(path, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, path)


def replace_directory(src: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the complete directory ``src`` (same filesystem) to ``path``, replacing what was there
    by the same two renames as :func:`atomic_directory`: a kill leaves ``path`` whole, old or new
    (after :func:`recover_directory`), and ``src`` in place until it has moved."""
    path = Path(path)
    recover_directory(path)
    _swap_in(Path(src), path)


def _swap_in(new: Path, path: Path) -> None:
    old = _sibling(path, "old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(new, path)
    fsync_dir(path.parent)
    if new.parent != path.parent:
        fsync_dir(new.parent)
    shutil.rmtree(old, ignore_errors=True)
