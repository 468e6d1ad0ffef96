"""The digits model pretrained with the flow-matching objective (``DigitsConfig(objective="flow")``,
``--model digits-flow``): its scheduler, pretraining loss, reference sampler, saving, loading, and the
flow-matching policy driving its UNet."""

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import json

import pytest
import torch

from ddpo_rl.models import digits as digits_mod
from ddpo_rl.models.digits import (
    DigitsConfig,
    build_digits_model,
    is_digits_model_dir,
    load_digits_model,
    load_or_train_digits_model,
    packaged_model_dir,
    sample_digits,
    save_digits_model,
    saved_objective,
    train_digits_model,
)
from ddpo_rl.models.flow_digits import flow_matching_loss


@pytest.fixture(scope="module")
def model():
    return build_digits_model(DigitsConfig(objective="flow"), seed=0)


def test_flow_objective_has_the_flow_scheduler_and_the_same_network(model):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    epsilon = build_digits_model(seed=0)
    assert isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler) and model.scheduler.config.shift == 1.0
    assert isinstance(epsilon.scheduler, DDIMScheduler)
    assert (model.objective, epsilon.objective) == ("flow", "epsilon")
    assert model.unet.config == epsilon.unet.config  # the same UNet; only the objective differs
    with pytest.raises(ValueError, match="objective must be one of"):
        build_digits_model(DigitsConfig(objective="v"))


def test_pretraining_regresses_the_velocity_at_times_drawn_as_configured(monkeypatch):
    """The first step's loss is flow_matching_loss of the batch, noise and logit-normal times that the
    step's generator draws (replayed here), and the UNet is called with timestep 1000 t (floats)."""
    m = build_digits_model(DigitsConfig(objective="flow"), seed=3)
    calls = []
    real_forward = m.unet.forward

    def recording(x, *args, **kwargs):
        calls.append((args[0] if args else kwargs["timestep"]).detach().clone())
        return real_forward(x, *args, **kwargs)

    monkeypatch.setattr(m.unet, "forward", recording)
    _, result = train_digits_model(m, steps=1, batch_size=8, lr=0.0, warmup_steps=1, ema_decay=None, seed=5,
                                   progress=False, log_every=1)
    t = calls[0] / 1000
    assert t.dtype == torch.float32 and ((t > 0) & (t < 1)).all() and not torch.equal(t, t.round())
    # replay the step's draws with the same generator
    from ddpo_rl.models.digits_pretrain import pretraining_data
    from ddpo_rl.models.flow_digits import sample_flow_times

    m2 = build_digits_model(DigitsConfig(objective="flow"), seed=3)
    gen = torch.Generator().manual_seed(5)
    images, labels, prompt_ids, uncond = pretraining_data(m2, torch.device("cpu"))
    idx = torch.randint(len(images), (8,), generator=gen)
    drop = torch.rand(8, generator=gen) < 0.1
    with torch.no_grad():
        table = m2.text_encoder(prompt_ids).last_hidden_state
        cond = table[torch.where(drop, torch.full_like(labels[idx], uncond), labels[idx])]
        tt = sample_flow_times(8, "logit_normal", gen)
        noise = torch.randn(images[idx].shape, generator=gen)
        m2.unet.train()
        expected = flow_matching_loss(m2.unet, images[idx], noise, tt, cond, None, 1000)
    assert torch.allclose(tt, t)
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_pretraining_loss_falls():
    m = build_digits_model(DigitsConfig(objective="flow"), seed=0)
    _, result = train_digits_model(m, steps=60, batch_size=32, seed=0, progress=False, ema_decay=None)
    assert result.losses[-10:].mean() < 0.8 * result.losses[:10].mean()


def test_reference_sampler_integrates_the_ode_with_euler_steps(model):
    """sample_digits on the flow model: x <- x + (t_next - t) v at each scheduler step, v = the guided
    velocity; eta is refused."""
    from ddpo_rl.policy import classifier_free_guidance

    prompts = ["a handwritten digit 1", "a handwritten digit 7"]
    x = sample_digits(model, prompts, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    sched = type(model.scheduler).from_config(model.scheduler.config)
    sched.set_timesteps(4)
    y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = model.encode_prompts(prompts), model.encode_prompts([""])
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            v = classifier_free_guidance(lambda a, b, c: model.unet(a, b, encoder_hidden_states=c).sample,
                                         y, t.expand(2), [cond], [uncond], 2.0)
            y = y + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
    assert torch.allclose(x, y, atol=1e-5)
    with pytest.raises(ValueError, match="eta"):
        sample_digits(model, prompts, num_inference_steps=2, eta=1.0)


def test_save_load_roundtrip_keeps_the_objective(model, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    save_digits_model(model, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["name"] == "digits-flow-v1" and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert saved_objective(tmp_path / "m") == "flow"
    loaded = load_digits_model(tmp_path / "m")
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler) and loaded.objective == "flow"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([700.0, 12.5])
    ctx = model.encode_prompts(["a handwritten digit 4", ""])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, encoder_hidden_states=ctx).sample,
                           loaded.unet(x, t, encoder_hidden_states=ctx).sample)


