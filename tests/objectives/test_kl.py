"""KL to the reference policy: the closed form, its gradient, both references, every loss."""

import ddpo_rl  # noqa: F401  (first: torchvision shim)

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ddpo_rl.ddim import gaussian_kl
from ddpo_rl.keys import KEYS
from ddpo_rl.lora import apply_lora, lora_parameters
from ddpo_rl.objectives import KLToReferenceLoss, make_loss
from ddpo_rl.policy import DiffusionPolicy
from ddpo_rl.models.tiny import sd_ddim_scheduler, tiny_unet
from tests.objectives.test_losses import ScaledNoise, make_batch


def _drift(params, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_kl_equals_torch_kl_divergence(reduction):
    g = torch.Generator().manual_seed(0)
    mu, mu_ref = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    std = torch.rand(5, 1, 1, 1, generator=g) + 0.1
    ref = kl_divergence(Normal(mu, std.expand_as(mu)), Normal(mu_ref, std.expand_as(mu))).flatten(1)
    ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
    torch.testing.assert_close(gaussian_kl(mu, mu_ref, std, reduction=reduction), ref)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_kl_gradient_is_the_closed_form(reduction):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 2, 3, 3, generator=g).requires_grad_()
    mu_ref, std = torch.randn(4, 2, 3, 3, generator=g), torch.rand(4, 1, 1, 1, generator=g) + 0.1
    gaussian_kl(mu, mu_ref, std, reduction=reduction).sum().backward()
    factor = 1 / 18 if reduction == "mean" else 1.0  # 18 latent dims
    torch.testing.assert_close(mu.grad, factor * (mu - mu_ref).detach() / std**2)


def _wrapped(policy, algorithm="ddpo_is", kl_coef=1.0, **kw):
    inner = make_loss(algorithm, policy, **({"clip_epsilon": 0.1} if algorithm == "ddpo_is" else {}))
    return KLToReferenceLoss(inner, policy.head, kl_coef=kl_coef, reduction=policy.log_prob_reduction, **kw)


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf", "rwr"])
def test_kl_is_zero_before_the_first_update_and_matches_the_heads(algorithm):
    policy = DiffusionPolicy(ScaledNoise(), sd_ddim_scheduler(), 5)
    loss = _wrapped(policy, algorithm, kl_coef=0.5)
    td = make_batch(policy)
    if algorithm == "rwr":
        td = loss.prepare_batch(td)
    out = loss(td.clone())
    assert out["kl_to_reference"].item() == 0.0 and out["loss_kl"].item() == 0.0
    assert {"loss_kl", "kl_to_reference"} <= set(out.keys()) and "loss_kl" in loss.out_keys
    _drift(policy.parameters())
    out = loss(td.clone())
    # by hand: the two heads' means at the batch's states, the closed form, mean over the batch
    args = (td[KEYS.latents], td[KEYS.timestep], td[KEYS.prompt_embeds])
    with torch.no_grad():
        loc, scale = policy.head(*args)
        ref_loc, _ = loss.reference_head(*args)
    expected = ((loc - ref_loc) ** 2 / (2 * scale**2)).flatten(1).mean(1).mean()
    assert expected > 0
    torch.testing.assert_close(out["kl_to_reference"], expected)
    torch.testing.assert_close(out["loss_kl"], 0.5 * expected)
    # the wrapper keeps the inner loss's behaviour: same objective, same on-policy flag
    inner_out = loss.loss_module(td.clone())
    torch.testing.assert_close(out["loss_objective"], inner_out["loss_objective"])
    assert loss.on_policy == getattr(loss.loss_module, "on_policy", False)


def test_loss_kl_gradient_matches_the_closed_form():
    policy = DiffusionPolicy(ScaledNoise(), sd_ddim_scheduler(), 5)
    loss = _wrapped(policy, "ddpo_sf", kl_coef=2.0)
    td = make_batch(policy)
    _drift(policy.parameters(), 0.2)
    params = list(policy.parameters())
    loss(td.clone())["loss_kl"].backward()
    got = torch.stack([p.grad.clone() for p in params])
    # closed form: d/dtheta of 2 * mean_n mean_d (mu - mu_ref)^2 / (2 sigma^2) through mu(theta)
    for p in params:
        p.grad = None
    args = (td[KEYS.latents], td[KEYS.timestep], td[KEYS.prompt_embeds])
    loc, scale = policy.head(*args)
    with torch.no_grad():
        ref_loc, _ = loss.reference_head(*args)
    dkl_dmu = 2.0 * (loc - ref_loc).detach() / scale**2 / loc[0].numel() / loc.shape[0]
    loc.backward(dkl_dmu)
    torch.testing.assert_close(got, torch.stack([p.grad for p in params]))


