"""Checkpoints that survive a kill and cannot be loaded damaged: checksummed, rotated, verified.

Writing (:func:`save_checkpoint`):

1. ``torch.save`` to ``checkpoint.pt.tmp``, hashing the bytes as they are written (sha256);
2. append a small trailer: a JSON record (format, kind, sha256, payload size) + its length + a magic
   line. ``torch.load`` still reads the file directly (a zip archive tolerates a short trailer);
3. fsync, then keep the current ``checkpoint.pt`` as ``checkpoint.prev.pt`` (a hard link, so at every
   instant a complete ``checkpoint.pt`` exists) and rename the new file over ``checkpoint.pt``.

``os.replace`` is atomic on POSIX, so a kill at any moment leaves a complete newest checkpoint, or
the previous one (at worst a stray ``*.tmp`` file, overwritten by the next save).

Reading (:func:`read_checkpoint`): the file's trailer is checked and its payload hashed BEFORE it is
unpickled; a zero-byte, truncated, overwritten, text or foreign (another recipe's ``kind``) file gives
a :class:`CheckpointError` naming the file and what is wrong. When the newest checkpoint is damaged
and ``checkpoint.prev.pt`` is sound, the previous one is used and the caller is told so. Nothing on
disk is changed by reading. Files written before checksums existed (no trailer) load unverified,
with a note.

What a training checkpoint holds (see ``DDPORecipe.state_dict`` in recipes/ddpo_recipe.py): the
trainable weights (LoRA adapters or the full UNet), the optimizer, the per-prompt reward
statistics, every RNG state, the epoch, the config and its history.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ddpo_rl.atomic import atomic_directory, fsync_dir

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "ddpo_rl.checkpoint/1"
_MAGIC = b"\nDDPO_RL_CHECKPOINT_TRAILER_V1\n"
_LEN_DIGITS = 8
_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, foreign, unreadable, missing), with the file named."""

    def __init__(self, message: str, foreign: bool = False):
        super().__init__(message)
        self.foreign = foreign
        """Another recipe's (or another kind of) file rather than a damaged one: never fallen back from."""


