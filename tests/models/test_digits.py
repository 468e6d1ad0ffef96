import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import json

import pytest
import torch

from ddpo_rl.models import digits as digits_mod
from ddpo_rl.models.digits import (
    DigitsConfig,
    build_digits_model,
    default_cache_dir,
    is_digits_model_dir,
    load_digits_dataset,
    load_digits_model,
    load_or_train_digits_model,
    packaged_model_dir,
    sample_digits,
    save_digits_model,
    train_digits_model,
)


@pytest.fixture(scope="module")
def model():
    return build_digits_model(seed=0)


def _unet_out(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([999, 500, 10, 1])
    ctx = m.encode_prompts(["a handwritten digit 3", "a handwritten digit 8", "", "a handwritten digit 0"])
    with torch.no_grad():
        return m.unet(x, t, encoder_hidden_states=ctx).sample, ctx


def test_dataset():
    images, labels = load_digits_dataset()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1 and images.max() == 1
    assert set(labels.tolist()) == set(range(10))


def test_components_and_scheduler_settings(model):
    assert model.prompts[7] == "a handwritten digit 7"
    assert model.unet.config.in_channels == 1 and model.unet.config.sample_size == 8
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    cfg = model.scheduler.config
    assert cfg.set_alpha_to_one is False and cfg.clip_sample is False
    assert cfg.prediction_type == "epsilon"
    # the last DDIM step keeps a non-zero std (finite log-prob)
    assert model.scheduler.final_alpha_cumprod < 1
    sched = model.scheduler
    sched.set_timesteps(20)
    last = int(sched.timesteps[-1])
    assert sched._get_variance(last, last - sched.config.num_train_timesteps // 20) > 0
    # pure noise at the start of sampling
    assert sched.alphas_cumprod[-1] < 1e-3
    # frozen text encoder, distinct prompt embeddings
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    emb = model.encode_prompts(model.prompts + [""])
    assert emb.shape == (11, 77, 16)
    flat = emb.flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(11) * 1e9
    assert dist.min() > 1.0


def test_decode(model):
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    img = model.decode(x)
    assert img.shape == (1, 3, 2, 2)
    torch.testing.assert_close(img[0, 1].flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0]))


def test_pretraining_loss_falls():
    m = build_digits_model(seed=1)
    before, ctx_before = _unet_out(m)
    calls = []
    m, result = train_digits_model(
        m, steps=30, batch_size=16, lr=3e-3, warmup_steps=3, ema_decay=None, progress=False,
        log_every=10, callback=lambda s, l: calls.append((s, l)),
    )
    losses = result.losses
    assert losses.shape == (30,) and torch.isfinite(losses).all()
    assert losses[-10:].mean() < 0.6 * losses[:5].mean(), losses
    assert [s for s, _ in calls] == [10, 20, 30]
    assert not m.unet.training and not m.text_encoder.training
    after, ctx_after = _unet_out(m)
    assert not torch.allclose(before, after)
    # trained jointly, frozen afterwards
    assert not torch.allclose(ctx_before, ctx_after)
    assert not any(p.requires_grad for p in m.text_encoder.parameters())


def test_frozen_text_encoder_option():
    m = build_digits_model(seed=3)
    ctx = m.encode_prompts(m.prompts)
    m, _ = train_digits_model(m, steps=2, batch_size=8, train_text_encoder=False, progress=False)
    assert torch.equal(ctx, m.encode_prompts(m.prompts))


def test_ema_weights_are_returned():
    m1, _ = train_digits_model(build_digits_model(seed=2), steps=3, batch_size=8, ema_decay=None, progress=False)
    m2, _ = train_digits_model(build_digits_model(seed=2), steps=3, batch_size=8, ema_decay=0.9, progress=False)
    assert not torch.allclose(_unet_out(m1)[0], _unet_out(m2)[0])


