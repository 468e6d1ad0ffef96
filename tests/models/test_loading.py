"""ddpo_rl.models.loading: a config's ``model`` string -> the model, including saved digits directories."""

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import json
import shutil

import pytest
import torch

from ddpo_rl.config import preset_config
from ddpo_rl.hub import PretrainedWeightsNotFoundError
from ddpo_rl.models.digits import DigitsConfig, build_digits_model, save_digits_model
from ddpo_rl.models.flow_digits import build_flow_digits_model, save_flow_digits_model
from ddpo_rl.models.loading import build_model, check_model_reference, model_family


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A digits, a digits-flow and a flow-digits model, freshly built (seed 1: not the packaged weights)
    and saved."""
    root = tmp_path_factory.mktemp("models")
    digits, flow = build_digits_model(seed=1), build_flow_digits_model(seed=1)
    digits_flow = build_digits_model(DigitsConfig(objective="flow"), seed=1)
    save_digits_model(digits, root / "my-digits")
    save_digits_model(digits_flow, root / "my-digits-flow")
    save_flow_digits_model(flow, root / "my-flow-digits")
    return {"digits": (root / "my-digits", digits.unet), "digits-flow": (root / "my-digits-flow", digits_flow.unet),
            "flow-digits": (root / "my-flow-digits", flow.transformer)}


def test_model_family_of_names_and_directories(saved, tmp_path):
    names = ("digits", "digits-flow", "flow-digits", "tiny")
    assert [model_family(n) for n in names] == list(names)
    for family in ("digits", "digits-flow", "flow-digits"):
        assert model_family(str(saved[family][0])) == family
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "model_index.json").write_text("[1, 2]")
    for name in (str(sd), str(broken), str(listed), str(tmp_path / "missing"), "runwayml/stable-diffusion-v1-5"):
        assert model_family(name) is None, name


def test_model_kind_is_decided_as_the_loader_decides_without_loading(saved, tmp_path):
    """The kind that build_model gives each model (so the sampler: DDIM or flow matching) from its name or
    directory alone; the config refuses sampler settings of the other kind with it."""
    from ddpo_rl.models.loading import FLOW_MATCHING_KINDS, model_kind

    assert [model_kind(n) for n in ("digits", "flow-digits", "tiny")] == ["digits", "flow-digits", "tiny"]
    assert model_kind(str(saved["flow-digits"][0])) == "flow-digits"
    assert model_kind(str(saved["digits-flow"][0])) == "digits-flow" and "digits-flow" in FLOW_MATCHING_KINDS
    assert "digits" not in FLOW_MATCHING_KINDS
    assert model_kind("runwayml/stable-diffusion-v1-5") == "sd"
    assert model_kind("stabilityai/stable-diffusion-3.5-medium") == "sd3"
    sd3 = tmp_path / "my-sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert model_kind(str(sd3)) == "sd3" and "sd3" in FLOW_MATCHING_KINDS
    assert build_model("tiny", "cpu").kind == model_kind("tiny")


@pytest.mark.parametrize("family", ["digits", "digits-flow", "flow-digits"])
def test_build_model_loads_a_saved_directory(saved, family):
    path, network = saved[family]
    model = build_model(str(path), torch.device("cpu"))
    assert model.kind == family and model.latent_shape == (1, 8, 8)
    loaded, original = model.unet.state_dict(), network.state_dict()
    assert loaded.keys() == original.keys()
    for k in original:
        torch.testing.assert_close(loaded[k], original[k], rtol=0, atol=0)
    from ddpo_rl.flow_sde import is_flow_matching_scheduler
    from ddpo_rl.models.loading import FLOW_MATCHING_KINDS

    assert is_flow_matching_scheduler(model.scheduler) == (family in FLOW_MATCHING_KINDS)
    if family == "digits-flow":  # no pooled embedding: the flow policy calls its UNet without one
        assert isinstance(model.encode_prompts(["a handwritten digit 1"]), torch.Tensor)
    packaged = build_model(family, torch.device("cpu")).unet.state_dict()
    assert any(not torch.equal(packaged[k].float(), original[k].float()) for k in original)  # not the packaged model


@pytest.mark.parametrize("family, component", [("digits", "unet"), ("digits-flow", "scheduler"), ("flow-digits", "transformer")])
def test_a_saved_directory_with_a_component_missing_is_refused_by_name(saved, family, component, tmp_path):
    path = tmp_path / "incomplete"
    shutil.copytree(saved[family][0], path)
    check_model_reference(str(path))  # complete: accepted
    shutil.rmtree(path / component)
    with pytest.raises(PretrainedWeightsNotFoundError, match=f"^model: .* is a saved {family} model without {component}$"):
        check_model_reference(str(path))


@pytest.mark.parametrize("family", ["digits", "digits-flow", "flow-digits"])
def test_a_saved_directory_gets_its_familys_defaults(saved, family):
    path = str(saved[family][0])
    cfg = preset_config("digits", model=path)
    assert cfg.reward_kwargs == {"resize": 32} and cfg.monitor_rewards == ["digit_alignment", "digit_realism"]
    cfg = preset_config("digits", model=path, reward="digit_alignment")
    assert cfg.reward_kwargs == {} and cfg.monitor_rewards == ["sample_diversity", "digit_realism"]
    assert preset_config("digits", model="some/sd-hub-id").reward_kwargs == {"resize": 512}


def test_a_missing_directory_is_refused_naming_every_kind_of_model(tmp_path):
    """A path that does not exist could have meant a saved digits model as well as an SD pipeline: the
    one-line error names the field and every kind of model --model takes, not only Stable Diffusion."""
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(PretrainedWeightsNotFoundError, match=f"^model: '{missing}' is not a directory; ") as info:
        check_model_reference(missing)
    msg = str(info.value)
    assert "digits" in msg and "pretrain_digits.py" in msg and "Stable Diffusion" in msg and "\n" not in msg
