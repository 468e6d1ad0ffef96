"""ddpo_rl.checkpoint.save_trained_weights: what a run's final/ and best/ hold, for both policy families."""

import ddpo_rl  # noqa: F401  (first: torchvision shim)

import torch

from ddpo_rl.checkpoint import network_subfolder, save_trained_weights
from tests.helpers import tiny_sd3_transformer, tiny_unet


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
