"""Checkpoints: checksummed, rotated, verified before unpickling, with a fallback to the previous one."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from ddpo_rl.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    network_subfolder,
    previous_path,
    read_checkpoint,
    run_dir_of,
    save_trained_weights,
    verify_checkpoint,
)
from tests.helpers import tiny_sd3_transformer, tiny_unet


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


# --- save_trained_weights: what a run's final/ and best/ hold, for both policy families



def _perturbed(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    return net


def test_full_fine_tune_goes_under_the_pipeline_component_name(tmp_path):
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    transformer, unet = _perturbed(tiny_sd3_transformer()), tiny_unet()
    assert (network_subfolder(transformer), network_subfolder(unet)) == ("transformer", "unet")
    save_trained_weights(transformer, str(tmp_path / "flow"), use_lora=False)
    save_trained_weights(unet, str(tmp_path / "ddim"), use_lora=False)
    assert not (tmp_path / "flow" / "unet").exists() and not (tmp_path / "ddim" / "transformer").exists()
    back = SD3Transformer2DModel.from_pretrained(tmp_path / "flow" / "transformer")
    for a, b in zip(transformer.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    UNet2DConditionModel.from_pretrained(tmp_path / "ddim" / "unet")


@pytest.mark.parametrize("use_lora", [False, True])
def test_weights_info_is_saved_with_the_weights(tmp_path, use_lora):
    from ddpo_rl import lora
    from ddpo_rl.checkpoint import WEIGHTS_INFO_NAME, read_weights_info

    net = tiny_unet()
    if use_lora:
        lora.apply_lora(net, rank=2)
    save_trained_weights(net, str(tmp_path / "best"), use_lora=use_lora, info={"epoch": 7, "seed": 1})
    assert read_weights_info(str(tmp_path / "best")) == {"epoch": 7, "seed": 1}
    save_trained_weights(net, str(tmp_path / "best"), use_lora=use_lora)  # replaced whole: no stale info
    assert not (tmp_path / "best" / WEIGHTS_INFO_NAME).exists() and read_weights_info(str(tmp_path / "best")) is None
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / WEIGHTS_INFO_NAME).write_text("[1, 2")  # torn or foreign: no info, no crash
    assert read_weights_info(str(tmp_path / "odd")) is None


def test_lora_of_a_flow_transformer_is_saved_in_the_sd3_format(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from ddpo_rl.lora import apply_lora, lora_parameters

    net = tiny_sd3_transformer()
    apply_lora(net, rank=2)
    with torch.no_grad():
        for p in lora_parameters(net):
            p.add_(0.05)
    save_trained_weights(net, str(tmp_path / "final"), use_lora=True)
    state = load_file(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    assert state and all(k.startswith("transformer.") for k in state)
    # what StableDiffusion3Pipeline.load_lora_weights reads
    sd, _ = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "final"), return_lora_metadata=True)
    assert set(sd) == set(state)


@pytest.mark.parametrize("use_lora", [False, True])
def test_a_save_that_dies_midway_leaves_the_previous_weights_whole(tmp_path, use_lora, monkeypatch):
    """best/ is rewritten at every new best evaluation: a kill during that write must not leave half
    of the new weights, nor lose the previous ones."""
    from ddpo_rl import lora

    net = tiny_unet()
    if use_lora:
        lora.apply_lora(net, rank=2)
    best = tmp_path / "best"
    save_trained_weights(net, str(best), use_lora=use_lora)
    before = _tree_digest(best)
    assert before

    def dies_midway(*args, **kwargs):
        directory = args[-1]  # save_pretrained(directory) / save_lora_weights(network, directory)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "pytorch_lora_weights.safetensors" if use_lora else "half"), "wb") as f:
            f.write(b"\0" * 100)
        raise KeyboardInterrupt("killed while saving")

    if use_lora:
        monkeypatch.setattr(lora, "save_lora_weights", dies_midway)
    else:
        monkeypatch.setattr(net, "save_pretrained", dies_midway)
    _perturbed(net)
    with pytest.raises(KeyboardInterrupt):
        save_trained_weights(net, str(best), use_lora=use_lora)
    assert _tree_digest(best) == before
    assert os.listdir(tmp_path) == ["best"]
    monkeypatch.undo()
    save_trained_weights(net, str(best), use_lora=use_lora)  # the next save replaces it whole
    assert _tree_digest(best) != before and os.listdir(tmp_path) == ["best"]


def test_a_network_without_save_pretrained_is_saved_not_skipped(tmp_path):
    """A network of the user's own (a plain nn.Module) used to leave final/ and best/ empty."""
    from safetensors.torch import load_model

    from ddpo_rl.checkpoint import STATE_DICT_NAME, read_weights_info

    net = _perturbed(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    save_trained_weights(net, str(tmp_path / "final"), use_lora=False, info={"epoch": 3})
    back = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    load_model(back, tmp_path / "final" / network_subfolder(net) / STATE_DICT_NAME)
    for a, b in zip(net.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert read_weights_info(str(tmp_path / "final")) == {"epoch": 3}
