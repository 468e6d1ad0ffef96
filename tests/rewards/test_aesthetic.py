"""The aesthetic reward with a tiny random CLIP and a random head of the published layout."""

import ddpo_rl  # noqa: F401  (first: torchvision shim)
import numpy as np
import pytest
import torch

from ddpo_rl.hub import PretrainedWeightsNotFoundError
from ddpo_rl.rewards._clip_preprocess import preprocess_images
from ddpo_rl.rewards.aesthetic import AestheticMLP, AestheticScorer, make_aesthetic_reward

# The keys and shapes of sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor).
PUBLISHED_LAYOUT = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}


def _random_published_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(shape, generator=g) for k, shape in PUBLISHED_LAYOUT.items()}


def _tiny_clip(projection_dim=768):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    return CLIPModel(cfg).eval()


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_random_published_state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    _tiny_clip().save_pretrained(path)
    return str(path)


def test_mlp_has_the_published_layout():
    state = AestheticMLP().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == PUBLISHED_LAYOUT
    # strict: extra or missing keys are refused
    bad = dict(_random_published_state_dict(), **{"layers.8.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError):
        AestheticMLP().load_state_dict(bad, strict=True)


def test_reward_from_files(weights_path, clip_dir):
    reward = make_aesthetic_reward(weights_path, clip_model=clip_dir, device="cpu", batch_size=4)
    assert isinstance(reward, AestheticScorer)
    for k, v in _random_published_state_dict().items():
        torch.testing.assert_close(reward.mlp.state_dict()[k], v)
    images = torch.rand(5, 3, 40, 48)
    scores = reward(images, ["a cat"] * 5)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert scores.std() > 0

    # the same as CLIP image features -> L2 normalise -> MLP, by hand
    clip = reward.clip
    with torch.no_grad():
        pix = preprocess_images(images, 32)
        feats = clip.visual_projection(clip.vision_model(pixel_values=pix).pooler_output)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        expected = reward.mlp(feats).squeeze(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_batching_does_not_change_scores(weights_path):
    clip = _tiny_clip()
    images = torch.rand(7, 3, 32, 32)
    one = make_aesthetic_reward(weights_path, clip_model=clip, batch_size=64)(images, [""] * 7)
    chunked = make_aesthetic_reward(weights_path, clip_model=clip, batch_size=3)(images, [""] * 7)
    torch.testing.assert_close(chunked, one, rtol=1e-4, atol=1e-5)


def test_preprocessing_matches_clip_image_processor():
    from PIL import Image
    from transformers import CLIPImageProcessor

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(48, 64), mode="bilinear")
    arr = (smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = processor(images=Image.fromarray(arr), return_tensors="pt").pixel_values
    ours = preprocess_images(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, 32)
    assert ours.shape == ref.shape
    # PIL's bicubic on uint8 vs torch's anti-aliased bicubic on floats: about one grey level apart
    # (0.014 measured); a wrong crop, size or normalisation is off by > 0.3
    assert (ours - ref).abs().max() < 0.05


def test_missing_weights_and_wrong_clip(tmp_path, monkeypatch, weights_path):
    with pytest.raises(PretrainedWeightsNotFoundError, match="sac%2Blogos"):
        make_aesthetic_reward(str(tmp_path / "missing.pth"), clip_model=_tiny_clip())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(PretrainedWeightsNotFoundError, match="could not download"):
        make_aesthetic_reward("http://127.0.0.1:9/nothing.pth", clip_model=_tiny_clip())
    with pytest.raises(PretrainedWeightsNotFoundError, match="does not exist"):
        make_aesthetic_reward(weights_path, clip_model=str(tmp_path / "no" / "clip"))
    with pytest.raises(ValueError, match="768"):
        make_aesthetic_reward(weights_path, clip_model=_tiny_clip(projection_dim=64))