def test_sigma_scale_weights_each_steps_kl_by_one_plus_sigma2_over_s2():
    """kl_sigma_scale: loss_kl = beta * mean(KL_t * (1 + sigma_t^2 / s^2)); kl_to_reference stays the exact KL."""
    policy = DiffusionPolicy(ScaledNoise(), sd_ddim_scheduler(), 5)
    exact, weighted = _wrapped(policy, kl_coef=0.5), _wrapped(policy, kl_coef=0.5, sigma_scale=0.2)
    td = make_batch(policy)
    _drift(policy.parameters())
    weighted.reference_head.load_state_dict(exact.reference_head.state_dict())
    out_exact, out = exact(td.clone()), weighted(td.clone())
    args = (td[KEYS.latents], td[KEYS.timestep], td[KEYS.prompt_embeds])
    with torch.no_grad():
        loc, scale = policy.head(*args)
        ref_loc, _ = weighted.reference_head(*args)
    kl = ((loc - ref_loc) ** 2 / (2 * scale**2)).flatten(1).mean(1)
    sigma2 = scale.expand_as(loc).flatten(1)[:, 0] ** 2
    assert sigma2.unique().numel() > 1  # the batch holds several timesteps
    torch.testing.assert_close(out["kl_to_reference"], out_exact["kl_to_reference"])
    torch.testing.assert_close(out["loss_kl"], 0.5 * (kl * (1 + sigma2 / 0.2**2)).mean())
    assert out["loss_kl"] > out_exact["loss_kl"]
    with pytest.raises(ValueError, match="sigma_scale"):
        _wrapped(policy, sigma_scale=-1.0)


def test_zero_coefficient_runs_no_reference():
    policy = DiffusionPolicy(ScaledNoise(), sd_ddim_scheduler(), 5)
    loss = _wrapped(policy, kl_coef=0.0)
    assert loss.reference_head is None  # no copy made
    td = make_batch(policy)
    calls = []
    policy.head.register_forward_hook(lambda *a: calls.append(1))
    out = loss(td.clone())
    assert len(calls) == 1 and out["loss_kl"].item() == 0.0 and "kl_to_reference" not in out.keys()
    with pytest.raises(ValueError, match="kl_coef"):
        _wrapped(policy, kl_coef=-1.0)


def test_positive_coefficient_pulls_a_drifted_policy_back():
    policy = DiffusionPolicy(tiny_unet(seed=0), sd_ddim_scheduler(), 5)
    loss = _wrapped(policy, "ddpo_sf", kl_coef=1.0)
    td = make_batch_unet(policy)
    _drift(policy.parameters(), 0.02)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    kls = []
    for _ in range(5):
        out = loss(td.clone())
        kls.append(out["kl_to_reference"].item())
        opt.zero_grad()
        out["loss_kl"].backward()  # only the KL term
        opt.step()
    assert kls[0] > 0 and kls[-1] < 0.5 * kls[0], kls


def make_batch_unet(policy, n=4):
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(0)
    sched = sd_ddim_scheduler()
    sched.set_timesteps(5)
    td = TensorDict(
        {
            KEYS.latents: torch.randn(n, 4, 8, 8, generator=g),
            KEYS.timestep: sched.timesteps[torch.randint(5, (n,), generator=g)],
            KEYS.prompt_embeds: torch.randn(n, 4, 32, generator=g),
            KEYS.advantage: torch.randn(n, 1, generator=g),
        },
        batch_size=[n],
    )
    with torch.no_grad():
        policy(td)
    return td.exclude(KEYS.loc, KEYS.scale)


