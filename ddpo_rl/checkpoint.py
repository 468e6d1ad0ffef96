"""Checkpoints that survive a kill: one file, written to a temporary name, fsynced, then renamed.

``os.replace`` is atomic on POSIX, so a kill during a save leaves the previous checkpoint
intact (at worst a stray ``*.tmp`` file, removed by the next save).

What a training checkpoint holds (see ``DDPORecipe.state_dict`` in recipes/ddpo_recipe.py): the
trainable weights (LoRA adapters or the full UNet), the optimizer, the per-prompt reward
statistics, every RNG state, the epoch and the config.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_torch_save(obj, path: str) -> str:
    """``torch.save`` to ``path`` atomically (write tmp, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def find_checkpoint(path: str) -> str:
    """Accept a run directory, its checkpoints/ folder, or the file itself."""
    candidates = [path, os.path.join(path, CHECKPOINT_NAME), os.path.join(path, "checkpoints", CHECKPOINT_NAME)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"resume: no checkpoint found at {path!r} (looked for {CHECKPOINT_NAME} there and in its checkpoints/ folder)"
    )


def load_checkpoint(path: str, map_location="cpu") -> dict:
    return torch.load(find_checkpoint(path), map_location=map_location, weights_only=False)


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


def save_trained_weights(network, directory: str, use_lora: bool) -> str:
    """The trained weights in diffusers format under ``directory`` (a run's final/ or best/).

    With LoRA: the adapters in the format of the network's pipeline (``pytorch_lora_weights.safetensors``,
    read by ``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights``). A full fine-tune:
    ``network.save_pretrained(directory/<subfolder>)``, the subfolder being the pipeline's component name
    (:func:`network_subfolder`: ``unet/``, or ``transformer/`` for SD3 and the flow-digits model), so the
    folder drops into a pipeline directory in place of the base model's. Returns ``directory``.
    """
    if use_lora:
        from ddpo_rl.lora import save_lora_weights

        save_lora_weights(network, directory)
    elif hasattr(network, "save_pretrained"):
        network.save_pretrained(os.path.join(directory, network_subfolder(network)))
    return directory
