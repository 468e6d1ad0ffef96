"""DPPO on gymnasium control: behaviour-clone a diffusion policy from a scripted expert, then
fine-tune it with PPO (ClipPPOLoss + value critic + GAE) through the denoising chain.

    python recipes/dppo_gym.py --env Pendulum-v1 --epochs 30 --seed 0 --output-dir outputs/dppo_pendulum

Stages (see docs/dppo_gym.md for measured figures):

1. demonstrations: the scripted expert of envs/gym_control.py, with action noise;
2. behaviour cloning: the denoising loss (ddpo_rl/control/bc.py) on the normalised actions;
3. RL fine-tuning, ``epochs`` times: collect ``num_envs x rollout_steps`` env steps with the
   :class:`DenoisingChainActor` (K denoising steps per env step, chain and log-probs recorded),
   GAE, ``ppo_passes`` passes of ClipPPOLoss (ddpo_rl/control/ppo.py). The policy is evaluated
   on a separate env reseeded each time (same initial states): before fine-tuning, every
   ``eval_every`` epochs, and after the last epoch.

Outputs in ``output_dir``: config.json, metrics.jsonl (one object per epoch: epoch,
episode_return_mean (of the rollout collected at the start of that epoch, i.e. before its
update), loss, clip_fraction, kl_approx, seconds, ...; every ``eval_every`` epochs also
eval_return_mean, the return on a reseeded eval env (same initial states each time); then a final
``"epoch": epochs`` record with the evaluation of the fine-tuned policy), summary.json (evaluation
return before/after fine-tuning), returns.png,
bc.pt (state dict after behaviour cloning) and checkpoint.pt (noise model, critic, optimizer;
checksummed, see ddpo_rl.checkpoint). The directory is guarded like the DDPO recipes' (ddpo_rl.run_dir):
locked while the run lives, and an earlier run in it is replaced only with ``--overwrite true``.
SIGINT/SIGTERM (Ctrl-C): the epoch in progress finishes, then returns.png, checkpoint.pt and summary.json
are written as at the end, summary.json saying ``"interrupted": true``, ``epochs_trained`` and the epoch
of the last evaluation (``return_after_epoch``); a second signal stops at once.
checkpoint.pt is also written every ``save_every`` epochs (1: each); ``--resume RUN_DIR`` goes on from
it exactly (weights, optimizer, every random stream, the envs' included; the records of later
epochs, from a kill, are dropped), ``--resume RUN_DIR --epochs N`` trains a finished run further.
"""

from __future__ import annotations

import ddpo_rl  # noqa: F401  (first: the torchvision shim, before diffusers)

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import ValueOperator
from torchrl.objectives.value import GAE

from ddpo_rl.atomic import atomic_file, write_json, write_text
from ddpo_rl.checkpoint import atomic_torch_save, read_checkpoint, rng_state, run_dir_of, set_rng_state
from ddpo_rl.config import ConfigError, check_finite_floats, expand_user_paths, stored_config
from ddpo_rl.errors import report_user_errors
from ddpo_rl.cli import parse
from ddpo_rl.ddim import LOG_PROB_REDUCTIONS
from ddpo_rl.loggers import LOGGERS, check_logger, make_run_logger
from ddpo_rl.objectives.dppo import RATIO_FORMS, make_dppo_loss
from ddpo_rl.control import (
    BCConfig,
    DenoisingChainActor,
    NoisePredictionMLP,
    ObservationScaler,
    fit_behaviour_cloning,
    make_action_scheduler,
    make_step_policy,
    make_value_mlp,
    ppo_update,
    training_batch,
)
from ddpo_rl.plotting import save_curve_png
from ddpo_rl.reporting import format_or_na
from ddpo_rl.jsonl import dumps, read_records
from ddpo_rl.stop import StopRequest
from ddpo_rl.run_dir import RunDir, history_entry, lines_up_to_epoch, read_config, resume_changes
from envs.gym_control import (
    CONTROL_TASKS,
    action_bounds,
    collect_demonstrations,
    completed_episode_returns,
    env_rng_state,
    make_control_env,
    scripted_expert,
    set_env_rng_state,
)


