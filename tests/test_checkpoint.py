"""Checkpoints: checksummed, rotated, verified before unpickling, with a fallback to the previous one."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from ddpo_rl.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    previous_path,
    read_checkpoint,
    run_dir_of,
    verify_checkpoint,
)


def _tree_digest(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _two_checkpoints(tmp_path):
    path = str(tmp_path / "checkpoints" / "checkpoint.pt")
    atomic_torch_save({"epoch": 1, "w": torch.randn(4096)}, path)
    atomic_torch_save({"epoch": 2, "w": torch.randn(4096)}, path)
    return path


def _damage(path: str, how: str) -> None:
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "zero_bytes":
        data = b""
    elif how == "text":
        data = b"this is not a checkpoint\n"
    elif how == "overwritten_4k":  # inside the payload, as a bad disk block would
        mid = len(data) // 3
        data = data[:mid] + os.urandom(4096) + data[mid + 4096 :]
    elif how == "trailer_cut":
        data = data[:-10]
    with open(path, "wb") as f:
        f.write(data)


def test_save_keeps_the_previous_checkpoint_and_stays_torch_loadable(tmp_path):
    path = _two_checkpoints(tmp_path)
    assert torch.load(path, weights_only=False)["epoch"] == 2  # the trailer does not stop torch.load
    assert torch.load(previous_path(path), weights_only=False)["epoch"] == 1
    assert verify_checkpoint(path)["kind"] == "ddpo"
    loaded = read_checkpoint(str(tmp_path))
    assert (loaded.state["epoch"], loaded.fell_back, loaded.notes) == (2, False, [])


DAMAGES = ["truncated", "zero_bytes", "text", "overwritten_4k", "trailer_cut"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_falls_back_to_previous_and_says_so(tmp_path, how):
    path = _two_checkpoints(tmp_path)
    _damage(path, how)
    before = _tree_digest(tmp_path)
    loaded = read_checkpoint(str(tmp_path))
    assert loaded.fell_back and loaded.state["epoch"] == 1 and loaded.path == previous_path(path)
    assert path in loaded.notes[0] and "previous checkpoint" in loaded.notes[0]
    assert _tree_digest(tmp_path) == before  # reading changes nothing on disk


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_without_a_sound_previous_is_one_error_naming_the_file(tmp_path, how):
    path = _two_checkpoints(tmp_path)
    os.remove(previous_path(path))
    _damage(path, how)
    before = _tree_digest(tmp_path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(tmp_path))
    msg = str(err.value)
    assert msg.startswith("resume: ") and path in msg and "\n" not in msg
    assert _tree_digest(tmp_path) == before


def test_overwritten_bytes_are_caught_by_the_checksum(tmp_path):
    path = _two_checkpoints(tmp_path)
    _damage(path, "overwritten_4k")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(path)


def test_foreign_checkpoint_is_refused_not_fallen_back_from(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_torch_save({"noise_model": {}}, path, kind="dppo_gym")
    atomic_torch_save({"noise_model": {}}, path, kind="dppo_gym")
    with pytest.raises(CheckpointError, match="'dppo_gym' recipe, not by 'ddpo'") as err:
        read_checkpoint(str(tmp_path), kind="ddpo")
    assert err.value.foreign


def test_checkpoint_without_a_trailer_loads_unverified_with_a_note(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"epoch": 3, "trainable": {}}, path)  # as written before checksums existed
    loaded = read_checkpoint(path, kind="ddpo", required=("trainable",))
    assert loaded.state["epoch"] == 3 and "no checksum" in loaded.notes[0]
    torch.save({"noise_model": {}}, path)  # an old dppo_gym checkpoint: foreign by its content
    with pytest.raises(CheckpointError, match="no 'trainable' entry"):
        read_checkpoint(path, kind="ddpo", required=("trainable",))


def test_missing_checkpoint_says_the_run_cannot_be_resumed(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in .*start it again"):
        read_checkpoint(str(tmp_path))


def test_run_dir_of_resume_paths(tmp_path):
    path = _two_checkpoints(tmp_path)
    root = str(tmp_path)
    assert run_dir_of(root) == root
    assert run_dir_of(os.path.join(root, "checkpoints")) == root
    assert run_dir_of(path) == root
