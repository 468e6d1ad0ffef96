"""FlowMatchingPolicy on a tiny SD3Transformer2DModel: its math, the env, the collector, the three losses,
the on-policy ratio, LoRA and the named errors."""

import pytest
import torch
from torchrl.envs.utils import check_env_specs

from ddpo_rl.advantages import compute_advantages
from ddpo_rl.collector import collect_trajectories, terminal_rewards, with_advantages
from ddpo_rl.flow_policy import FlowMatchingPolicy
from ddpo_rl.flow_sde import flow_schedule, flow_sde_step_gaussian
from ddpo_rl.keys import KEYS
from ddpo_rl.models.tiny import sd_ddim_scheduler
from ddpo_rl.objectives import make_loss
from ddpo_rl.policy import DiffusionPolicy
from ddpo_rl.trainer import DDPOTrainer, TrainConfig
from tests.helpers import (
    HashEncoder,
    flow_scheduler,
    make_flow_env,
    make_flow_policy,
    tiny_sd3_transformer,
    tiny_unet,
)


def test_head_is_cfg_velocity_then_the_sde_step():
    """The head = SD3 pipeline's guided transformer call + flow_sde_step_gaussian at sigmas[k], sigmas[k+1]."""
    enc = HashEncoder()
    policy = make_flow_policy(steps=4, guidance=4.0, encoder=enc)
    net = policy.noise_model
    cond, neg = enc(["a cat", "a dog"]), enc([""])
    x = torch.randn(2, 4, 8, 8)
    k = torch.tensor([0, 2])
    sched = flow_scheduler()
    sched.set_timesteps(4)
    with torch.no_grad():
        loc, scale = policy.head(x, k, cond[KEYS.prompt_embeds], cond[KEYS.pooled_prompt_embeds])
        # the SD3 pipeline's CFG: [uncond; cond] in one batch, timestep = scheduler.timesteps[k]
        out = net(
            hidden_states=torch.cat([x, x]),
            timestep=sched.timesteps[k].repeat(2),
            encoder_hidden_states=torch.cat([neg[KEYS.prompt_embeds].expand(2, -1, -1), cond[KEYS.prompt_embeds]]),
            pooled_projections=torch.cat([neg[KEYS.pooled_prompt_embeds].expand(2, -1), cond[KEYS.pooled_prompt_embeds]]),
        ).sample
        u, c = out.chunk(2)
        v = u + 4.0 * (c - u)
    mean, std = flow_sde_step_gaussian(v, sched.sigmas[k], sched.sigmas[k + 1], x, 0.7, sched.sigmas[1])
    torch.testing.assert_close(loc, mean)
    torch.testing.assert_close(scale, std)


def test_env_with_the_flow_schedule_and_pooled_embeddings():
    enc = HashEncoder()
    env = make_flow_env(batch_size=3, steps=4, encoder=enc)
    check_env_specs(env)
    policy = make_flow_policy(steps=4, encoder=enc)
    with torch.no_grad():
        td = env.rollout(4, policy)
    assert td.batch_size == (3, 4)
    s = flow_schedule(flow_scheduler(), 4)
    assert td[KEYS.timestep].dtype == torch.float32
    torch.testing.assert_close(td[KEYS.timestep][0], s.timesteps)  # float timesteps, shifted schedule
    assert td[KEYS.step_index][0].tolist() == [0, 1, 2, 3]
    expected = enc(env.base_env.prompts_of(td[KEYS.prompt_id][:, 0]))
    for key in (KEYS.prompt_embeds, KEYS.pooled_prompt_embeds):
        torch.testing.assert_close(td[key][:, 0], expected[key])
        torch.testing.assert_close(td[key][:, -1], expected[key])  # carried through the chain
    torch.testing.assert_close(td["next", KEYS.latents], td[KEYS.action])
    assert torch.isfinite(td[KEYS.log_prob]).all()