@pytest.mark.parametrize("save_tokenizer", [False, True])
def test_save_load_roundtrip(model, tmp_path, save_tokenizer):
    path = save_digits_model(model, tmp_path / "digits", save_tokenizer=save_tokenizer)
    assert is_digits_model_dir(path)
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (path / "text_encoder" / "model.safetensors").exists()
    assert (path / "tokenizer").is_dir() == save_tokenizer
    index = json.loads((path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["metadata"]["prompt_template"] == "a handwritten digit {}"
    assert not list(tmp_path.glob(".digits.tmp-*"))

    loaded = load_digits_model(path)
    assert loaded.source == str(path)
    assert (loaded.sample_size, loaded.channels, loaded.prompt_template) == (8, 1, "a handwritten digit {}")
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(model.scheduler.config)
    assert type(loaded.scheduler) is type(model.scheduler)
    out_a, ctx_a = _unet_out(model)
    out_b, ctx_b = _unet_out(loaded)
    assert torch.equal(ctx_a, ctx_b)
    assert torch.equal(out_a, out_b)
    ids = lambda tok: tok("a handwritten digit 5", padding="max_length", max_length=77).input_ids  # noqa: E731
    assert ids(loaded.tokenizer) == ids(model.tokenizer)


def test_save_in_half_precision(model, tmp_path):
    full = save_digits_model(model, tmp_path / "full")
    half = save_digits_model(model, tmp_path / "half", dtype=torch.float16)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*.safetensors"))  # noqa: E731
    assert size(half) < 0.6 * size(full)
    assert next(model.unet.parameters()).dtype == torch.float32  # in-memory model untouched
    loaded = load_digits_model(half)
    assert next(loaded.unet.parameters()).dtype == torch.float32
    out_a, ctx_a = _unet_out(model)
    out_b, ctx_b = _unet_out(loaded)
    torch.testing.assert_close(out_b, out_a, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ctx_b, ctx_a, atol=2e-2, rtol=2e-2)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved digits model"):
        load_digits_model(tmp_path)


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPO_RL_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "digits-v1"
    monkeypatch.delenv("DDPO_RL_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "ddpo_rl", "digits-v1")
    monkeypatch.setenv("DDPO_RL_CACHE", str(tmp_path / "root"))

    with pytest.raises(FileNotFoundError):
        load_or_train_digits_model(use_packaged=False, train_if_missing=False)

    trained = []
    real_train = digits_mod.train_digits_model

    def counting_train(*args, **kwargs):
        trained.append(kwargs)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(digits_mod, "train_digits_model", counting_train)
    m1 = load_or_train_digits_model(use_packaged=False, progress=False, steps=2, batch_size=4)
    assert m1.source == "trained" and len(trained) == 1 and trained[0]["steps"] == 2
    assert is_digits_model_dir(tmp_path / "root" / "digits-v1")

    m2 = load_or_train_digits_model(progress=False, steps=2, batch_size=4)  # now found in the cache
    assert len(trained) == 1 and m2.source == str(tmp_path / "root" / "digits-v1")
    assert torch.equal(_unet_out(m1)[0], _unet_out(m2)[0])

    # an explicit cache_dir wins over the environment variable
    m3 = load_or_train_digits_model(tmp_path / "explicit", use_packaged=False, progress=False, steps=1, batch_size=4)
    assert len(trained) == 2 and is_digits_model_dir(tmp_path / "explicit")
    assert m3.source == "trained"


def test_sample_digits_shape(model):
    x = sample_digits(model, ["a handwritten digit 1"] * 3, num_inference_steps=3, guidance_scale=3.0,
                      eta=1.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_custom_config():
    m = build_digits_model(DigitsConfig(block_out_channels=(16, 32), text_hidden_size=8, text_heads=2))
    assert m.unet.config.cross_attention_dim == 8
    assert m.encode_prompts(["a handwritten digit 2"]).shape == (1, 77, 8)


@pytest.mark.skipif(packaged_model_dir() is None, reason="no checkpoint committed in ddpo_rl/assets")
def test_packaged_model_draws_the_prompted_digits():
    from ddpo_rl.rewards.digits import DigitClassifier

    m = load_digits_model(packaged_model_dir())
    prompts = [p for p in m.prompts for _ in range(10)]
    x = sample_digits(m, prompts, num_inference_steps=20, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    pred = DigitClassifier(C=1.0)(m.decode(x)).argmax(-1)
    target = torch.arange(10).repeat_interleave(10)
    assert (pred == target).float().mean() > 0.8