@dataclass
class DPPOGymConfig:
    """Every setting of a run; written to config.json."""

    env: str = "Pendulum-v1"
    """Gymnasium id of a continuous-action task (Pendulum-v1 or MountainCarContinuous-v0 have demonstrators)."""
    seed: int = 0
    """Seeds torch, the envs and the shuffles."""
    epochs: int = 30
    """RL epochs (collect + update)."""
    output_dir: str = "outputs/dppo_gym"
    """Where config.json, metrics.jsonl, summary.json, returns.png and checkpoints go."""
    num_envs: int = 8
    """Parallel env copies (a gymnasium vector env in lockstep)."""
    rollout_steps: int = 200
    """Env steps per copy and epoch (Pendulum's episode is 200; MountainCarContinuous's up to 999)."""
    # -- the diffusion policy
    num_train_timesteps: int = 100
    """Training timesteps of the action DDIMScheduler (cosine betas, clip_sample to [-1, 1])."""
    denoising_steps: int = 5
    """K: DDIM steps per env step (the inner MDP's length)."""
    eta: float = 1.0
    """DDIM eta, in (0, 1] (> 0: each step is a Gaussian with a log-prob; 1 is the most DDIM allows)."""
    min_std: float = 0.1
    """Floor on each denoising step's std, in normalised action units (DPPO uses 0.1)."""
    hidden_dim: int = 128
    """Width of the noise MLP."""
    num_layers: int = 3
    """Hidden layers of the noise MLP."""
    # -- demonstrations and behaviour cloning
    demo_rollouts: int = 4
    """Expert rollouts of num_envs x rollout_steps steps each."""
    demo_noise: float = 0.1
    """Gaussian noise on the expert's action, in half action ranges."""
    demo_gain: float = 1.0
    """Gain of the expert (< 1: a weaker expert, for a deliberately imperfect start)."""
    bc_steps: int = 3000
    """Behaviour-cloning optimizer steps (0: fine-tune a randomly initialised model)."""
    bc_batch_size: int = 256
    """Behaviour-cloning batch size."""
    bc_lr: float = 1e-3
    """Behaviour-cloning learning rate."""
    # -- PPO
    ratio: Literal[RATIO_FORMS] = "step"
    """"step": DPPO's per-denoising-step ratios; "chain": one ratio per env step (whole chain)."""
    chain_reduction: Literal[LOG_PROB_REDUCTIONS] = "sum"
    """Reduction of the K step log-probs into the chain log-prob ("sum" = joint density, or "mean")."""
    clip_epsilon: float = 0.2
    """PPO clip range: of per-step ratios ("step"), or of chain ratios ("chain": use ~K times less)."""
    gamma: float = 0.99
    """Discount of the env MDP."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    reward_scale: float = 0.1
    """Rewards are multiplied by this before GAE (Pendulum's are in [-16.3, 0])."""
    ppo_passes: int = 8
    """Shuffled passes over each epoch's batch."""
    minibatch_size: int = 1000
    """Samples per gradient step (one-step transitions for "step", env steps for "chain")."""
    actor_lr: float = 1e-4
    """Adam learning rate of the noise model during fine-tuning."""
    critic_lr: float = 1e-3
    """Adam learning rate of the value critic."""
    critic_coeff: float = 0.5
    """Weight of the value loss."""
    critic_warmup_epochs: int = 2
    """First epochs that train only the critic (the fresh critic's advantages would hurt the BC policy)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    eval_episodes: int = 16
    """Episodes of each evaluation (one per env copy of a separate eval env)."""
    eval_seed: int = 12345
    """The eval env and the policy's sampling noise are reseeded with this before every evaluation:
    same initial states and same noise each time, so before/after returns differ by the policy only."""
    eval_every: int = 5
    """Evaluate every this many epochs (and always before the first and after the last)."""
    progress: bool = True
    """Show a rich progress bar."""
    logger: Literal[LOGGERS] = "none"
    """Also send metrics and returns.png to a torchrl logger: "csv", "tensorboard", "wandb" or "mlflow"
    (files under output_dir/logs); "none": only the run directory's own files."""
    logger_kwargs: dict = field(default_factory=dict)
    """Options of the logger's constructor, e.g. {"project": "dppo", "offline": true} for W&B."""
    overwrite: bool = False
    """Replace an earlier run found in output_dir; without it such a directory is refused."""
    save_every: int = 1
    """Write checkpoint.pt every this many epochs (and on a stop, and at the end): where --resume goes on from."""
    resume: str | None = None
    """A run directory to go on with from its checkpoint.pt, exactly (weights, optimizer, every random
    stream, the envs' included): with its own config, of which only epochs (to train further),
    eval_every, save_every, progress, logger and logger_kwargs may change; output_dir follows it."""

    def validate(self) -> None:
        """ConfigError (one line, naming the field) on any setting that cannot run, before anything is written."""
        check_finite_floats(self)
        expand_user_paths(self)
        if self.resume:  # a resumed run goes on in its own directory
            self.output_dir = run_dir_of(self.resume)
        if self.ratio not in RATIO_FORMS:
            raise ConfigError(f"ratio: {self.ratio!r} is not one of {RATIO_FORMS}")
        if self.chain_reduction not in LOG_PROB_REDUCTIONS:
            raise ConfigError(f"chain_reduction: {self.chain_reduction!r} is not one of {LOG_PROB_REDUCTIONS}")
        for name in ("epochs", "num_envs", "rollout_steps", "denoising_steps", "ppo_passes", "minibatch_size",
                     "num_train_timesteps", "hidden_dim", "num_layers", "demo_rollouts", "bc_batch_size",
                     "eval_episodes", "eval_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("bc_steps", "critic_warmup_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("eta", "min_std", "bc_lr", "actor_lr", "critic_lr", "clip_epsilon", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("seed", "eval_seed"):  # gymnasium's and torch's seeds
            if not 0 <= getattr(self, name) < 2**63:
                raise ConfigError(f"{name}: must be in [0, 2**63), got {getattr(self, name)}")
        if self.eta > 1:
            raise ConfigError(f"eta: DDIM's eta is at most 1 (the DDPM posterior's variance), got {self.eta}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("reward_scale", "critic_coeff", "demo_gain"):  # 0 would train nothing (or on no expert)
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.demo_noise < 0:
            raise ConfigError(f"demo_noise: must be >= 0 (a standard deviation), got {self.demo_noise}")
        if self.denoising_steps > self.num_train_timesteps:
            raise ConfigError(f"denoising_steps: {self.denoising_steps} DDIM steps need at least as many training "
                              f"timesteps, got num_train_timesteps {self.num_train_timesteps}")
        self.check_env()

    def check_env(self) -> None:
        """The env id exists, has continuous actions and a scripted demonstrator."""
        import gymnasium as gym

        try:
            probe = gym.make(self.env)
        except gym.error.Error as err:
            raise ConfigError(f"env: {self.env!r} is not a gymnasium env id ({err}); e.g. {', '.join(CONTROL_TASKS)}") from None
        space = probe.action_space
        probe.close()
        if not isinstance(space, gym.spaces.Box):
            raise ConfigError(f"env: {self.env} has a {type(space).__name__} action space; DPPO here needs continuous "
                              f"(Box) actions, e.g. {', '.join(CONTROL_TASKS)}")
        if self.env not in CONTROL_TASKS:
            raise ConfigError(f"env: no scripted demonstrator for {self.env} (behaviour cloning needs one); "
                              f"available: {', '.join(CONTROL_TASKS)}")


CHANGEABLE_ON_RESUME = frozenset({"epochs", "eval_every", "save_every", "progress", "logger", "logger_kwargs"})
"""The fields a ``--resume`` may change: when to stop, evaluate and checkpoint (an evaluation reseeds
its own env and noise, so its cadence does not change training), and what is shown or logged."""

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "returns.png", "bc.pt", "checkpoint.pt", "logs",
             "checkpoint.prev.pt")
"""What a run writes in its output_dir (what ``--overwrite true`` removes; nothing else is touched)."""


def build_policy(cfg: DPPOGymConfig, env):
    """(chain actor, critic, scheduler) for ``env``'s observation and action sizes."""
    obs_spec = env.observation_spec["observation"]
    obs_dim = obs_spec.shape[-1]
    low, high = action_bounds(env)
    obs_space = obs_spec.space
    obs_low, obs_high = obs_space.low, obs_space.high
    while obs_low.dim() > 1:
        obs_low, obs_high = obs_low[0], obs_high[0]
    scaler = ObservationScaler.from_bounds(obs_low, obs_high)
    noise_model = NoisePredictionMLP(low.numel(), obs_dim, cfg.hidden_dim, cfg.num_layers, observation_scaler=scaler)
    scheduler = make_action_scheduler(cfg.num_train_timesteps)
    step_policy = make_step_policy(noise_model, scheduler, cfg.denoising_steps, eta=cfg.eta, min_std=cfg.min_std)
    actor = DenoisingChainActor(step_policy, scheduler, low, high, chain_reduction=cfg.chain_reduction)
    critic = ValueOperator(
        make_value_mlp(obs_dim, observation_scaler=ObservationScaler.from_bounds(obs_low, obs_high)),
        in_keys=["observation"],
    )
    return actor, critic, scheduler


@torch.no_grad()
def rollout(env, actor, steps: int):
    with set_exploration_type(ExplorationType.RANDOM):
        return env.rollout(steps, actor, break_when_any_done=False)


def evaluate(env, actor, steps: int, seed: int) -> tuple[float, float]:
    """(mean, std) return of the completed episodes of one rollout from the reseeded eval env (NaN, NaN
    when none was completed: ``rollout_steps`` shorter than an episode).

    Both the eval env (initial states) and torch's RNG (the policy's sampling noise) are reseeded
    with ``seed``, the latter inside ``fork_rng``: every evaluation sees the same initial states and
    the same noise (an unchanged policy scores exactly the same), and evaluating does not move the
    training run's RNG stream (``eval_every`` does not change the training trajectory).
    """
    env.set_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        returns = completed_episode_returns(rollout(env, actor, steps))
    if returns.numel() == 0:  # no episode ended within the rollout: no figure (null in metrics.jsonl)
        return float("nan"), float("nan")
    return returns.mean().item(), (returns.std().item() if returns.numel() > 1 else 0.0)


def run(cfg: DPPOGymConfig) -> dict:
    """Run BC then DPPO; returns the summary (also written to summary.json)."""
    cfg.validate()
    check_logger(cfg.logger, cfg.logger_kwargs)
    run_dir = RunDir(cfg.output_dir, RUN_FILES, overwrite_hint="--overwrite true")
    run_dir.open(resume=bool(cfg.resume), overwrite=cfg.overwrite)
    try:
        return _run(cfg, run_dir)
    finally:
        run_dir.close()


def _restore(cfg: DPPOGymConfig, run_dir: RunDir, noise_model, critic, optimizer, gen, env) -> tuple[dict, int, list]:
    """--resume: load checkpoint.pt (checksummed; the previous one if it is damaged) into the models, the
    optimizer and every random stream; keep the records of the epochs it covers (metrics.jsonl) and
    record the resume in config.json. Returns (the pre-RL stage's figures, the epoch to go on from,
    config.json's history)."""
    loaded = read_checkpoint(str(Path(cfg.output_dir) / "checkpoint.pt"), kind="dppo_gym",
                             required=("noise_model", "critic", "optimizer", "epochs_trained"))
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    state = loaded.state
    if "rng" not in state:
        raise ConfigError(f"resume: {loaded.path} was written by a version of dppo_gym that did not record its random "
                          "state, so the run cannot go on exactly; start a new run")
    noise_model.load_state_dict(state["noise_model"])
    critic.load_state_dict(state["critic"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], gen)
    set_env_rng_state(env, state["env_rng"])
    start = int(state["epochs_trained"])
    if cfg.epochs < start:  # before anything is written
        raise ConfigError(f"epochs: {cfg.epochs} is below the epochs the run has trained ({start}); give --epochs "
                          f"{start} or more")
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    write_text(path, "".join(lines_up_to_epoch(path, start - 1)) if os.path.exists(path) else "")
    stored, history = (state["config"], state["history"]) if "config" in state else read_config(cfg.output_dir)
    changed = resume_changes(stored, dataclasses.asdict(cfg), CHANGEABLE_ON_RESUME,
                             defaults=dataclasses.asdict(DPPOGymConfig()))
    history = [*history, history_entry("resume", start, changed or None)]
    run_dir.write_config({**dataclasses.asdict(cfg), "resume": None}, history)
    said = "; ".join(f"{k}: {v['from']!r} -> {v['to']!r}" for k, v in changed.items()) or "no config change"
    print(f"resume: continuing {cfg.output_dir} after epoch {start} ({said})", file=sys.stderr, flush=True)
    return state["stage"], start, history


def _run(cfg: DPPOGymConfig, run_dir: RunDir) -> dict:
    with StopRequest() as stop:  # the first SIGINT/SIGTERM: the epoch in progress finishes, then the run stops
        return _run_until(cfg, run_dir, stop)


def _run_until(cfg: DPPOGymConfig, run_dir: RunDir, stop: StopRequest) -> dict:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    gen = torch.Generator().manual_seed(cfg.seed)
    env = make_control_env(cfg.env, cfg.num_envs, seed=cfg.seed)
    actor, critic, scheduler = build_policy(cfg, env)
    noise_model = actor.step_policy.noise_model
    loss_module = make_dppo_loss(actor, critic, cfg.ratio, cfg.clip_epsilon, cfg.critic_coeff)
    gae = GAE(gamma=cfg.gamma, lmbda=cfg.gae_lambda, value_network=critic, average_gae=False)
    optimizer = torch.optim.Adam(
        [{"params": noise_model.parameters(), "lr": cfg.actor_lr}, {"params": critic.parameters(), "lr": cfg.critic_lr}]
    )

    def save_checkpoint(epochs_trained: int) -> None:
        """checkpoint.pt: what --resume continues from after ``epochs_trained`` epochs (every random stream
        as the next epoch will draw from it; the previous file kept as checkpoint.prev.pt)."""
        atomic_torch_save(
            {"noise_model": noise_model.state_dict(), "critic": critic.state_dict(), "optimizer": optimizer.state_dict(),
             "epochs_trained": epochs_trained, "epoch": epochs_trained, "rng": rng_state(gen),
             "env_rng": env_rng_state(env), "stage": stage,
             # config.json's content, for a resume that finds that file gone or damaged
             "config": {**dataclasses.asdict(cfg), "resume": None}, "history": history},
            str(out / "checkpoint.pt"),
            kind="dppo_gym",
        )

    if cfg.resume:  # the state after the checkpoint's epoch: weights, optimizer, random streams, records
        stage, start, history = _restore(cfg, run_dir, noise_model, critic, optimizer, gen, env)
    else:
        run_dir.clear_earlier_run()  # --overwrite true: only now that the run can start
        history = [history_entry("start", 0)]  # config.json's: the start, then each resume
        run_dir.write_config(dataclasses.asdict(cfg), history)
        # 1-2. demonstrations and behaviour cloning
        t0 = time.perf_counter()
        expert = scripted_expert(cfg.env, gain=cfg.demo_gain, noise_std=cfg.demo_noise)
        demos = collect_demonstrations(env, expert, cfg.demo_rollouts, cfg.rollout_steps)
        bc_cfg = BCConfig(steps=cfg.bc_steps, batch_size=cfg.bc_batch_size, lr=cfg.bc_lr)
        bc_progress = Progress(
            TextColumn(f"[bold]behaviour cloning {cfg.env}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TimeElapsedColumn(), disable=not cfg.progress or not cfg.bc_steps,
        )
        with bc_progress:
            bc_task = bc_progress.add_task("bc", total=cfg.bc_steps)
            bc_losses = fit_behaviour_cloning(
                noise_model, scheduler, demos["observation"], actor.to_normalized_action(demos["action"]), bc_cfg, gen,
                on_step=lambda done: bc_progress.update(bc_task, completed=done),
            )
        with atomic_file(out / "bc.pt") as tmp:
            torch.save(noise_model.state_dict(), tmp)
        stage = {  # what the summary says of the stages before RL (a resumed run does not redo them)
            "expert_return_mean": completed_episode_returns(demos).mean().item(),
            "bc_final_loss": bc_losses[-100:].mean().item() if bc_losses.numel() else None,
            "bc_seconds": time.perf_counter() - t0,
        }
        start = 0
        (out / "metrics.jsonl").write_text("")

    # 3. RL fine-tuning
    if cfg.critic_warmup_epochs >= cfg.epochs:  # the default warm-up, on a short run (a smoke test)
        print(f"note: critic_warmup_epochs {cfg.critic_warmup_epochs}: the {cfg.epochs} epoch(s) of this run train only "
              "the critic; the policy is not fine-tuned", file=sys.stderr, flush=True)
    records = read_records(out / "metrics.jsonl")
    metrics_file = (out / "metrics.jsonl").open("a")
    # resumed: the records kept are those of epochs up to start - 1 (they count from epoch 0)
    run_logger = make_run_logger(cfg.logger, str(out), cfg.logger_kwargs, start_epoch=start - 1 if cfg.resume else None,
                                 hparams=dataclasses.asdict(cfg))
    progress = Progress(
        TextColumn("[bold]DPPO {task.fields[env]}"),
        BarColumn(),
        TextColumn("epoch {task.completed}/{task.total}"),
        TextColumn("return {task.fields[ret]}"),
        TimeElapsedColumn(),
        disable=not cfg.progress,
    )
    eval_env = make_control_env(cfg.env, cfg.eval_episodes, seed=cfg.eval_seed)
    epochs_trained = min(start, cfg.epochs)
    with progress:
        task = progress.add_task("dppo", total=cfg.epochs, completed=epochs_trained, env=cfg.env, ret="-")
        for epoch in range(start, cfg.epochs + 1):
            if stop.requested and epoch < cfg.epochs:  # SIGINT/SIGTERM: stop before the next epoch
                break
            t_epoch = time.perf_counter()
            record: dict = {"epoch": epoch}
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                record["eval_return_mean"], record["eval_return_std"] = evaluate(
                    eval_env, actor, cfg.rollout_steps, cfg.eval_seed
                )
            if epoch < cfg.epochs:  # the last record only evaluates the fine-tuned policy
                data = rollout(env, actor, cfg.rollout_steps)
                returns = completed_episode_returns(data)
                record["episode_return_mean"] = returns.mean().item() if returns.numel() else float("nan")
                record["episodes"] = returns.numel()
                with torch.no_grad():
                    data.get(("next", "reward")).mul_(cfg.reward_scale)
                    gae(data)
                batch = training_batch(data, actor, cfg.ratio)
                record.update(
                    ppo_update(
                        loss_module,
                        optimizer,
                        batch,
                        cfg.ppo_passes,
                        cfg.minibatch_size,
                        cfg.max_grad_norm,
                        train_actor=epoch >= cfg.critic_warmup_epochs,
                        generator=gen,
                    )
                )
            else:
                record["episode_return_mean"] = record["eval_return_mean"]
            record["seconds"] = time.perf_counter() - t_epoch
            records.append(record)
            metrics_file.write(dumps(record) + "\n")
            metrics_file.flush()
            if run_logger is not None:
                run_logger.sync()
            progress.update(task, completed=min(epoch + 1, cfg.epochs), ret=format_or_na(record["episode_return_mean"], ".1f"))
            epochs_trained = min(epoch + 1, cfg.epochs)
            if epoch < cfg.epochs and epochs_trained % cfg.save_every == 0:
                save_checkpoint(epochs_trained)
    metrics_file.close()
    interrupted = epochs_trained < cfg.epochs

    evals = [r for r in records if "eval_return_mean" in r]
    rollouts = records if interrupted else records[:-1]  # the last record of a finished run only evaluates
    save_curve_png(
        str(out / "returns.png"),
        {
            "training rollouts": ([r["epoch"] for r in rollouts], [r["episode_return_mean"] for r in rollouts]),
            "evaluation (fixed initial states)": ([r["epoch"] for r in evals], [r["eval_return_mean"] for r in evals]),
            "scripted expert (demonstrations)": ([0, cfg.epochs], [stage["expert_return_mean"]] * 2),
        },
        title=f"DPPO fine-tuning on {cfg.env}",
        xlabel="epoch",
        ylabel="return",
    )
    save_checkpoint(epochs_trained)  # on a stop, and at the end (a resume with more epochs goes on from it)
    summary = {
        "env": cfg.env,
        **stage,
        "epochs": cfg.epochs,
        "epochs_trained": epochs_trained,
        # stopped by SIGINT/SIGTERM: "return_after" is then the last evaluation's, after
        # "return_after_epoch" epochs, not the fine-tuned policy's
        "interrupted": interrupted,
        "return_before": evals[0]["eval_return_mean"] if evals else None,
        "return_after": evals[-1]["eval_return_mean"] if evals else None,
        "return_after_epoch": evals[-1]["epoch"] if evals else None,
        "eval_curve": [(r["epoch"], r["eval_return_mean"]) for r in evals],
        "rl_seconds": sum(r["seconds"] for r in records),
        "env_steps": epochs_trained * cfg.num_envs * cfg.rollout_steps,
    }
    write_json(out / "summary.json", summary)
    if run_logger is not None:
        run_logger.close()  # logs returns.png
    return summary


def parse_args(argv=None) -> DPPOGymConfig:
    """A validated config from ``--FIELD VALUE`` pairs for any field (``--env``, ``--epochs``, ...); with
    ``--resume RUN_DIR``, that run's config and the fields given here (refused unless changeable)."""
    cfg, given = parse(DPPOGymConfig, list(sys.argv[1:] if argv is None else argv), description=__doc__.split("\n\n")[0])
    if cfg.resume:
        run_dir = run_dir_of(os.path.expanduser(cfg.resume))
        if not any(os.path.isfile(os.path.join(run_dir, n)) for n in ("config.json", "checkpoint.pt", "checkpoint.prev.pt")):
            raise ConfigError(f"resume: {cfg.resume} is not a dppo_gym run directory (no config.json, no checkpoint.pt)")
        out = given.get("output_dir")
        if out is not None and os.path.abspath(os.path.expanduser(out)) != run_dir:
            raise ConfigError(f"output_dir: --resume goes on in the run's own directory ({run_dir}), not in {out}; "
                              "drop --output-dir")
        stored, why = stored_config(run_dir, kind="dppo_gym")  # a damaged config.json: the checkpoint's record
        if stored is None:
            raise ConfigError(f"resume: {run_dir}/config.json is {why}, and no checkpoint records the run's config")
        fields = {f.name for f in dataclasses.fields(DPPOGymConfig)}
        unknown = sorted(set(stored) - fields)
        if unknown:
            raise ConfigError(f"resume: {run_dir}/config.json is not a dppo_gym config (it has {unknown[0]!r})")
        cfg = DPPOGymConfig(**{**stored, **given, "output_dir": run_dir, "resume": run_dir})
        resume_changes(stored, dataclasses.asdict(cfg), CHANGEABLE_ON_RESUME, defaults=dataclasses.asdict(DPPOGymConfig()))
    cfg.validate()
    if "critic_warmup_epochs" in given and cfg.critic_warmup_epochs >= cfg.epochs:
        raise ConfigError(f"critic_warmup_epochs: {cfg.critic_warmup_epochs} of {cfg.epochs} epochs train only the "
                          "critic, so the policy would never be fine-tuned; give fewer, or more --epochs")
    return cfg


def main(argv=None) -> dict:
    """Command-line entry point: parse, run, and report input errors in one line (exit 2)."""
    with report_user_errors():
        summary = run(parse_args(argv))
    print(dumps(summary, indent=2))
    if summary["interrupted"]:
        print(f"stopped after {summary['epochs_trained']} of {summary['epochs']} epochs (interrupted); "
              f"return_after is the evaluation after epoch {summary['return_after_epoch']}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
