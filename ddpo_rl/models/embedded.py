"""What the project's embedded models (digits-v1, digits-flow-v1, flow-digits-v1) share besides their networks.

All are small text-to-image models the project trains itself on scikit-learn's digits and keeps
in the diffusers directory layout, so the default runs have a real model with no model hub. They
differ in the denoiser (a UNet predicting epsilon or, digits-flow, the velocity; an SD3 transformer
predicting the velocity) and in the text encoder's class; everything else is here, once:

* :func:`build_text_encoder`: the small CLIP text encoder, frozen, built from its config;
* :func:`save_model_dir` / :func:`write_model_dir`: the directory layout, written atomically;
* :func:`load_model_dir`: each component's ``from_pretrained`` and the metadata the model keeps;
* :func:`load_or_train_model`: the lookup (cache directory, committed checkpoint, else train once).

Directory layout (``<denoiser>`` is ``unet`` or ``transformer``)::

    <name>/
      model_index.json       the components and their classes, the model's metadata, the version
      <denoiser>/            the denoiser's save_pretrained
      text_encoder/          the text encoder's save_pretrained
      scheduler/             the scheduler's save_pretrained
      tokenizer/             optional; without it the offline CLIP tokenizer is rebuilt at load time
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Callable, Mapping

import torch

from ddpo_rl._version import __version__
from ddpo_rl.atomic import atomic_directory

MODEL_INDEX = "model_index.json"
PROMPT_TEMPLATE = "a handwritten digit {}"
UNCONDITIONAL_PROMPT = ""
CACHE_ENV_VAR = "DDPO_RL_CACHE"
"""Root cache directory of ddpo_rl (default ``~/.cache/ddpo_rl``)."""
CLIP_VOCAB_SIZE, CLIP_BOS, CLIP_EOS = 49408, 49406, 49407
"""The CLIP tokenizer's vocabulary and special tokens (:func:`ddpo_rl.models.tokenizer.build_clip_tokenizer`)."""
_NOT_KEPT = ("value_range", "space")
"""Metadata the model recomputes (:meth:`DigitsModel.metadata`), not carried in ``extra``."""


def default_cache_dir(name: str) -> Path:
    """``$DDPO_RL_CACHE/<name>``, or ``~/.cache/ddpo_rl/<name>`` when the variable is unset."""
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path("~/.cache/ddpo_rl").expanduser()
    return base / name


def is_model_dir(path: str | os.PathLike, required: tuple[str, ...]) -> bool:
    """Whether ``path`` holds every entry of ``required`` (a complete saved model)."""
    p = Path(path)
    return all((p / f).exists() for f in required)


# ----------------------------------------------------------------------------- building


def build_text_encoder(
    encoder_class, *, hidden_size: int, num_layers: int, num_heads: int, max_length: int, **config
) -> torch.nn.Module:
    """A randomly initialised small CLIP text encoder (``encoder_class`` of transformers, e.g.
    ``CLIPTextModel``), in eval mode and frozen; ``config`` adds CLIPTextConfig fields
    (``projection_dim`` for ``CLIPTextModelWithProjection``)."""
    from transformers import CLIPTextConfig

    encoder = encoder_class(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_length,
            bos_token_id=CLIP_BOS,
            eos_token_id=CLIP_EOS,
            pad_token_id=CLIP_EOS,
            **config,
        )
    ).eval()
    return encoder.requires_grad_(False)


# ----------------------------------------------------------------------------- save / load