def test_lora_reference_is_the_base_model_with_adapters_disabled():
    base = tiny_unet(seed=0)
    unet = tiny_unet(seed=0)
    apply_lora(unet, rank=2, target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    policy = DiffusionPolicy(unet, sd_ddim_scheduler(), 5)
    loss = _wrapped(policy, "ddpo_sf", kl_coef=1.0)
    assert loss.reference == "adapters" and loss.reference_head is None  # no copy
    td = make_batch_unet(policy)
    assert loss(td.clone())["kl_to_reference"].item() == 0.0  # LoRA starts at B = 0
    _drift(lora_parameters(unet), 0.2)
    args = (td[KEYS.latents], td[KEYS.timestep], td[KEYS.prompt_embeds])
    with torch.no_grad():
        want = base(*args[:2], encoder_hidden_states=args[2]).sample
        adapted = unet(*args[:2], encoder_hidden_states=args[2]).sample
        assert not torch.equal(adapted, want)  # the adapters matter
        from ddpo_rl.objectives.kl import adapters_disabled

        with adapters_disabled(unet):
            got = unet(*args[:2], encoder_hidden_states=args[2]).sample
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # exactly the base model
        torch.testing.assert_close(loss.reference_mean(*args), DiffusionPolicy(base, sd_ddim_scheduler(), 5).head(*args)[0], rtol=0, atol=0)
    # the adapters are back on and still train after a KL step
    out = loss(td.clone())
    assert out["kl_to_reference"] > 0
    out["loss_kl"].backward()
    assert all(p.requires_grad and p.grad is not None for p in lora_parameters(unet))
    torch.testing.assert_close(unet(*args[:2], encoder_hidden_states=args[2]).sample.detach(), adapted)


@pytest.mark.parametrize("ratio", ["step", "chain"])
def test_kl_composes_with_the_dppo_loss(ratio):
    from tensordict import TensorDict
    from torchrl.modules import ValueOperator

    from ddpo_rl.control import make_dppo_loss, make_value_mlp, training_batch
    from ddpo_rl.control.ppo import ppo_update
    from tests.control.test_chain import OBS_DIM, make_actor

    actor, _ = make_actor(step_reduction="mean")
    critic = ValueOperator(make_value_mlp(OBS_DIM, 16), in_keys=["observation"])
    with torch.no_grad():
        td = actor(TensorDict({"observation": torch.randn(4, 8, OBS_DIM)}, batch_size=[4, 8]))
    td["advantage"], td["value_target"] = torch.randn(4, 8, 1), torch.randn(4, 8, 1)
    batch = training_batch(td, actor, ratio)
    inner = make_dppo_loss(actor, critic, ratio)
    loss = KLToReferenceLoss(inner, actor.head, kl_coef=1.0, event_dim=1, reduction="mean")
    assert loss(batch.clone())["kl_to_reference"].item() == 0.0
    _drift(actor.step_policy.parameters(), 0.05)
    out = loss(batch.clone())
    assert out["kl_to_reference"] > 0 and "loss_critic" in out.keys()
    # DPPO's update minimises loss_kl with the rest: KL-only steps (no actor objective) pull it back
    before = out["kl_to_reference"].item()
    loss.kl_coef = 100.0
    opt = torch.optim.Adam(actor.step_policy.parameters(), lr=1e-3)
    metrics = ppo_update(loss, opt, batch, num_passes=3, minibatch_size=batch.shape[0], train_actor=False)
    assert "kl_to_reference" in metrics
    assert loss(batch.clone())["kl_to_reference"].item() < before


@pytest.mark.parametrize("reference", ["copy", "adapters"])
def test_kl_with_the_flow_policy_is_zero_before_the_first_update(reference):
    """The flow-matching policy's KL: the reference forward uses the flow head (FlowSDEHead, the SDE
    step's mean), 0 before any update, the closed form after a drift."""
    from ddpo_rl.collector import collect_trajectories, with_advantages
    from tests.helpers import HashEncoder, make_flow_env, make_flow_policy, tiny_sd3_transformer

    enc = HashEncoder()
    net = tiny_sd3_transformer()
    if reference == "adapters":
        apply_lora(net, rank=2)
    policy = make_flow_policy(steps=3, encoder=enc, transformer=net)
    policy.eval()
    traj = collect_trajectories(make_flow_env(batch_size=4, steps=3, encoder=enc, group_size=2), policy)
    traj = with_advantages(traj, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    loss = _wrapped(policy, "ddpo_is", kl_coef=0.1, reference=reference)
    assert loss.reference == reference
    if reference == "copy":
        assert type(loss.reference_head).__name__ == "FlowSDEHead"
    for j in range(3):
        out = loss(traj[:, j])
        assert out["kl_to_reference"].item() == 0.0 and out["loss_kl"].item() == 0.0
    _drift(lora_parameters(net) if reference == "adapters" else net.parameters(), 0.05)
    step = traj[:, 1]
    out = loss(step)
    args = (step[KEYS.latents], step[KEYS.step_index], step[KEYS.prompt_embeds], step[KEYS.pooled_prompt_embeds])
    with torch.no_grad():
        loc, scale = policy.head(*args)
        ref_loc = loss.reference_mean(*args)
    expected = ((loc - ref_loc) ** 2 / (2 * scale**2)).flatten(1).mean(1).mean()
    assert expected > 0
    torch.testing.assert_close(out["kl_to_reference"], expected)