def test_a_saved_model_whose_scheduler_is_unknown_is_refused(model, tmp_path):
    save_digits_model(model, tmp_path / "m")
    config = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "PNDMScheduler"}))
    assert saved_objective(tmp_path / "m") is None
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_digits_model(tmp_path / "m")


def test_lookup_trains_and_caches_the_flow_model_under_its_own_name(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPO_RL_CACHE", str(tmp_path / "root"))
    trained = []
    real_train = digits_mod.train_digits_model

    def counting_train(m, **kwargs):
        trained.append(m.objective)
        return real_train(m, **kwargs)

    monkeypatch.setattr(digits_mod, "train_digits_model", counting_train)
    m = load_or_train_digits_model(objective="flow", use_packaged=False, progress=False, steps=1, batch_size=4)
    assert trained == ["flow"] and m.objective == "flow"
    assert is_digits_model_dir(tmp_path / "root" / "digits-flow-v1")
    assert not (tmp_path / "root" / "digits-v1").exists()
    again = load_or_train_digits_model(objective="flow", progress=False)
    assert trained == ["flow"] and again.source == str(tmp_path / "root" / "digits-flow-v1")
    with pytest.raises(ValueError, match="objective"):
        load_or_train_digits_model(objective="v", progress=False)


def test_the_flow_policy_drives_the_unet_without_pooled_embeddings(model):
    """The flow policy's head (pooled=False) calls the UNet with (x, timestep=1000 t, encoder_hidden_states=c),
    and its Gaussian is the SDE step of that velocity (ddpo_rl.flow_sde)."""
    from ddpo_rl.flow_policy import FlowSDEHead
    from ddpo_rl.flow_sde import flow_schedule, flow_sde_step_gaussian

    head = FlowSDEHead(model.unet, model.scheduler, 4, noise_level=0.7, guidance_scale=1.0, pooled=False)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = model.encode_prompts(["a handwritten digit 2", "a handwritten digit 9"])
    sched = flow_schedule(model.scheduler, 4)
    with torch.no_grad():
        loc, scale = head(x, torch.tensor([1, 1]), ctx)
        v = model.unet(x, sched.timesteps[1].expand(2), encoder_hidden_states=ctx).sample
    mean, std = flow_sde_step_gaussian(v, sched.sigmas[1], sched.sigmas[2], x, 0.7, sched.sigma_max)
    assert torch.allclose(loc, mean, atol=1e-6) and torch.allclose(scale, std)
    assert float(sched.timesteps[1]) == pytest.approx(1000 * float(sched.sigmas[1]))


@pytest.mark.skipif(packaged_model_dir("flow") is None, reason="no digits-flow checkpoint committed in ddpo_rl/assets")
def test_packaged_flow_model_draws_the_prompted_digits():
    from ddpo_rl.rewards.digits import DigitClassifier

    m = load_digits_model(packaged_model_dir("flow"))
    assert m.objective == "flow"
    prompts = [p for p in m.prompts for _ in range(8)]
    x = sample_digits(m, prompts, num_inference_steps=10, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    pred = DigitClassifier(C=1.0)(m.decode(x)).argmax(-1)
    assert (pred == torch.arange(10).repeat_interleave(8)).float().mean() >= 0.9


def test_each_objective_pretrains_for_its_own_number_of_steps_by_default(monkeypatch):
    """train_digits_model(steps=None), what a first-use lookup runs, trains as the committed checkpoints
    were trained: 2000 steps for the flow objective, 1000 for epsilon (PRETRAIN_STEPS)."""
    from ddpo_rl.models import digits_pretrain

    seen = []

    def recording_loop(params, loss_fn, *, steps, **kwargs):
        seen.append(steps)
        return digits_pretrain.TrainResult(losses=torch.zeros(1), seconds=0.0)

    monkeypatch.setattr(digits_pretrain, "pretrain_loop", recording_loop)
    for objective in ("flow", "epsilon"):
        train_digits_model(build_digits_model(DigitsConfig(objective=objective)), progress=False)
    assert seen == [2000, 1000] == [digits_pretrain.PRETRAIN_STEPS[o] for o in ("flow", "epsilon")]