@pytest.mark.parametrize("loss_name", ["ddpo_is", "ddpo_sf", "rwr"])
def test_collect_group_advantages_and_train(loss_name):
    """End to end on a tiny SD3 transformer: collect (GRPO groups), advantages, the loss, optimizer steps.
    Before any step the importance ratio of every sample is exactly 1."""
    enc = HashEncoder()
    env = make_flow_env(batch_size=4, steps=3, encoder=enc, group_size=2)
    policy = make_flow_policy(steps=3, encoder=enc)
    policy.eval()
    traj = collect_trajectories(env, policy, num_batches=2)
    assert traj.batch_size == (8, 3)
    assert {KEYS.step_index, KEYS.pooled_prompt_embeds} <= set(traj.keys())  # what the policy re-reads
    ids = traj[KEYS.prompt_id][:, 0]
    assert (ids[0::2] == ids[1::2]).all()  # groups of 2 consecutive samples of one prompt
    adv = compute_advantages(terminal_rewards(traj), clip=5.0, group_size=2)
    traj = with_advantages(traj, adv)
    loss = make_loss(loss_name, policy)

    # on-policy check: on each batch as collected, the recomputed log-probs are the stored ones
    # (ratio exactly 1); on other batch compositions, to float32 round-off
    for rows in (slice(0, 4), slice(4, 8)):
        for j in range(3):
            step = traj[rows, j]
            assert torch.equal(policy.get_dist(step).log_prob(step[KEYS.action]), step[KEYS.log_prob])
        if loss_name == "ddpo_is":
            out = loss(traj[rows, 0])
            assert out["kl_approx"].item() == 0.0 and out["clip_fraction"].item() == 0.0
    lp = policy.get_dist(traj[:, 1]).log_prob(traj[:, 1][KEYS.action])
    torch.testing.assert_close(lp, traj[:, 1][KEYS.log_prob], rtol=0, atol=1e-5)

    inner = 1 if loss_name == "ddpo_sf" else 2
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    trainer = DDPOTrainer(loss, optimizer, TrainConfig(minibatch_size=4, num_inner_epochs=inner))
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = trainer.train(traj)
    assert all(torch.isfinite(v) for v in metrics.values())
    changed = sum(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert changed > 0.5 * len(before)
    if loss_name == "ddpo_is":
        assert metrics["kl_approx"] > 0  # after the first optimizer step the ratio moves off 1


def test_lora_on_the_transformer():
    from ddpo_rl.lora import apply_lora, lora_parameters

    enc = HashEncoder()
    net = tiny_sd3_transformer()
    x, k = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    c = enc(["a cat", "a dog"])
    base = make_flow_policy(steps=3, encoder=enc, transformer=net)
    with torch.no_grad():
        loc0, _ = base.head(x, k, c[KEYS.prompt_embeds], c[KEYS.pooled_prompt_embeds])
    apply_lora(net, rank=2, init_lora_weights=True)
    policy = make_flow_policy(steps=3, encoder=enc, transformer=net)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and len(trainable) == len(list(lora_parameters(net)))
    with torch.no_grad():
        loc1, _ = policy.head(x, k, c[KEYS.prompt_embeds], c[KEYS.pooled_prompt_embeds])
    torch.testing.assert_close(loc1, loc0)  # B = 0 at init: the adapted model is the base model
    env = make_flow_env(batch_size=2, steps=3, encoder=enc)
    traj = with_advantages(collect_trajectories(env, policy), torch.tensor([1.0, -1.0]))
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    DDPOTrainer(make_loss("ddpo_sf", policy), torch.optim.SGD(trainable, 0.1), TrainConfig(minibatch_size=2)).train(traj)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)
    with torch.no_grad():
        loc2, _ = policy.head(x, k, c[KEYS.prompt_embeds], c[KEYS.pooled_prompt_embeds])
    assert not torch.equal(loc2, loc0)


def test_a_model_without_pooled_projections():
    """Any module with the call (hidden_states, timestep, encoder_hidden_states): pooled=False."""

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 4)

        def forward(self, hidden_states, timestep, encoder_hidden_states):
            return (hidden_states * 0.1 + self.proj(encoder_hidden_states.mean(1))[:, :, None, None],)

    enc = HashEncoder(pooled=False)
    env = make_flow_env(batch_size=2, steps=3, encoder=enc)
    assert KEYS.pooled_prompt_embeds not in env.base_env.condition_keys
    policy = FlowMatchingPolicy(Velocity(), flow_scheduler(), 3, pooled=False, guidance_scale=2.0,
                                negative_prompt_embeds=enc([""]))
    traj = collect_trajectories(env, policy)
    assert torch.isfinite(traj[KEYS.log_prob]).all()


def test_bad_input_is_named():
    enc = HashEncoder()
    with pytest.raises(ValueError, match=r"^scheduler: DDIMScheduler is not a flow-matching scheduler"):
        FlowMatchingPolicy(tiny_sd3_transformer(), sd_ddim_scheduler(), 4)
    with pytest.raises(ValueError, match=r"^scheduler: FlowMatchEulerDiscreteScheduler is not a DDIM-family"):
        DiffusionPolicy(tiny_unet(), flow_scheduler(), 4)
    for a in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"^noise_level: "):
            make_flow_policy(noise_level=a, encoder=enc)
    with pytest.raises(ValueError, match=r"^negative_prompt_embeds: "):
        FlowMatchingPolicy(tiny_sd3_transformer(), flow_scheduler(), 4, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"^negative_pooled_prompt_embeds: "):
        FlowMatchingPolicy(tiny_sd3_transformer(), flow_scheduler(), 4, guidance_scale=2.0,
                           negative_prompt_embeds=enc([""])[KEYS.prompt_embeds])