def save_model_dir(
    path: str | os.PathLike,
    components: Mapping[str, object],
    tokenizer,
    *,
    class_name: str,
    name: str,
    metadata: dict,
    save_tokenizer: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save an embedded model's ``components`` (``{"unet" | "transformer": ..., "text_encoder": ...,
    "scheduler": ...}``, in that order) with :func:`write_model_dir`.

    ``dtype`` (e.g. ``torch.float16``) stores the networks' weights in that precision, from copies:
    the in-memory model is not changed (loading casts back to float32). The tokenizer is left out
    unless ``save_tokenizer`` (it is rebuilt offline at load time). ``class_name`` marks the
    directory as this model's (``_class_name`` in model_index.json).
    """
    writers, index = {}, {}
    for key, component in components.items():
        index[key] = [type(component).__module__.split(".")[0], type(component).__name__]
        if dtype is not None and isinstance(component, torch.nn.Module):
            component = copy.deepcopy(component).to(dtype)
        writers[key] = component.save_pretrained
    if save_tokenizer:
        writers["tokenizer"] = tokenizer.save_pretrained
        index["tokenizer"] = ["transformers", type(tokenizer).__name__]
    else:
        index["tokenizer"] = ["ddpo_rl", "build_clip_tokenizer"]
    return write_model_dir(path, writers, {"_class_name": class_name, "name": name, **index, "metadata": metadata})


def write_model_dir(path: str | os.PathLike, writers: dict[str, Callable[[Path], object]], index: dict) -> Path:
    """Write a model directory atomically (:func:`~ddpo_rl.atomic.atomic_directory`):
    ``writers[name](tmp / name)`` for each component, then ``model_index.json`` (``index`` plus the
    package version), into a temporary sibling directory that then replaces ``path``, so an
    interrupted save never leaves a half-written model, nor loses the one saved before."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        for name, write in writers.items():
            write(tmp / name)
        index = {"_class_name": index["_class_name"], "_ddpo_rl_version": __version__, **index}
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_model_dir(
    path: Path, *, denoiser: tuple[str, type], encoder_class, scheduler_class, dtype: torch.dtype | None = None
) -> dict:
    """The keyword arguments of an embedded model's dataclass, loaded from ``path``: the denoiser
    (``denoiser = (subfolder, class)``), the frozen text encoder, its tokenizer and the scheduler,
    each by its ``from_pretrained`` (float32 by default), then the metadata: ``sample_size``,
    ``channels``, the prompts, ``source`` (the directory) and whatever else it holds (``extra``)."""
    subfolder, denoiser_class = denoiser
    meta = dict(json.loads((path / MODEL_INDEX).read_text()).get("metadata", {}))
    dtype = dtype or torch.float32
    network = denoiser_class.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
    text_encoder, tokenizer = load_text_encoder_and_tokenizer(path, encoder_class, dtype)
    network.eval()
    return {
        subfolder: network,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler_class.from_pretrained(path, subfolder="scheduler"),
        "sample_size": int(meta.pop("sample_size", network.config.sample_size)),
        "channels": int(meta.pop("channels", network.config.in_channels)),
        "prompt_template": meta.pop("prompt_template", PROMPT_TEMPLATE),
        "unconditional_prompt": meta.pop("unconditional_prompt", UNCONDITIONAL_PROMPT),
        "source": str(path),
        "extra": {k: v for k, v in meta.items() if k not in _NOT_KEPT},
    }


def load_text_encoder_and_tokenizer(path: Path, encoder_class, dtype: torch.dtype):
    """The frozen text encoder (``encoder_class`` from ``path/text_encoder``, without a progress bar)
    and its tokenizer (``path/tokenizer``, or the offline CLIP tokenizer) of an embedded model."""
    from transformers import CLIPTokenizer
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for a 1 MB encoder is noise in the recipe's output
    try:
        text_encoder = encoder_class.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if (path / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    else:
        from ddpo_rl.models.tokenizer import build_clip_tokenizer

        tokenizer = build_clip_tokenizer(model_max_length=text_encoder.config.max_position_embeddings)
    return text_encoder.eval().requires_grad_(False), tokenizer


# ----------------------------------------------------------------------------- lookup


def load_or_train_model(
    cache: Path,
    *,
    label: str,
    pretrain_script: str,
    is_dir: Callable[[Path], bool],
    load: Callable[..., object],
    packaged: Callable[[], Path | None],
    build: Callable[..., object],
    train: Callable[..., tuple[object, object]],
    save: Callable[[object, Path], object],
    device=None,
    use_packaged: bool = True,
    train_if_missing: bool = True,
    progress: bool = True,
    train_kwargs: dict | None = None,
):
    """An embedded model: ``load(cache)`` if ``cache`` holds one, else the committed checkpoint
    (``packaged()``, if ``use_packaged``), else ``build(seed=...)`` on ``device`` trained by
    ``train(model, progress=..., **train_kwargs)`` -> ``(model, TrainResult)`` and saved to ``cache``
    with ``save(model, cache)``; a message names the directory before and after training (a few CPU
    minutes, once).

    Raises:
        FileNotFoundError: nothing saved was found and ``train_if_missing`` is False.
    """
    if is_dir(cache):
        return load(cache, device=device)
    packaged_dir = packaged() if use_packaged else None
    if packaged_dir is not None:
        return load(packaged_dir, device=device)
    if not train_if_missing:
        raise FileNotFoundError(
            f"no {label} model in {cache}" + (" nor in the package" if use_packaged else "")
            + f"; run recipes/{pretrain_script} or pass train_if_missing=True"
        )
    say(f"ddpo_rl: no pretrained {label} model found in {cache}; training one now "
        "(a few CPU minutes, once). It will be saved there.", progress)
    train_kwargs = dict(train_kwargs or {})
    model = build(seed=train_kwargs.get("seed", 0))
    if device is not None:
        model.to(device)
    model, result = train(model, progress=progress, **train_kwargs)
    save(model, cache)
    say(f"ddpo_rl: {label} model trained in {result.seconds:.0f} s "
        f"(final loss {result.losses[-50:].mean():.4f}), saved to {cache}", progress)
    model.source = "trained"
    return model


def say(message: str, rich_console: bool) -> None:
    """One line on stderr (through rich's console when ``rich_console``)."""
    if rich_console:
        from rich.console import Console

        Console(stderr=True).print(message)
    else:
        print(message, file=sys.stderr)
