import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import json

import pytest
import torch

from ddpo_rl.keys import KEYS
from ddpo_rl.models import flow_digits as fd
from ddpo_rl.models.flow_digits import (
    FlowDigitsConfig,
    build_flow_digits_model,
    flow_matching_loss,
    is_flow_digits_model_dir,
    load_flow_digits_model,
    load_or_train_flow_digits_model,
    packaged_model_dir,
    sample_flow_digits,
    sample_flow_times,
    save_flow_digits_model,
    train_flow_digits_model,
)


@pytest.fixture(scope="module")
def model():
    return build_flow_digits_model(seed=0)


def _velocity(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 8, 8, generator=g)
    emb, pooled = m.encode_prompts_pooled(["a handwritten digit 3", "a handwritten digit 8", "", "a handwritten digit 0"])
    with torch.no_grad():
        v = m.transformer(x, encoder_hidden_states=emb, pooled_projections=pooled,
                          timestep=torch.tensor([1000.0, 500.0, 10.0, 1.0])).sample
    return v, emb, pooled


class _Recorder(torch.nn.Module):
    """Stands in for the transformer: records its inputs, returns a fixed prediction."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.calls = []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, encoder_hidden_states, pooled_projections, timestep):
        from types import SimpleNamespace

        self.calls.append(dict(x=x, c=encoder_hidden_states, p=pooled_projections, t=timestep))
        return SimpleNamespace(sample=self.out(x) if callable(self.out) else self.out + 0 * x)


def test_components(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    assert isinstance(model.transformer, SD3Transformer2DModel)
    assert isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler) and model.scheduler.config.shift == 1.0
    assert model.prompts[4] == "a handwritten digit 4"
    assert model.transformer.config.in_channels == 1 and model.transformer.config.sample_size == 8
    assert model.transformer.config.joint_attention_dim == model.text_encoder.config.hidden_size
    assert model.transformer.config.pooled_projection_dim == model.text_encoder.config.projection_dim
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    emb, pooled = model.encode_prompts_pooled(model.prompts + [""])
    assert emb.shape == (11, 16, 16) and pooled.shape == (11, 32)
    cond = model.encode_prompts(model.prompts)  # what the denoising env carries
    assert torch.equal(cond[KEYS.prompt_embeds], emb[:10]) and torch.equal(cond[KEYS.pooled_prompt_embeds], pooled[:10])
    dist = torch.cdist(pooled, pooled) + torch.eye(11) * 1e9
    assert dist.min() > 0.1
    v, _, _ = _velocity(model)
    assert v.shape == (4, 1, 8, 8) and torch.isfinite(v).all()
    n = sum(p.numel() for p in model.transformer.parameters())
    assert 1e5 < n < 1e6, n


def test_flow_matching_loss_is_the_rectified_flow_regression():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    c, p = torch.randn(3, 5, 16, generator=g), torch.randn(3, 32, generator=g)
    pred = torch.randn(3, 1, 8, 8, generator=g)
    rec = _Recorder(pred)
    loss = flow_matching_loss(rec, x0, noise, t, c, p)
    call = rec.calls[0]
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(call["x"], (1 - tb) * x0 + tb * noise)
    torch.testing.assert_close(call["t"], 1000 * t)
    assert call["c"] is c and call["p"] is p
    torch.testing.assert_close(loss, ((pred - (noise - x0)) ** 2).mean())
    # the exact velocity has zero loss
    assert flow_matching_loss(_Recorder(noise - x0), x0, noise, t, c, p) == 0


def test_time_sampling():
    g = torch.Generator().manual_seed(0)
    for mode in ("logit_normal", "uniform"):
        t = sample_flow_times(20000, mode, g)
        assert 0 < t.min() and t.max() < 1
        assert abs(t.mean() - 0.5) < 0.01
    # logit-normal concentrates on the middle of the path
    assert sample_flow_times(20000, "logit_normal", g).std() < sample_flow_times(20000, "uniform", g).std()
    with pytest.raises(ValueError, match="time_sampling"):
        sample_flow_times(1, "cosine", g)
    with pytest.raises(ValueError, match="time_sampling"):
        train_flow_digits_model(build_flow_digits_model(), steps=1, time_sampling="cosine", progress=False)


def test_sampler_integrates_the_velocity_with_euler_steps(model):
    """With a constant velocity c, dx/dt = c integrated from t=1 to t=0 gives x_0 = x_1 - c, whatever
    the steps; CFG combines the two branches as v_u + w (v_c - v_u)."""
    m = build_flow_digits_model(seed=0)
    c = torch.full((1, 1, 8, 8), 0.25)
    m.transformer = _Recorder(c)
    x = sample_flow_digits(m, ["a handwritten digit 1"] * 2, num_inference_steps=7, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(3))
    x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, x1 - c)
    assert len(m.transformer.calls) == 7
    ts = torch.stack([call["t"][0] for call in m.transformer.calls])
    assert ts[0] == 1000 and (ts.diff() < 0).all()

    # CFG: v = v_u + w (v_c - v_u) with v_u = 0 (uncond half) and v_c = 1 (cond half) -> w
    m.transformer = _Recorder(lambda x: torch.cat([torch.zeros_like(x[: len(x) // 2]), torch.ones_like(x[len(x) // 2 :])]))
    x = sample_flow_digits(m, ["a handwritten digit 1"] * 2, num_inference_steps=4, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, x1 - 3.0)
    call = m.transformer.calls[0]
    assert call["x"].shape[0] == 4
    uncond, _ = model.encode_prompts_pooled([""])
    torch.testing.assert_close(call["c"][:2], uncond.expand(2, -1, -1))


def test_pretraining_loss_falls():
    m = build_flow_digits_model(seed=1)
    before, emb_before, _ = _velocity(m)
    calls = []
    m, result = train_flow_digits_model(
        m, steps=30, batch_size=16, lr=3e-3, warmup_steps=3, ema_decay=None, progress=False,
        log_every=10, callback=lambda s, l: calls.append((s, l)),
    )
    losses = result.losses
    assert losses.shape == (30,) and torch.isfinite(losses).all()
    assert losses[-10:].mean() < 0.8 * losses[:5].mean(), losses
    assert [s for s, _ in calls] == [10, 20, 30]
    assert not m.transformer.training and not m.text_encoder.training
    after, emb_after, _ = _velocity(m)
    assert not torch.allclose(before, after)
    assert not torch.allclose(emb_before, emb_after)  # text encoder trained jointly
    assert not any(p.requires_grad for p in m.text_encoder.parameters())  # frozen afterwards


@pytest.mark.parametrize("save_tokenizer", [False, True])
def test_save_load_roundtrip(model, tmp_path, save_tokenizer):
    path = save_flow_digits_model(model, tmp_path / "flow", save_tokenizer=save_tokenizer)
    assert is_flow_digits_model_dir(path)
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (path / "tokenizer").is_dir() == save_tokenizer
    index = json.loads((path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["metadata"]["prompt_template"] == "a handwritten digit {}"
    loaded = load_flow_digits_model(path)
    assert loaded.source == str(path) and loaded.tokenizer.model_max_length == 16
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(model.scheduler.config)
    for a, b in zip(_velocity(model), _velocity(loaded)):
        assert torch.equal(a, b)


def test_save_in_half_precision(model, tmp_path):
    full = save_flow_digits_model(model, tmp_path / "full")
    half = save_flow_digits_model(model, tmp_path / "half", dtype=torch.float16)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*.safetensors"))  # noqa: E731
    assert size(half) < 0.6 * size(full)
    assert next(model.transformer.parameters()).dtype == torch.float32
    loaded = load_flow_digits_model(half)
    assert next(loaded.transformer.parameters()).dtype == torch.float32
    for a, b in zip(_velocity(model), _velocity(loaded)):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)


def test_load_errors_and_cache_lookup(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a saved flow-matching digits model"):
        load_flow_digits_model(tmp_path)
    monkeypatch.setenv("DDPO_RL_CACHE", str(tmp_path / "root"))
    with pytest.raises(FileNotFoundError, match="pretrain_flow_digits"):
        load_or_train_flow_digits_model(use_packaged=False, train_if_missing=False)
    m1 = load_or_train_flow_digits_model(use_packaged=False, progress=False, steps=2, batch_size=4)
    assert m1.source == "trained" and is_flow_digits_model_dir(tmp_path / "root" / "flow-digits-v1")
    m2 = load_or_train_flow_digits_model(progress=False)  # found in the cache now
    assert m2.source == str(tmp_path / "root" / "flow-digits-v1")
    assert torch.equal(_velocity(m1)[0], _velocity(m2)[0])


def test_custom_config():
    m = build_flow_digits_model(FlowDigitsConfig(num_layers=1, text_hidden_size=8, text_projection_dim=8, max_length=8))
    emb, pooled = m.encode_prompts_pooled(["a handwritten digit 2"])
    assert emb.shape == (1, 8, 8) and pooled.shape == (1, 8)
    assert _velocity(m)[0].shape == (4, 1, 8, 8)


def test_build_model_flow_digits(monkeypatch, tmp_path):
    from ddpo_rl.models.loading import build_model

    if packaged_model_dir() is None:  # no committed checkpoint: a tiny one in the cache instead
        monkeypatch.setenv("DDPO_RL_CACHE", str(tmp_path))
        save_flow_digits_model(build_flow_digits_model(), tmp_path / fd.MODEL_NAME)
    m = build_model("flow-digits", torch.device("cpu"))
    assert m.kind == "flow-digits" and type(m.unet).__name__ == "SD3Transformer2DModel"
    assert type(m.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert m.latent_shape == (1, 8, 8)
    cond, negative = m.encode_prompts(["a handwritten digit 5"]), m.negative_prompt_embeds()
    assert cond[KEYS.prompt_embeds].shape == negative[KEYS.prompt_embeds].shape == (1, 16, 16)
    assert cond[KEYS.pooled_prompt_embeds].shape == negative[KEYS.pooled_prompt_embeds].shape == (1, 32)
    assert m.decode(torch.zeros(2, 1, 8, 8)).shape == (2, 3, 8, 8)
    assert all(not p.requires_grad for f in m.frozen for p in f.parameters())


@pytest.mark.skipif(packaged_model_dir() is None, reason="no checkpoint committed in ddpo_rl/assets")
def test_packaged_model_draws_the_prompted_digits():
    """Euler ODE, 20 steps: at CFG 3 the digit classifier (the RL reward's) reads the prompted digit
    in most samples, and CFG 1 scores lower (the headroom the RL recipe trains into)."""
    from ddpo_rl.rewards.digits import DigitAlignment

    m = load_flow_digits_model(packaged_model_dir())
    prompts = [p for p in m.prompts for _ in range(10)]
    target = torch.arange(10).repeat_interleave(10)
    reward = DigitAlignment()
    scores = {}
    for cfg in (1.0, 3.0):
        x = sample_flow_digits(m, prompts, num_inference_steps=20, guidance_scale=cfg,
                               generator=torch.Generator().manual_seed(0))
        images = m.decode(x)
        top1 = (reward.classifier(images).argmax(-1) == target).float().mean()
        scores[cfg] = (float(reward(images, prompts).mean()), float(top1))
    assert scores[3.0][1] > 0.8, scores
    assert scores[3.0][0] > 0.5, scores
    assert scores[1.0][0] < scores[3.0][0], scores