def previous_path(path: str) -> str:
    """``.../checkpoint.pt`` -> ``.../checkpoint.prev.pt`` (the checkpoint kept until the next one is complete)."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        b = memoryview(b).cast("B")
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj, path: str, kind: str = "ddpo", keep_previous: bool = True) -> str:
    """``torch.save`` ``obj`` to ``path`` with a checksum trailer, atomically (tmp, fsync, rename).

    With ``keep_previous``, the file it replaces stays as :func:`previous_path` until the new one is
    complete. ``kind`` names the recipe that wrote it (checked by :func:`read_checkpoint`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
        meta = json.dumps({"format": FORMAT, "kind": kind, "sha256": w.sha.hexdigest(), "payload_bytes": w.n})
        f.write(_MAGIC + meta.encode() + f"{len(meta):0{_LEN_DIGITS}d}".encode() + _MAGIC)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and os.path.isfile(path):
        prev, prev_tmp = previous_path(path), previous_path(path) + ".tmp"
        try:  # a second name for the current file: checkpoint.pt itself never disappears
            if os.path.lexists(prev_tmp):
                os.remove(prev_tmp)
            os.link(path, prev_tmp)
            os.replace(prev_tmp, prev)
        except OSError:  # no hard links on this filesystem: move it (a kill here leaves only prev)
            os.replace(path, prev)
    os.replace(tmp, path)
    fsync_dir(directory)
    return path


def _read_trailer(path: str, size: int) -> dict | None:
    """The trailer's record, None when the file has no trailer; CheckpointError when it is garbled."""
    tail_len = len(_MAGIC) + _LEN_DIGITS
    if size < tail_len:
        return None
    with open(path, "rb") as f:
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        if tail[_LEN_DIGITS:] != _MAGIC:
            f.seek(max(0, size - 4096))
            if _MAGIC in f.read():  # our trailer, cut short: not an old trailer-less file
                raise CheckpointError("its checksum trailer is cut short (the file was truncated or modified)")
            return None
        try:
            n = int(tail[:_LEN_DIGITS])
            f.seek(size - tail_len - n - len(_MAGIC))
            head = f.read(len(_MAGIC) + n)
            if head[: len(_MAGIC)] != _MAGIC:
                raise ValueError
            meta = json.loads(head[len(_MAGIC) :])
            if meta["payload_bytes"] + len(_MAGIC) * 2 + n + _LEN_DIGITS != size:
                raise ValueError
        except (ValueError, KeyError, TypeError, OSError):
            raise CheckpointError("its checksum trailer is garbled (the file was modified after it was written)") from None
    return meta


def verify_checkpoint(path: str, kind: str | None = None) -> dict | None:
    """Check ``path`` without unpickling it: the trailer, the payload's sha256 and the writer's kind.

    Returns the trailer's record (None for a file written before checksums, which cannot be
    verified); raises :class:`CheckpointError` saying what is wrong (not naming the file).
    """
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError("it is empty (0 bytes)")
    meta = _read_trailer(path, size)
    if meta is None:
        with open(path, "rb") as f:
            start = f.read(4)
        if start != b"PK\x03\x04":
            what = "text" if all(32 <= c < 127 or c in (9, 10, 13) for c in start) else "not a torch archive"
            raise CheckpointError(f"it is not a checkpoint ({what}, no checksum trailer)")
        return None  # an older checkpoint without a trailer (or one cut short: torch.load will tell)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"its format {meta.get('format')!r} is not {FORMAT!r}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"it was written by the {meta.get('kind')!r} recipe, not by {kind!r}: a foreign checkpoint", foreign=True)
    sha, left = hashlib.sha256(), meta["payload_bytes"]
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    if sha.hexdigest() != meta["sha256"]:
        raise CheckpointError("checksum mismatch: its content was damaged after it was written")
    return meta


def find_checkpoint(path: str) -> str:
    """Accept a run directory, its checkpoints/ folder, or the file itself."""
    candidates = [path, os.path.join(path, CHECKPOINT_NAME), os.path.join(path, "checkpoints", CHECKPOINT_NAME)]
    for c in candidates:
        if os.path.isfile(c) or os.path.isfile(previous_path(c)):
            return c
    raise CheckpointError(
        f"resume: no checkpoint in {path!r} (looked for {CHECKPOINT_NAME} there and in its checkpoints/ folder); "
        "a run stopped before its first checkpoint cannot be resumed: start it again (into the same "
        "directory with --overwrite true)"
    )


def run_dir_of(path: str) -> str:
    """The run directory a ``--resume`` path names: the directory itself, or the one holding the
    checkpoint file / the checkpoints/ folder given."""
    path = os.path.abspath(path)
    if os.path.isfile(path) or not os.path.isdir(path):
        path = os.path.dirname(path)
    if os.path.basename(path) == "checkpoints" and not os.path.exists(os.path.join(path, "config.json")):
        path = os.path.dirname(path)
    return path


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint's content and where it came from."""

    state: dict
    path: str
    """The file the state was read from."""
    fell_back: bool = False
    """True when the newest checkpoint was unusable and the previous one was read instead."""
    notes: list[str] = field(default_factory=list)
    """What the caller should tell the user (a fallback, an unverified older file)."""


def _load_one(path: str, kind: str | None, required: tuple[str, ...], map_location) -> tuple[dict, list[str]]:
    notes = []
    meta = verify_checkpoint(path, kind)
    if meta is None:
        notes.append(f"{path} has no checksum (written by an older ddpo_rl): loaded unverified")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, EOF: torch reports them in many ways
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise CheckpointError(f"it cannot be read, truncated or damaged ({type(err).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"it holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"it is not a {kind or 'training'} checkpoint (no {missing[0]!r} entry): a foreign file", foreign=True)
    return state, notes


def read_checkpoint(
    path: str, kind: str | None = "ddpo", required: tuple[str, ...] = (), map_location="cpu", field_name: str = "resume"
) -> LoadedCheckpoint:
    """Verify and load the checkpoint at ``path`` (a run directory, its checkpoints/ or the file).

    Falls back to ``checkpoint.prev.pt`` when the newest is damaged or missing (``fell_back``).
    Raises :class:`CheckpointError` (``"<field_name>: <file>: <what is wrong>"``) when neither is
    usable or the newest is foreign. Changes nothing on disk.
    """
    newest = find_checkpoint(path)
    problems = []
    for candidate in (newest, previous_path(newest)):
        if not os.path.isfile(candidate):
            problems.append((candidate, "it does not exist"))
            continue
        try:
            state, notes = _load_one(candidate, kind, required, map_location)
        except CheckpointError as err:
            if err.foreign:  # not a damaged file: falling back would hide the mistake
                raise CheckpointError(f"{field_name}: {candidate}: {err}", foreign=True) from None
            problems.append((candidate, str(err)))
            continue
        fell_back = candidate != newest
        if fell_back:
            notes.insert(0, f"{newest}: {problems[0][1]}; resuming from the previous checkpoint {candidate} "
                            f"(epoch {state.get('epoch', '?')}) instead")
        return LoadedCheckpoint(state, candidate, fell_back, notes)
    (f0, p0), (f1, p1) = problems
    raise CheckpointError(f"{field_name}: {f0}: {p0}; and the previous checkpoint {f1}: {p1}")


def load_checkpoint(path: str, map_location="cpu", kind: str | None = None) -> dict:
    """The state of :func:`read_checkpoint` (verified, with the same fallback)."""
    return read_checkpoint(path, kind=kind, map_location=map_location).state


def rng_state(*generators: torch.Generator) -> dict:
    """Every random stream a run draws from: python, numpy, torch (CPU, CUDA) and given generators."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def network_subfolder(network) -> str:
    """The pipeline component a trained network is saved as: ``"transformer"`` for an SD3-style
    transformer (``SD3Transformer2DModel``: the flow-matching family), ``"unet"`` otherwise."""
    from ddpo_rl.lora import _lora_format

    return _lora_format(network)[1]


STATE_DICT_NAME = "model.safetensors"
"""What :func:`save_trained_weights` names the state dict of a network that has no ``save_pretrained``."""

WEIGHTS_INFO_NAME = "ddpo_rl.json"
"""The file inside final/ and best/ that says which training state the weights are (epoch, run)."""


def read_weights_info(directory: str) -> dict | None:
    """The ``info`` :func:`save_trained_weights` stored with the weights in ``directory``; None when
    there are none (no directory, weights saved without info, or by an older ddpo_rl)."""
    try:
        with open(os.path.join(directory, WEIGHTS_INFO_NAME)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def save_trained_weights(network, directory: str, use_lora: bool, info: dict | None = None) -> str:
    """The trained weights in diffusers format under ``directory`` (a run's final/ or best/).

    With LoRA: the adapters in the format of the network's pipeline (``pytorch_lora_weights.safetensors``,
    read by ``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights``). A full fine-tune:
    ``network.save_pretrained(directory/<subfolder>)``, the subfolder being the pipeline's component name
    (:func:`network_subfolder`: ``unet/``, or ``transformer/`` for SD3 and the flow-digits model), so the
    folder drops into a pipeline directory in place of the base model's. Written whole or not at all
    (:func:`~ddpo_rl.atomic.atomic_directory`): the directory's previous content is replaced only once
    the new one is complete. ``info`` (JSON-able, e.g. the epoch and the run) goes into
    ``directory/ddpo_rl.json`` with the weights, so that a copied final/ or best/ still says what it
    holds (:func:`read_weights_info`). A network of your own without ``save_pretrained`` (not a
    diffusers model) is not skipped: its ``state_dict`` goes to ``<subfolder>/`` +
    :data:`STATE_DICT_NAME` (safetensors; load it with ``safetensors.torch.load_model``). Returns
    ``directory``.
    """
    with atomic_directory(directory) as tmp:  # a kill mid-save leaves the previous final/ or best/ whole
        if use_lora:
            from ddpo_rl.lora import save_lora_weights

            save_lora_weights(network, tmp)
        elif hasattr(network, "save_pretrained"):
            network.save_pretrained(os.path.join(tmp, network_subfolder(network)))
        else:
            from safetensors.torch import save_model

            sub = os.path.join(tmp, network_subfolder(network))
            os.makedirs(sub)
            save_model(network, os.path.join(sub, STATE_DICT_NAME))
        if info is not None:
            with open(os.path.join(tmp, WEIGHTS_INFO_NAME), "w") as f:
                json.dump(info, f, indent=1)
    return directory