def test_collector_refuses_an_env_and_policy_of_different_lengths():
    enc = HashEncoder()
    env, policy = make_flow_env(steps=4, encoder=enc), make_flow_policy(steps=3, encoder=enc)
    with pytest.raises(ValueError, match=r"^num_inference_steps: the env runs T=4 steps but the policy's schedule has T=3"):
        collect_trajectories(env, policy)


def test_fast_sampler_refuses_the_flow_policy():
    from ddpo_rl.sampling import FastSampler

    enc = HashEncoder()
    with pytest.raises(NotImplementedError, match="FastSampler replays DDIM steps; FlowMatchingPolicy"):
        FastSampler(make_flow_env(encoder=enc), make_flow_policy(encoder=enc))


# --- the SDE window (MixGRPO / Flow-GRPO-Fast): SDE inside, Euler ODE outside, only the window trained


def test_window_steps_carry_log_probs_and_outside_steps_are_euler():
    from ddpo_rl.flow_sde import flow_ode_step

    enc = HashEncoder()
    env = make_flow_env(batch_size=3, steps=5, encoder=enc)
    policy = make_flow_policy(steps=5, encoder=enc, sde_window_size=2, sde_window_start=1)
    assert policy.trained_steps == (1, 2)
    policy.eval()
    traj = collect_trajectories(env, policy)
    assert traj.batch_size == (3, 5)
    sched = flow_scheduler()
    sched.set_timesteps(5)
    for j in range(5):
        step = traj[:, j]
        with torch.no_grad():
            v = policy.head.predict(step[KEYS.latents], step[KEYS.step_index], step[KEYS.prompt_embeds],
                                    step[KEYS.pooled_prompt_embeds])
        euler = flow_ode_step(v, sched.sigmas[j], sched.sigmas[j + 1], step[KEYS.latents])
        if j in (1, 2):  # SDE: a Gaussian with a positive std and a finite, non-zero log-prob
            assert torch.isfinite(step[KEYS.log_prob]).all() and (step[KEYS.log_prob] != 0).all()
            assert (step[KEYS.action] - euler).abs().max() > 1e-3  # noise was added
        else:  # deterministic: exactly diffusers' Euler step, log-prob 0 (never trained on)
            torch.testing.assert_close(step[KEYS.action], euler)
            # the scheduler's own step
            sched._step_index = None
            ref = sched.step(v, sched.timesteps[j], step[KEYS.latents].clone()).prev_sample
            torch.testing.assert_close(step[KEYS.action], ref, rtol=1e-5, atol=1e-5)
            assert (step[KEYS.log_prob] == 0).all()


def test_window_training_ratio_is_one_at_the_first_inner_step_and_only_window_steps_train():
    enc = HashEncoder()
    env = make_flow_env(batch_size=4, steps=4, encoder=enc, group_size=2)
    policy = make_flow_policy(steps=4, encoder=enc, sde_window_size=2, sde_window_start=0)
    policy.eval()
    traj = collect_trajectories(env, policy)
    traj = with_advantages(traj, compute_advantages(terminal_rewards(traj), clip=5.0, group_size=2))
    loss = make_loss("ddpo_is", policy, clip_epsilon=1e-4)
    for j in policy.trained_steps:  # on-policy: ratio exactly 1 on the stored window steps
        out = loss(traj[:, j])
        assert out["kl_approx"].item() == 0.0 and out["clip_fraction"].item() == 0.0
    seen = []
    policy.head.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    trainer = DDPOTrainer(loss, torch.optim.AdamW(policy.parameters(), lr=1e-3),
                          TrainConfig(minibatch_size=4, step_indices=policy.trained_steps))
    metrics = trainer.train(traj)
    assert metrics["mean_ratio"].item() == pytest.approx(1.0, abs=1e-5)  # one optimizer step, after its forwards
    assert sorted({int(k) for s in seen for k in s}) == [0, 1]  # only the window's steps
    assert len(seen) == 2


def test_window_bad_input_is_named():
    with pytest.raises(ValueError, match="sde_window_size"):
        make_flow_policy(steps=4, sde_window_size=3, sde_window_start=2)
