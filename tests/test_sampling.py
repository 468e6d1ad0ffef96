"""The fast sampler (ddpo_rl.sampling) against the env path and against diffusers' DDIMScheduler.

CPU tests run the very step function that is captured as a CUDA graph on GPU (eagerly); the
GPU tests check that the captured graph and the eager loop agree. No timing here: see
benchmarks/.
"""

import math

import pytest
import torch

from ddpo_rl.advantages import compute_advantages
from ddpo_rl.collector import TRAJECTORY_KEYS, collect_trajectories, terminal_rewards, with_advantages
from ddpo_rl.keys import KEYS
from ddpo_rl.models.tiny import sd_ddim_scheduler
from ddpo_rl.objectives import make_loss
from ddpo_rl.precision import make_adamw
from ddpo_rl.policy import inference_timesteps
from ddpo_rl.sampling import EnvSampler, FastSampler, FastSamplingConfig, SamplingNoise, make_sampler, resolve_sampler
from ddpo_rl.trainer import DDPOTrainer, TrainConfig
from tests.helpers import make_env, make_policy, prompt_encoder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _keyset(td):
    return set(td.keys(True, True))


def _assert_same_trajectories(ref, out, atol=0.0, rtol=0.0):
    assert out.batch_size == ref.batch_size
    assert _keyset(out) == _keyset(ref) == {k if isinstance(k, str) else tuple(k) for k in TRAJECTORY_KEYS}
    for key in _keyset(ref):
        a, b = ref[key], out[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if a.is_floating_point():
            torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(a, b), key


@pytest.mark.parametrize("guidance, min_std", [(3.0, 0.0), (1.0, 0.0), (1.0, 0.5)])
def test_same_seeds_give_the_env_path_trajectories(guidance, min_std):
    """Same env seed (prompts, x_T) and global seed (step noise): the fast sampler reproduces
    collect_trajectories bitwise on CPU, latents, actions, log-probs and terminal rewards
    included (and the head's min_std floor)."""
    enc = prompt_encoder()
    env = make_env(batch_size=4, steps=5, encoder=enc)
    policy = make_policy(steps=5, guidance=guidance, encoder=enc, min_std=min_std)
    env.set_seed(11)
    torch.manual_seed(7)
    ref = collect_trajectories(env, policy, num_batches=2)

    sampler = FastSampler(env, policy)
    assert not sampler.graphed  # CPU: the eager fallback
    env.set_seed(11)
    torch.manual_seed(7)
    out = sampler.sample(num_batches=2)
    _assert_same_trajectories(ref, out)  # bitwise: the same ops in the same order
    assert torch.equal(terminal_rewards(out), terminal_rewards(ref))
    assert (out["next", KEYS.reward][:, :-1] == 0).all()
    assert out["next", KEYS.done][:, -1].all() and not out["next", KEYS.done][:, :-1].any()


def test_matches_a_hand_computed_ddim_scheduler_reference():
    """Given explicit noise, the sampler's chain is DDIMScheduler.step(eta=1, variance_noise=z)
    with CFG, and its log-probs are the mean over latent dims of N(mean, std^2).log_prob, with
    the mean and std computed here from the scheduler's alphas (independently of ddpo_rl.ddim)."""
    enc = prompt_encoder()
    B, T, w = 3, 4, 2.5
    env, policy = make_env(batch_size=B, steps=T, encoder=enc), make_policy(steps=T, guidance=w, encoder=enc)
    gen = torch.Generator().manual_seed(0)
    noise = SamplingNoise(
        prompt_ids=torch.tensor([2, 0, 1]),
        init_latents=torch.randn(B, 4, 8, 8, generator=gen),
        step_noise=torch.randn(T, B, 4, 8, 8, generator=gen),
    )
    out = FastSampler(env, policy).sample(noise=noise)

    sched = sd_ddim_scheduler()
    sched.set_timesteps(T)
    unet = policy.noise_model
    cond = env.base_env.embed_prompts(noise.prompt_ids)[KEYS.prompt_embeds]
    uncond = enc.negative_embeds().expand(B, -1, -1)
    x = noise.init_latents.clone()
    ac = sched.alphas_cumprod.double()
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            torch.testing.assert_close(out[KEYS.latents][:, k], x, atol=1e-5, rtol=1e-5)
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            eps = e_u + w * (e_c - e_u)
            z = noise.step_noise[k]
            step = sched.step(eps, t, x, eta=1.0, variance_noise=z)
            prev_t = int(t) - 1000 // T
            a_t = float(ac[int(t)])
            a_prev = float(ac[prev_t]) if prev_t >= 0 else float(sched.final_alpha_cumprod)
            std = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            mean = math.sqrt(a_prev) * step.pred_original_sample + math.sqrt(1 - a_prev - std**2) * eps
            torch.testing.assert_close(out[KEYS.action][:, k], step.prev_sample, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mean + std * z, step.prev_sample, atol=1e-5, rtol=1e-5)
            lp = torch.distributions.Normal(mean, std).log_prob(step.prev_sample).mean(dim=(1, 2, 3))
            torch.testing.assert_close(out[KEYS.log_prob][:, k], lp, atol=1e-4, rtol=1e-5)
            x = step.prev_sample
    assert torch.equal(out[KEYS.timestep][0], inference_timesteps(sched, T))
    assert torch.equal(out[KEYS.prompt_id], noise.prompt_ids[:, None].expand(B, T))
    torch.testing.assert_close(terminal_rewards(out), (x[:, :3] / 2 + 0.5).clamp(0, 1).mean(dim=(1, 2, 3)))


def test_trainer_consumes_fast_trajectories_with_fused_adamw():
    enc = prompt_encoder()
    env, policy = make_env(batch_size=4, encoder=enc), make_policy(encoder=enc)
    traj = FastSampler(env, policy).sample(num_batches=2)
    adv = compute_advantages(terminal_rewards(traj), env.base_env.prompts_of(traj[KEYS.prompt_id][:, 0]), None)
    optimizer = make_adamw(policy.parameters(), "fused", lr=1e-3)
    assert optimizer.defaults.get("fused") is True
    trainer = DDPOTrainer(make_loss("ddpo_is", policy), optimizer, TrainConfig(minibatch_size=4))
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = trainer.train(with_advantages(traj, adv))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_bf16_autocast_stays_close_on_cpu():
    """Autocast changes the network's precision only: the chain stays near the float32 one."""
    enc = prompt_encoder()
    env, policy = make_env(batch_size=2, steps=3, encoder=enc), make_policy(steps=3, encoder=enc)
    noise = FastSampler(env, policy).draw_noise(torch.Generator().manual_seed(0))
    ref = FastSampler(env, policy).sample(noise=noise)
    out = FastSampler(env, policy, FastSamplingConfig(autocast_dtype="bf16", channels_last=True)).sample(noise=noise)
    assert _keyset(out) == _keyset(ref)
    assert out[KEYS.log_prob].dtype == torch.float32 and torch.isfinite(out[KEYS.log_prob]).all()
    rel = (out[KEYS.action] - ref[KEYS.action]).abs().mean() / ref[KEYS.action].abs().mean()
    assert rel < 0.02, f"bf16 chain drifts {rel:.3f} (mean relative) from the float32 one"


def _seeded(fn, env_seed=5, seed=6):
    """Run ``fn`` with the env's and the global RNG seeded (what both samplers draw from)."""
    def run(env):
        env.set_seed(env_seed)
        torch.manual_seed(seed)
        return fn()
    return run


def _train_on_samples(sampler, env, policy):
    """One DDPO-IS epoch's update (optimizer steps update the weights in place) on fresh samples."""
    traj = _seeded(lambda: sampler.sample(num_batches=2))(env)
    adv = compute_advantages(terminal_rewards(traj), env.base_env.prompts_of(traj[KEYS.prompt_id][:, 0]), None)
    optimizer = make_adamw(policy.parameters(), lr=1e-2)
    DDPOTrainer(make_loss("ddpo_is", policy, clip_epsilon=1.0), optimizer, TrainConfig(minibatch_size=4)).train(
        with_advantages(traj, adv)
    )


def test_an_optimizer_step_between_samplings_changes_the_samples_as_the_env_path():
    """The graphed sampler is never stale: after an optimizer step (in place, as every trainer
    step is) its samples are the env path's with the new weights, bitwise on CPU."""
    enc = prompt_encoder()
    env, policy = make_env(batch_size=4, steps=4, encoder=enc), make_policy(steps=4, encoder=enc)
    sampler = make_sampler("graphed", env, policy)
    assert isinstance(sampler, FastSampler)
    before = _seeded(lambda: sampler.sample())(env)
    _train_on_samples(sampler, env, policy)
    after = _seeded(lambda: sampler.sample())(env)
    reference = _seeded(lambda: collect_trajectories(env, policy))(env)
    _assert_same_trajectories(reference, after)
    assert not torch.equal(before[KEYS.action], after[KEYS.action])
    assert sampler.rebuilds == 1  # in-place updates need no new graph


def test_rebuilds_when_parameters_are_replaced_lora_is_merged_or_the_mode_changes():
    """What a captured graph froze (storages, LoRA merge state, module modes; also the env's
    shapes) is checked before each batch; a change rebuilds the buffers and the graph, and the
    samples stay the env path's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ddpo_rl.lora import apply_lora

    enc = prompt_encoder()
    env, policy = make_env(batch_size=2, steps=3, encoder=enc), make_policy(steps=3, encoder=enc)
    apply_lora(policy.noise_model, rank=2)
    with torch.no_grad():  # a LoRA that changes the output, so merging it is visible
        for name, p in policy.noise_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    sampler = FastSampler(env, policy)

    def check(expected_rebuilds):
        out = _seeded(lambda: sampler.sample())(env)
        ref = _seeded(lambda: collect_trajectories(env, policy))(env)
        torch.testing.assert_close(out[KEYS.action], ref[KEYS.action], rtol=0, atol=0)
        assert sampler.rebuilds == expected_rebuilds

    check(1)
    check(1)  # nothing changed: no rebuild
    with torch.no_grad():
        for p in policy.parameters():
            p.data = p.data.clone()  # replaced storages (what .to(), load_state_dict(assign=True) do)
    check(2)
    for module in policy.noise_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    check(3)
    policy.train(not policy.training)  # a module mode (dropout and the like are frozen at capture)
    check(4)


def test_make_sampler_resolves_auto_by_device():
    enc = prompt_encoder()
    env, policy = make_env(batch_size=2, steps=2, encoder=enc), make_policy(steps=2, encoder=enc)
    assert resolve_sampler("auto", "cpu") == "env" and resolve_sampler("auto", "cuda") == "graphed"
    assert isinstance(make_sampler("auto", env, policy), EnvSampler)
    assert isinstance(make_sampler("graphed", env, policy), FastSampler)
    with pytest.raises(ValueError, match="sampler"):
        resolve_sampler("fast", "cpu")
    not_ddim = torch.nn.Module()  # a policy FastSampler cannot replay (e.g. flow matching): auto samples on the env path
    not_ddim.head = torch.nn.Module()
    assert isinstance(make_sampler("auto", env, not_ddim), EnvSampler)
    with pytest.raises(NotImplementedError, match="not a DDIM policy"):
        make_sampler("graphed", env, not_ddim)


def test_refuses_an_env_it_cannot_replay():
    from torchrl.envs import StepCounter

    enc = prompt_encoder()
    env, policy = make_env(batch_size=2, encoder=enc), make_policy(encoder=enc)
    env.append_transform(StepCounter())
    with pytest.raises(NotImplementedError, match="StepCounter"):
        FastSampler(env, policy)


# -- GPU ---------------------------------------------------------------------------------------


def _cuda_env_policy(B=4, T=6, guidance=3.0):
    enc = prompt_encoder()
    env = make_env(batch_size=B, steps=T, encoder=enc, device="cuda")
    policy = make_policy(steps=T, guidance=guidance, encoder=enc).to("cuda")
    return env, policy


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_cuda_graph_matches_eager_and_the_env_path(guidance):
    env, policy = _cuda_env_policy(guidance=guidance)
    graphed = FastSampler(env, policy, FastSamplingConfig(cuda_graph=True))
    eager = FastSampler(env, policy, FastSamplingConfig(cuda_graph=False))
    assert graphed.graphed and not eager.graphed
    noise = [eager.draw_noise(torch.Generator("cuda").manual_seed(i)) for i in range(2)]
    a = eager.sample(noise=noise)
    b = graphed.sample(noise=noise)  # first call: warm-up + capture + replay
    c = graphed.sample(noise=noise)  # replay of the captured graph
    _assert_same_trajectories(a, b, atol=1e-4, rtol=1e-4)
    _assert_same_trajectories(a, c, atol=1e-4, rtol=1e-4)

    env.set_seed(3)
    torch.manual_seed(4)
    ref = collect_trajectories(env, policy)
    env.set_seed(3)
    torch.manual_seed(4)
    _assert_same_trajectories(ref, graphed.sample(), atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.gpu
def test_cuda_graph_sees_in_place_weight_updates():
    env, policy = _cuda_env_policy()
    graphed = FastSampler(env, policy)
    eager = FastSampler(env, policy, FastSamplingConfig(cuda_graph=False))
    noise = eager.draw_noise(torch.Generator("cuda").manual_seed(0))
    before = graphed.sample(noise=noise)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # what an optimizer step does: in place
    after_graphed, after_eager = graphed.sample(noise=noise), eager.sample(noise=noise)
    _assert_same_trajectories(after_eager, after_graphed, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before[KEYS.action], after_graphed[KEYS.action])


@needs_cuda
@pytest.mark.gpu
def test_cuda_graph_bf16_channels_last():
    env, policy = _cuda_env_policy()
    fast = FastSampler(env, policy, FastSamplingConfig(autocast_dtype="bf16", channels_last=True))
    eager = FastSampler(env, policy, FastSamplingConfig(autocast_dtype="bf16", channels_last=True, cuda_graph=False))
    noise = eager.draw_noise(torch.Generator("cuda").manual_seed(0))
    _assert_same_trajectories(eager.sample(noise=noise), fast.sample(noise=noise), atol=1e-3, rtol=1e-3)


@needs_cuda
@pytest.mark.gpu
def test_cuda_graph_after_an_optimizer_step_and_replaced_parameters():
    """On CUDA the captured graph follows an optimizer step (in place) and is re-captured when
    the parameters are replaced: its samples stay the env path's."""
    env, policy = _cuda_env_policy()
    sampler = FastSampler(env, policy)
    _train_on_samples(sampler, env, policy)
    after = _seeded(lambda: sampler.sample())(env)
    _assert_same_trajectories(_seeded(lambda: collect_trajectories(env, policy))(env), after, atol=1e-4, rtol=1e-4)
    assert sampler.rebuilds == 1
    with torch.no_grad():
        for p in policy.parameters():
            p.data = p.data * 1.01  # new storages: the old graph would read freed memory
    replaced = _seeded(lambda: sampler.sample())(env)
    assert sampler.rebuilds == 2
    _assert_same_trajectories(_seeded(lambda: collect_trajectories(env, policy))(env), replaced, atol=1e-4, rtol=1e-4)
