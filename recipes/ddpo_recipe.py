"""The DDPO training recipe: setup, train, cleanup.

It builds the library's components (ddpo_rl) and the denoising environment (envs/) from a
:class:`~ddpo_rl.config.DDPOConfig`, so it lives with the recipes: envs/ imports ddpo_rl, never
the reverse. ddpo_is.py, ddpo_sf.py and rwr.py are thin entry points over :class:`DDPORecipe`;
the three algorithms (DDPO-IS, DDPO-SF, RWR) share this loop and differ only in the loss. Each
epoch:

1. sample ``samples_per_epoch`` trajectories with the current policy (env + reward transform);
2. turn terminal rewards into per-prompt (or, with ``group_size``, group-relative) normalised,
   clipped advantages;
3. train on the batch (inner epochs, minibatches, timestep accumulation);
4. log one line to metrics.jsonl and the progress display;
5. every ``eval_every`` epochs: sample fixed-seed batches on the training and held-out
   prompts, log their rewards and the monitor rewards, save a sample grid; keep the weights of
   the best evaluation whose monitors are within tolerance for best/; announce (once) the first
   one that is not (and stop there with ``stop_on_monitor_drop``);
6. every ``save_every`` epochs (and at the end, and on SIGINT/SIGTERM): write a checkpoint, then
   move the best weights it covers into best/ (:meth:`DDPORecipe._settle_best`). An error while
   an epoch samples or updates writes the checkpoint of the epoch before first
   (:meth:`DDPORecipe._sample_epoch`, :meth:`DDPORecipe._update_epoch`; after the update's first
   optimizer step only when a copy of the weights was small enough to keep); an
   error while an epoch is evaluated writes that epoch's checkpoint with the evaluation pending, which a
   resumed run does first (:meth:`DDPORecipe._evaluate_epoch`). A run
   stopped by a signal before its last epoch writes no final/, and its summary.json says
   ``"interrupted": true``.

Outputs (``output_dir``): config.json (the config that ran, and its ``history`` of starts and
resumes), metrics.jsonl, eval.jsonl, samples/epoch_NNNN.png, reward_curve.png, before_after.png (the
base model's grid beside the best and the last evaluation's), summary.json,
checkpoints/checkpoint.pt (and checkpoint.prev.pt, the one before), final/ and best/ (trained weights in
diffusers format: unet/ or, for a flow-matching transformer, transformer/; or the LoRA adapters; and
ddpo_rl.json, the epoch and run they come from). The run ends by printing summary.json's account
(:func:`ddpo_rl.reporting.format_summary`).

The directory is guarded (ddpo_rl.run_dir): locked while the run lives, never silently reused by
a fresh run (``--overwrite true`` replaces an earlier run, once the new run's set-up has
succeeded), and ``--resume RUN_DIR`` continues in
RUN_DIR, refusing changes to fields outside ``CHANGEABLE_ON_RESUME`` and recording the others.
"""

from __future__ import annotations

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import contextlib
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
from torchrl.envs import TransformedEnv

from ddpo_rl.advantages import PerPromptStatTracker, compute_advantages
from ddpo_rl.atomic import recover_directory, replace_directory, write_text
from ddpo_rl.checkpoint import (
    CHECKPOINT_NAME,
    atomic_torch_save,
    read_checkpoint,
    read_weights_info,
    rng_state,
    seed_everything,
    set_rng_state,
)
from ddpo_rl.collector import terminal_rewards, with_advantages
from ddpo_rl.config import CHANGEABLE_ON_RESUME, ConfigError, DDPOConfig, stored_defaults
from ddpo_rl.errors import failed_to_load, report_user_errors
from ddpo_rl.interpolation import ReferenceInterpolation
from ddpo_rl.jsonl import append_record
from ddpo_rl.run_dir import RunDir, history_entry, lines_up_to_epoch, resume_changes
from ddpo_rl import distributed, precision
from ddpo_rl.keys import KEYS
from ddpo_rl.loggers import check_logger, make_run_logger
from ddpo_rl.objectives import loss_kwargs, make_loss
from ddpo_rl.plotting import save_image_grid
from ddpo_rl.policy import DiffusionPolicy
from ddpo_rl.prompts import resolve_prompts
from ddpo_rl.rewards.transform import RewardError, RewardTransform
from ddpo_rl.sampling import make_sampler
from ddpo_rl.stop import StopRequest
from ddpo_rl.schedules import is_flow_matching_scheduler
from ddpo_rl.threads import ThreadGovernor
from ddpo_rl.trainer import DDPOTrainer, TrainConfig
from envs.denoising import DenoisingEnv

EVAL_SEED_OFFSET = 1_000_003
CHECKPOINT_KIND = "ddpo"
"""Written into every checkpoint's trailer: another recipe's checkpoint is refused on resume."""
BEST_PENDING = os.path.join("checkpoints", "best.pending")
"""Where the weights of a new best evaluation wait for the next checkpoint before they replace best/
(:meth:`DDPORecipe._settle_best`)."""
UPDATE_SNAPSHOT_MAX_BYTES = 1 << 30
"""An epoch's update keeps a copy of the trainable weights and the optimizer state (on their device) when
they take at most this many bytes, so that a failure halfway through the update still writes the
checkpoint of the epoch before (:meth:`DDPORecipe._update_epoch`): the digits models (10 MB with AdamW's
state), LoRA on SD (a few MB); not SD 1.5's full UNet (10 GB)."""
GRID_NAME = re.compile(r"epoch_(\d+)\.png")
"""The name of an evaluation's sample grid in samples/ (``epoch_NNNN.png``)."""
RUN_FILES = ("config.json", "metrics.jsonl", "eval.jsonl", "samples", "checkpoints", "final", "best", "logs",
             "summary.json", "reward_curve.png", "before_after.png")
"""What a run writes in its output_dir (what ``--overwrite true`` removes; nothing else is touched)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; use --device cpu")
    return dev


@dataclass
class EvalResult:
    epoch: int
    train_mean: float
    train_std: float
    eval_mean: float
    eval_std: float
    n: int
    """How many training-prompt samples the reward's mean and std are over (those whose reward was
    finite: fewer than sampled with ``--on-invalid-reward drop``)."""
    monitors: dict = field(default_factory=dict)
    """{monitor: {"train_mean", "train_std", "eval_mean", "eval_std"}} (see ddpo_rl.monitors), and
    "train_left_out" / "eval_left_out" when that many of the set's values were not finite (left out of
    the mean and std; e.g. sample_diversity for a prompt alone in its batch)."""
    eval_n: int | None = None
    """The same count for the held-out prompts (None in records written before it was kept)."""
    left_out: dict = field(default_factory=dict)
    """{"train_left_out": k, "eval_left_out": k}: how many of the set's samples had a reward that was not
    finite (``--on-invalid-reward drop``), left out of its mean and std; only the sets with some."""

    def as_dict(self) -> dict:
        return dict(
            epoch=self.epoch,
            train_prompts_reward_mean=self.train_mean,
            train_prompts_reward_std=self.train_std,
            eval_reward_mean=self.eval_mean,
            eval_reward_std=self.eval_std,
            num_samples=self.n,
            eval_num_samples=self.eval_n,
            **self.left_out,
            monitors=self.monitors,
        )


class DDPORecipe:
    """Setup, train and clean up one DDPO run from a :class:`~ddpo_rl.config.DDPOConfig`."""

    def __init__(self, cfg: DDPOConfig):
        self.cfg = cfg.validate()
        self.start_epoch = 0
        self.last_epoch = 0  # the last epoch trained (start_epoch on resume, then as train() goes)
        self.stopped_on_monitor_drop = False
        self.history: list[dict] = []
        self.run_dir: RunDir | None = None
        self._newest_checkpoint_damaged = False
        self._checkpointed_epoch = 0  # the epoch of the newest checkpoint (0: none yet)
        # the metrics record of an epoch whose evaluation failed: the checkpoint of that epoch holds it,
        # and a resumed run does that evaluation first (:meth:`_evaluate_epoch`)
        self.pending_evaluation: dict | None = None
        self.stop_request = StopRequest()  # SIGINT/SIGTERM, from train() to cleanup()

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self) -> DDPORecipe:
        """Build everything the run needs, cheapest checks first (each step is one ``_setup_*``):
        prompts, reward and monitors; device and processes; the run directory and the checkpoint
        to resume; the model; the envs; the policy and its loss; the optimizer and trainer. Then
        load the resumed state; only then does the run directory change (an earlier run replaced,
        samples/ and the logger: :meth:`_setup_outputs`), and config.json records what runs."""
        # first, before torch runs any parallel work: the intra-op threads (fixed, or following the
        # machine's load: ddpo_rl/threads.py; looked at again after set-up, between an epoch's
        # phases, after each optimizer step and after each epoch)
        self.threads = ThreadGovernor(self.cfg.threads)
        self._setup_inputs()
        self._setup_processes()
        resume_state = self._setup_run_dir()
        self._setup_model()
        self._setup_envs()
        self._setup_policy_and_loss()
        self._setup_trainer()
        if resume_state is not None:
            self.load_state_dict(resume_state)
        self._setup_outputs(resume_state)
        self.threads.update()  # the load seen since `import ddpo_rl` (model loading included)
        if self.is_main:  # what runs from here on, and its history (the start, each resume and its changes)
            self.run_dir.write_config(self.cfg.to_dict(), self.history)
        return self

    def _setup_inputs(self) -> None:
        """Prompts, the reward and the monitors: cheap, checked before any model is loaded."""
        cfg = self.cfg
        from ddpo_rl.models.loading import check_model_reference
        from ddpo_rl.monitors import build_monitors
        from ddpo_rl.rewards.registry import get_reward_factory, make_reward

        self.train_prompts = resolve_prompts(cfg.prompts, "prompts")
        self.eval_prompts = resolve_prompts(cfg.eval_prompts, "eval_prompts")
        try:
            get_reward_factory(cfg.reward)
        except ValueError as err:
            raise ConfigError(f"reward: {err}") from err
        try:
            self.reward_fn = make_reward(cfg.reward, **cfg.reward_kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"reward_kwargs: {cfg.reward_kwargs} rejected by reward {cfg.reward!r}: {err}") from err
        except Exception as err:  # the reward's model cannot be loaded (missing weights, no hub, ...)
            raise ConfigError(f"reward: {cfg.reward!r} {failed_to_load(err, '--reward-kwargs')}") from err
        self._check_prompts(f"reward {cfg.reward!r}", self.reward_fn, "choose another --reward")
        if cfg.reward_async and not callable(getattr(self.reward_fn, "submit", None)):
            from ddpo_rl.rewards.async_reward import AsyncReward  # scored in a thread; see collector

            self.reward_fn = AsyncReward(self.reward_fn)
        check_model_reference(cfg.model)  # a missing model directory is named before the monitors load theirs
        self.monitors = build_monitors(cfg.monitor_rewards, cfg.monitor_reward_kwargs)
        for name, monitor in self.monitors.items():
            self._check_prompts(f"monitor {name!r}", monitor, "choose other monitors with --monitor-rewards")
        check_logger(cfg.logger, cfg.logger_kwargs)  # the logger is made last (_setup_outputs)

    def _check_prompts(self, what: str, reward_fn, hint: str) -> None:
        """Both prompt sets are scored by the reward and the monitors: a prompt one of them cannot score
        (no digit for the digit rewards) is refused here, naming the prompt field, not at the first
        evaluation."""
        from ddpo_rl.rewards.base import check_prompts

        for option, source in (("prompts", self.train_prompts), ("eval_prompts", self.eval_prompts)):
            try:
                check_prompts(reward_fn, source.prompts)
            except ValueError as err:
                raise ConfigError(f"{option}: {what} cannot score them: {err}; give other prompts, or {hint}") from err

    def _setup_processes(self) -> None:
        """Device, torchrun processes, seeds and precision."""
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        self.dist = distributed.init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        seed_everything(cfg.seed)  # the same on every rank: identical initial weights (LoRA init included)
        if self.device.type == "cuda":
            precision.set_tf32(cfg.allow_tf32)
        self.mixed_precision = precision.resolve_mixed_precision(cfg.mixed_precision, self.device)  # "auto" resolved
        self.out = cfg.output_dir
        self.is_main = self.dist.is_main

    def _setup_run_dir(self) -> dict | None:
        """The run directory (rank 0 owns it) and the checkpoint to resume: verified, and its config
        compared with this one, before any model is loaded; an error changes nothing on disk (an
        earlier run to overwrite stays until :meth:`_setup_outputs`). Returns the resumed state
        (None for a fresh run)."""
        cfg = self.cfg
        if self.is_main:
            self.run_dir = RunDir(self.out, RUN_FILES).open(resume=bool(cfg.resume), overwrite=cfg.overwrite)
        resume_state = self._read_resume_state() if cfg.resume else None
        if resume_state is None:
            self.history = [history_entry("start", 0)]
        return resume_state

    def _setup_outputs(self, resume_state: dict | None) -> None:
        """Last, once everything the run needs is built: the earlier run that ``--overwrite true``
        replaces is removed only now (a model that fails to load, or any other set-up error, leaves it
        whole), then samples/ and the logger (which mirrors metrics.jsonl, eval.jsonl and the images
        into a torchrl logger, cfg.logger)."""
        cfg = self.cfg
        self.run_logger = None
        if not self.is_main:
            return
        self.run_dir.clear_earlier_run()
        os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        self.run_logger = make_run_logger(
            cfg.logger, self.out, cfg.logger_kwargs, self.recorded_epoch if resume_state else None, cfg.to_dict()
        )

    def _setup_model(self) -> None:
        """The noise (or velocity) network, its scheduler, the frozen text encoder and decoder; LoRA
        and the speed and memory options."""
        cfg = self.cfg
        from ddpo_rl.models.loading import build_model

        frozen_dtype = precision.low_precision_dtype(self.mixed_precision) if self.device.type == "cuda" else None
        # rank 0 first: it alone trains-and-caches the digits model or downloads hub weights on
        # first use; the other ranks then load what it wrote (no concurrent writers)
        if not self.is_main:
            distributed.barrier()
        self.model = build_model(cfg.model, self.device, revision=cfg.revision, frozen_dtype=frozen_dtype)
        if self.is_main:
            distributed.barrier()
        trained = self.model.scheduler.config.num_train_timesteps  # known once the model is loaded
        if cfg.num_inference_steps > trained:
            raise ConfigError(f"num_inference_steps: {cfg.num_inference_steps} is more than the {trained} timesteps "
                              f"model {cfg.model!r} was trained with")
        unet = self.model.unet
        if cfg.use_lora:
            from ddpo_rl.lora import apply_lora

            unet.requires_grad_(False)
            apply_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        if cfg.gradient_checkpointing:
            precision.enable_gradient_checkpointing(unet)
        unet.to(self.device)
        if cfg.use_lora:  # the frozen base in the low dtype on CUDA; LoRA weights (and AdamW state) stay float32
            precision.cast_frozen_params(unet, frozen_dtype)
        if cfg.sdpa_attention:
            precision.use_sdpa_attention(unet)
        if cfg.channels_last:
            precision.set_channels_last(unet)

    def _setup_envs(self) -> None:
        """The training env (random prompts, or groups of one prompt) and the evaluation envs (fixed
        prompts and seeds; one for the sample grid)."""
        cfg = self.cfg
        self.env = self._make_env(self.train_prompts, cfg.sample_batch_size, "random", group_size=cfg.group_size)
        self.rank_seed = cfg.seed + 7919 * self.dist.rank  # each rank samples its own prompts and noise
        self.env.set_seed(self.rank_seed)
        self.eval_envs = {
            "train": self._make_env(self.train_prompts, cfg.sample_batch_size, "cycle"),
            "eval": self._make_env(self.eval_prompts, cfg.sample_batch_size, "cycle"),
        }
        grid_prompts = (self.train_prompts.prompts + self.eval_prompts.prompts)[:10]
        self.grid_env = self._make_env(
            type(self.train_prompts)(grid_prompts), len(grid_prompts) * cfg.grid_samples_per_prompt, "cycle"
        )

    def _setup_policy_and_loss(self) -> None:
        """The policy (its family follows the scheduler), the algorithm's loss, and the KL term."""
        cfg = self.cfg
        self.policy = self._make_policy(self.model.unet).to(self.device)
        self.loss = make_loss(cfg.algorithm, self.policy, **loss_kwargs(
            cfg.algorithm, clip_epsilon=cfg.clip_epsilon, rwr_mode=cfg.rwr_mode,
            rwr_temperature=cfg.rwr_temperature, rwr_quantile=cfg.rwr_quantile,
        ))
        if cfg.kl_coef > 0:  # built before a resume loads weights: the reference is the pretrained model
            from ddpo_rl.objectives import KLToReferenceLoss

            self.loss = KLToReferenceLoss(
                self.loss, self.policy.head, cfg.kl_coef, reduction=cfg.log_prob_reduction,
                sigma_scale=cfg.kl_sigma_scale,
            ).to(self.device)
        # what evaluations and saved weights use (lambda 1: the trained weights); built before a resume
        # loads weights, like the KL's reference: the reference is the pretrained model
        self.interpolation = ReferenceInterpolation(self.policy.noise_model, cfg.reference_interpolation)

    def _setup_trainer(self) -> None:
        """The optimizer over the trainable parameters, the trainer, the samplers and the per-prompt
        reward statistics."""
        cfg = self.cfg
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("use_lora: the policy has no trainable parameters")
        distributed.broadcast_parameters(self.params)
        torch.manual_seed(self.rank_seed)  # sampling noise: per rank
        self.optimizer = precision.make_adamw(
            self.params,
            cfg.optimizer_impl,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        self.train_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.trainer = DDPOTrainer(
            self.loss,
            self.optimizer,
            TrainConfig(
                num_inner_epochs=cfg.num_inner_epochs,
                minibatch_size=cfg.minibatch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                timestep_fraction=cfg.timestep_fraction,
                max_grad_norm=cfg.max_grad_norm or None,  # 0: no clipping
                step_indices=getattr(self.policy, "trained_steps", None),  # the flow policy's SDE window
            ),
            params=self.params,
            autocast=lambda: precision.autocast(self.mixed_precision, self.device),
            generator=self.train_rng,
            grad_scaler=precision.grad_scaler(self.mixed_precision, self.device)
            if self.mixed_precision == "fp16"
            else None,
            after_step=self.threads.update,  # a load arriving mid-epoch is seen at the next step
        )
        # samplers (cfg.sampler), one per env, made at first use; graphed ones share a graph memory pool
        self._samplers = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.tracker = (
            PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count) if cfg.per_prompt_stat_tracking else None
        )
        self.eval_history: list[EvalResult] = []

    def _sample(self, env, num_batches: int):
        """Trajectories [N, T] from ``env`` with the configured sampler (``cfg.sampler``: the env path
        or the graphed FastSampler, same TensorDict either way). One sampler per env, kept for the
        run: a graphed one holds its buffers and CUDA graph (re-captured only when stale)."""
        sampler = self._samplers.get(id(env))
        if sampler is None:
            sampler = self._samplers[id(env)] = make_sampler(
                self.cfg.sampler,
                env,
                self.policy,
                autocast_dtype=precision.low_precision_dtype(self.mixed_precision),
                channels_last=self.cfg.channels_last,
                graph_pool=self._graph_pool,
            )
        return sampler.sample(num_batches)

    def _read_resume_state(self) -> dict:
        """The verified checkpoint of ``cfg.resume``; refuses changes to fields fixed on resume."""
        cfg = self.cfg
        loaded = read_checkpoint(
            cfg.resume, kind=CHECKPOINT_KIND, required=("epoch", "config", "trainable", "optimizer", "rng")
        )
        state = loaded.state
        changes = resume_changes(state["config"], cfg.to_dict(), CHANGEABLE_ON_RESUME, stored_defaults())
        if cfg.epochs < state["epoch"]:
            raise ConfigError(f"epochs: {cfg.epochs} is below the epoch the run has reached ({state['epoch']}); "
                              f"give --epochs {state['epoch']} or more")
        self._newest_checkpoint_damaged = loaded.fell_back
        self.history = list(state.get("history", [])) + [
            history_entry("resume", state["epoch"], changes, checkpoint=os.path.relpath(loaded.path, self.out))
        ]
        if self.is_main:
            for note in loaded.notes:
                print(f"note: resume: {note}", file=sys.stderr, flush=True)
            changed = "; ".join(f"{k}: {v['from']!r} -> {v['to']!r}" for k, v in changes.items()) or "no config change"
            pending = ", whose evaluation failed: evaluated first" if state.get("pending_evaluation") else ""
            print(f"resume: continuing {self.out} after epoch {state['epoch']}{pending} ({changed})", flush=True)
        return state

    def _make_policy(self, network):
        """The policy family follows the model's scheduler: DDIM -> DiffusionPolicy, flow matching ->
        FlowMatchingPolicy (Flow-GRPO's SDE; pooled embeddings if the env's encoder returns them)."""
        cfg = self.cfg
        negative = self.model.negative_prompt_embeds() if cfg.guidance_scale != 1.0 else None
        if is_flow_matching_scheduler(self.model.scheduler):
            from ddpo_rl.flow_policy import FlowMatchingPolicy

            return FlowMatchingPolicy(
                network,
                self.model.scheduler,
                cfg.num_inference_steps,
                noise_level=cfg.noise_level,
                guidance_scale=cfg.guidance_scale,
                negative_prompt_embeds=negative,
                pooled=KEYS.pooled_prompt_embeds in self.env.base_env.condition_keys,
                log_prob_reduction=cfg.log_prob_reduction,
                sde_window_size=cfg.sde_window_size,
                sde_window_start=cfg.sde_window_start,
            )
        if cfg.sde_window_size:
            from ddpo_rl.config import ConfigError

            raise ConfigError(f"sde_window_size: the SDE window is for flow-matching models; {cfg.model!r} samples with DDIM")
        return DiffusionPolicy(
            network,
            self.model.scheduler,
            cfg.num_inference_steps,
            eta=cfg.eta,
            guidance_scale=cfg.guidance_scale,
            negative_prompt_embeds=negative,
            log_prob_reduction=cfg.log_prob_reduction,
        )

    def _make_env(self, prompts, batch_size: int, order: str, group_size: int | None = None) -> TransformedEnv:
        base = DenoisingEnv(
            prompts,
            self.model.encode_prompts,
            self.model.scheduler,
            self.cfg.num_inference_steps,
            self.model.latent_shape,
            batch_size,
            device=self.device,
            prompt_order=order,
            group_size=group_size,
            prompt_cache_size=self.cfg.prompt_cache_size,
        )
        return TransformedEnv(
            base, RewardTransform(self.reward_fn, self.model.decode, on_invalid=self.cfg.on_invalid_reward)
        )

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def state_dict(self, epoch: int, rng: list | None = None, pending_evaluation: dict | None = None) -> dict:
        """What a checkpoint holds; ``rng``: every process's random state, gathered before, to record
        instead of the current ones (a checkpoint written after a failed epoch records the states that
        epoch started from; no collective then, so that the one process writing it need not wait for
        the others);
        ``pending_evaluation``: the metrics record of ``epoch`` when its evaluation failed (the resumed
        run evaluates ``epoch`` first, then writes that record)."""
        trainable = {n: p.detach().cpu().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        return {
            "epoch": epoch,
            "config": self.cfg.to_dict(),
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
            "rng": rng if rng is not None else self._gather_rng_states(),
            "eval_history": [e.as_dict() for e in self.eval_history],
            "skipped_steps": self.trainer.skipped_steps,
            # fp16's loss scale as training left it (a resumed run starting from the initial scale would
            # skip steps the run never skipped); None without a scaler
            "grad_scaler": self.trainer.grad_scaler.state_dict() if self.trainer.grad_scaler is not None else None,
            "history": self.history,
            "pending_evaluation": pending_evaluation,
        }

    def load_state_dict(self, state: dict) -> None:
        named = dict(self.policy.named_parameters())
        missing = [n for n in state["trainable"] if n not in named]
        if missing:
            raise ConfigError(
                f"resume: the checkpoint has weights this model lacks ({missing[0]}, ...): "
                "resume with the same model and LoRA settings"
            )
        with torch.no_grad():
            for n, v in state["trainable"].items():
                named[n].copy_(v.to(named[n].device))
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # learning_rate may change on resume: this run's value
            group["lr"] = self.cfg.learning_rate
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])
        if len(state["rng"]) != self.dist.world_size:
            raise ConfigError(
                f"resume: the checkpoint was written by {len(state['rng'])} process(es), this run has "
                f"{self.dist.world_size}; resume with the same --nproc-per-node"
            )
        set_rng_state(state["rng"][self.dist.rank], self.env.base_env._rng, self.train_rng)
        self.eval_history = [
            EvalResult(
                e["epoch"], e["train_prompts_reward_mean"], e["train_prompts_reward_std"],
                e["eval_reward_mean"], e["eval_reward_std"], e["num_samples"], e.get("monitors", {}),
                e.get("eval_num_samples"), {k: e[k] for k in ("train_left_out", "eval_left_out") if k in e},
            )
            for e in state["eval_history"]
        ]
        self.trainer.skipped_steps = state.get("skipped_steps", 0)
        if state.get("grad_scaler") and self.trainer.grad_scaler is not None and self.trainer.grad_scaler.is_enabled():
            self.trainer.grad_scaler.load_state_dict(state["grad_scaler"])
        self.start_epoch = self.last_epoch = self._checkpointed_epoch = int(state["epoch"])
        self.pending_evaluation = state.get("pending_evaluation")
        if self.is_main:
            self._truncate_logs(self.recorded_epoch)
            for name in ("final", "best"):  # a kill between the two renames of a weights save
                recover_directory(os.path.join(self.out, name))
            self._settle_best(self.recorded_epoch)

    @property
    def recorded_epoch(self) -> int:
        """The last epoch whose records (metrics.jsonl, eval.jsonl, its sample grid) the resumed state
        covers: the checkpoint's epoch, or the one before when that epoch's evaluation is pending."""
        return self.start_epoch - (self.pending_evaluation is not None)

    def _truncate_logs(self, epoch: int) -> None:
        """Drop log lines written after the checkpoint (a run killed between log and save), and a
        torn last line (a kill during its write); the file is rewritten atomically. The sample
        grids of evaluations after the checkpoint go too: the resumed run redoes those epochs
        (with its own evaluation cadence, which may change on resume), so they would show weights
        that the record no longer has."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = os.path.join(self.out, name)
            if os.path.exists(path):
                write_text(path, "".join(lines_up_to_epoch(path, epoch)))
        samples = os.path.join(self.out, "samples")
        for name in sorted(os.listdir(samples)) if os.path.isdir(samples) else []:
            match = GRID_NAME.fullmatch(name)
            if match and int(match.group(1)) > epoch:
                os.remove(os.path.join(samples, name))

    def _gather_rng_states(self) -> list[dict]:
        """Every process's random state (the sampler's and the trainer's), in rank order: a collective."""
        return distributed.all_gather_objects(rng_state(self.env.base_env._rng, self.train_rng))

    def save_checkpoint(self, epoch: int, rng: list | None = None, pending_evaluation: dict | None = None) -> str | None:
        state = self.state_dict(epoch, rng, pending_evaluation)  # a collective unless ``rng`` is given
        if not self.is_main:
            return None
        self._checkpointed_epoch = epoch
        # after resuming from checkpoint.prev.pt because checkpoint.pt was damaged, the damaged file
        # is replaced and the sound previous one kept
        keep = not self._newest_checkpoint_damaged
        self._newest_checkpoint_damaged = False
        path = atomic_torch_save(
            state, os.path.join(self.out, "checkpoints", CHECKPOINT_NAME), kind=CHECKPOINT_KIND, keep_previous=keep
        )
        self._settle_best(epoch - (pending_evaluation is not None))
        return path

    def _settle_best(self, epoch: int) -> None:
        """best/ moves with the checkpoints. The weights of a new best evaluation are written to
        :data:`BEST_PENDING` and replace best/ only once a checkpoint at or after their epoch is
        written (here, after each checkpoint, and on resume for a kill between the two). A pending
        set from after the checkpoint a run resumes from belongs to evaluations the resumed run
        redoes (with a changed config or on a GPU, to other results) and is dropped. So best/ never
        holds weights of an evaluation that eval.jsonl and summary.json no longer have, at the
        cost of best/ trailing the newest evaluation until the next checkpoint."""
        pending = os.path.join(self.out, BEST_PENDING)
        recover_directory(pending)  # a kill while a newer pending set replaced an older one
        if not os.path.isdir(pending):
            return
        info = read_weights_info(pending) or {}
        if isinstance(info.get("epoch"), int) and info["epoch"] <= epoch:
            replace_directory(pending, os.path.join(self.out, "best"))
        else:
            shutil.rmtree(pending)

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    def _fixed_seed_rollout(self, env, num_batches: int, seed: int, advance=None):
        """``num_batches`` batches from ``env`` seeded with ``seed``, the global RNG left as it was.
        ``advance`` (called once per batch, e.g. a progress bar's) samples them one at a time from
        the same random streams: the same trajectories."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            env.set_seed(seed)
            if advance is None:
                return self._sample(env, num_batches)  # the training samples' sampler and precision
            batches = []
            for _ in range(num_batches):
                batches.append(self._sample(env, 1))
                advance()
            return torch.cat(batches)

    def evaluate(self, epoch: int) -> EvalResult:
        """Rewards and monitor rewards of fixed-seed samples on the training and held-out prompts,
        and a sample grid; when this evaluation is the best within tolerance, its weights go to
        :data:`BEST_PENDING`, for best/ at the next checkpoint. All the sampling and scoring (where a
        reward or a monitor may fail) comes before anything is recorded."""
        return self._record_evaluation(*self._evaluation_samples(epoch))

    def _evaluation_samples(self, epoch: int) -> tuple[EvalResult, object]:
        """The evaluation's rollouts and scores, nothing written: its result and the grid's rollout,
        of the weights final/ and best/ hold (interpolated towards the reference when
        ``reference_interpolation`` < 1; the trained weights are back when it returns)."""
        with self.interpolation.applied():
            return self._evaluation_rollouts(epoch)

    def _evaluation_rollouts(self, epoch: int) -> tuple[EvalResult, object]:
        """:meth:`_evaluation_samples` of the weights in place now (recipes/interpolate.py sets them)."""
        from ddpo_rl.monitors import summarize

        cfg = self.cfg
        stats, monitors, dropped = {}, {name: {} for name in self.monitors}, {}
        for name, env in self.eval_envs.items():
            n_batches = math.ceil(cfg.eval_num_samples / cfg.sample_batch_size)
            traj = self._fixed_seed_rollout(env, n_batches, cfg.seed + EVAL_SEED_OFFSET)
            r = terminal_rewards(traj)  # NaN where dropped (--on-invalid-reward drop)
            kept = int(torch.isfinite(r).sum())  # once per evaluation, not in a hot loop
            stats[name] = (*summarize(r), kept)  # None (null) when no reward was finite
            if kept < r.numel():  # the mean and std are over the others: the record says so
                dropped[f"{name}_left_out"] = r.numel() - kept
            for monitor, values in self._monitor_values(env, traj).items():
                monitors[monitor][f"{name}_mean"], monitors[monitor][f"{name}_std"] = summarize(values)
                left_out = int((~torch.isfinite(values)).sum())  # once per evaluation, not in a hot loop
                if left_out:  # the mean and std are over the others: the record says so
                    monitors[monitor][f"{name}_left_out"] = left_out
        grid = self._fixed_seed_rollout(self.grid_env, 1, cfg.seed + 2 * EVAL_SEED_OFFSET)
        return EvalResult(epoch, *stats["train"][:2], *stats["eval"][:2], stats["train"][2], monitors, stats["eval"][2], dropped), grid

    def _record_evaluation(self, result: EvalResult, grid) -> EvalResult:
        """The sample grid, the history, the alarm, the best weights and the eval.jsonl line."""
        from ddpo_rl.monitors import best_evaluation, first_alarm

        cfg, epoch = self.cfg, result.epoch
        self._save_grid(grid, epoch)
        history = [e.as_dict() for e in self.eval_history]
        self.eval_history.append(result)
        record = result.as_dict()
        alarm = first_alarm(history + [record], cfg.monitor_tolerance)
        self.new_alarm = alarm if alarm is not None and first_alarm(history, cfg.monitor_tolerance) is None else None
        if self.new_alarm is not None:
            record["monitor_alarm"] = self.new_alarm
        if best_evaluation(history + [record], cfg.monitor_tolerance)["epoch"] == epoch:
            self.save_final_weights(BEST_PENDING, epoch)  # best/ once a checkpoint covers this epoch
        append_record(os.path.join(self.out, "eval.jsonl"), record)
        return result

    @torch.no_grad()
    def _monitor_values(self, env, traj) -> dict[str, torch.Tensor]:
        """Each monitor's values on a rollout's final images, scored batch by batch as sampled."""
        from ddpo_rl.monitors import score_monitors

        values: dict[str, list[torch.Tensor]] = {name: [] for name in self.monitors}
        if not self.monitors:
            return {}
        bs = self.cfg.sample_batch_size
        for start in range(0, traj.shape[0], bs):
            part = traj[start : start + bs]
            images = self.model.decode(part[KEYS.action][:, -1])  # x_0 is the last action
            prompts = env.base_env.prompts_of(part[KEYS.prompt_id][:, 0])
            for name, v in score_monitors(self.monitors, images, prompts).items():
                values[name].append(v)
        return {name: torch.cat(v) for name, v in values.items()}

    def _save_grid(self, traj, epoch: int) -> str:
        ncol = self.cfg.grid_samples_per_prompt
        prompts = self.grid_env.base_env.prompt_source.prompts
        ids = traj[KEYS.prompt_id][:, 0]
        order = torch.argsort(ids * len(ids) + torch.arange(len(ids), device=ids.device))  # rows = prompts
        images = self.model.decode(traj[KEYS.action][:, -1][order])  # x_0 is the last action
        rewards = terminal_rewards(traj)[order].tolist()
        return save_image_grid(
            images,
            self._grid_path(epoch),
            ncol=ncol,
            row_labels=prompts,
            cell_labels=[f"{r:.3g}" for r in rewards],
            title=f"{self.cfg.algorithm} | {self.cfg.reward} | after {epoch} epochs"
            + (f" | base + {self.cfg.reference_interpolation:g} x (trained - base)" if epoch and self.interpolation.active else ""),
        )

    # ------------------------------------------------------------------------------------------
    # train
    # ------------------------------------------------------------------------------------------
    @property
    def _stop_requested(self) -> bool:
        """Whether a SIGINT/SIGTERM asked this process to stop (ddpo_rl.stop: a second one stops at once)."""
        return self.stop_request.requested

    @_stop_requested.setter
    def _stop_requested(self, value: bool) -> None:
        self.stop_request.requested = value

    def train(self) -> dict:
        """Run the epochs (sample, advantages, update, log, evaluate, checkpoint; see the module
        docstring) until ``cfg.epochs`` or a SIGINT/SIGTERM, then :meth:`finish`; returns the summary."""
        cfg = self.cfg
        from ddpo_rl.progress import RunProgress

        self.stop_request.install()
        epoch = self.start_epoch
        show = cfg.progress and self.is_main
        self.stopped_on_monitor_drop = False
        with RunProgress(cfg.epochs, start=self.start_epoch, enabled=show, title=f"{cfg.algorithm} {cfg.reward}") as progress:
            if epoch == 0 and not self.eval_history and self.is_main:
                base = self.evaluate(0)
                progress.log_eval(base)
            # ``stop`` is the stop flag agreed by every rank (all-reduced once per epoch, below); the
            # loop must not read the rank-local ``self._stop_requested``: a signal landing on one
            # rank between the all-reduce and this test would make that rank leave the loop alone
            # and the others wait for it forever.
            stop = distributed.any_true(self._stop_requested)
            monitor_stop = False
            # every process's random state at the start of the next epoch (a few kB each, host-side; one
            # gather an epoch; an evaluation leaves them as they are): a checkpoint written when that epoch
            # fails, or when the evaluation of the one before fails, records them, so that --resume redoes
            # the epoch exactly, and rank 0 can write it without waiting for the other processes
            start = self._gather_rng_states()
            if self.pending_evaluation is not None:  # the evaluation that failed before the resume
                record, self.pending_evaluation = self.pending_evaluation, None
                t0 = time.perf_counter() - record.pop("seconds", 0.0)
                stop, monitor_stop = self._end_epoch(epoch, record, t0, progress, rng=start, checkpoint=True)
            while epoch < cfg.epochs and not stop and not monitor_stop:
                t0 = time.perf_counter()
                # 1. sample trajectories with the current policy
                self.policy.eval()
                sampling_threads = self.threads.threads
                traj = self._sample_epoch(epoch, start)
                t1 = time.perf_counter()
                training_threads = self.threads.update()  # between phases: a change of load is seen within an epoch
                # 2.-3. advantages and the policy-gradient update
                rewards, train_metrics = self._update_epoch(epoch, traj, start)
                t2 = time.perf_counter()
                epoch += 1
                start = self._gather_rng_states()
                # 4.-6. the epoch's metrics; evaluate, log and checkpoint
                record = {
                    "epoch": epoch,
                    "reward_mean": rewards.mean().item(),
                    "reward_std": rewards.std(unbiased=False).item(),
                    "num_samples": int(rewards.numel()),
                    "eval_reward_mean": None,
                    "eval_reward_std": None,
                    "train_prompts_reward_mean": None,
                    "clip_fraction": None,
                    "kl_approx": None,
                    "kl_to_reference": None,
                }
                # the whole job's figures under torchrun (one small gather), not rank 0's share
                record.update({k: v.item() for k, v in distributed.mean_over_ranks(train_metrics).items()})
                if record.get("skipped_steps") and self.is_main:
                    print(f"warning: epoch {epoch}: {record['skipped_steps']:.0f} optimizer step(s) undone "
                          "(non-finite loss, gradient or updated weights)", file=sys.stderr, flush=True)
                record.update(sampling_seconds=t1 - t0, training_seconds=t2 - t1,
                              sampling_threads=sampling_threads, training_threads=training_threads)
                self.threads.update()
                stop, monitor_stop = self._end_epoch(epoch, record, t0, progress, rng=start)
        self.last_epoch = epoch
        self._stop_requested = stop  # the agreed flag: every rank takes the same exit path
        if not self.is_main:
            return {}
        if self.interrupted:
            print(f"stopped at epoch {epoch}; checkpoint saved. Resume with --resume {self.out}")
        summary = self.finish()
        if self.stopped_on_monitor_drop:  # said once final/ is written
            print(f"stop_on_monitor_drop: run ended at epoch {epoch}; checkpoint and final/ saved")
        from ddpo_rl.reporting import format_summary

        print("\n".join(format_summary(summary, self.out)), flush=True)
        return summary

    def _end_epoch(self, epoch: int, record: dict, t0: float, progress, rng: list, checkpoint: bool = False) -> tuple[bool, bool]:
        """Steps 5, 4 and 6 of ``epoch``, whose update is done and whose metrics are in ``record``:
        evaluate (on its cadence), write the metrics line, checkpoint (on its cadence, on a stop, or when
        ``checkpoint``); ``rng``: every process's random state now (:meth:`_gather_rng_states`), for
        the checkpoints. Returns the stop flags agreed by every rank: (a signal, the monitor alarm with
        ``stop_on_monitor_drop``)."""
        cfg = self.cfg
        # 5. evaluate
        if self.is_main and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            ev = self._evaluate_epoch(epoch, {**record, "seconds": time.perf_counter() - t0}, rng)
            record.update(
                eval_reward_mean=ev.eval_mean, eval_reward_std=ev.eval_std,
                train_prompts_reward_mean=ev.train_mean,
            )
            progress.log_eval(ev)
            if self.new_alarm is not None:
                from ddpo_rl.monitors import alarm_message

                progress.log_alarm(alarm_message(self.new_alarm))
                record["monitor_alarm"] = self.new_alarm
                self.stopped_on_monitor_drop = cfg.stop_on_monitor_drop
        # 4. log (after the evaluation, whose figures the line carries)
        record["seconds"] = time.perf_counter() - t0
        if self.is_main:
            append_record(os.path.join(self.out, "metrics.jsonl"), record)
            if self.run_logger is not None:
                self.run_logger.sync()
            progress.update(epoch, record)
        # 6. checkpoint
        stop = distributed.any_true(self._stop_requested)
        monitor_stop = cfg.stop_on_monitor_drop and distributed.any_true(self.stopped_on_monitor_drop)
        if checkpoint or epoch % cfg.save_every == 0 or epoch == cfg.epochs or stop or monitor_stop:
            self.save_checkpoint(epoch, rng)
        if monitor_stop:
            self.stopped_on_monitor_drop = True
        return stop, monitor_stop

    def _evaluate_epoch(self, epoch: int, record: dict, rng: list) -> EvalResult:
        """Step 5 of ``epoch``. The evaluation calls the reward and the monitors (a server that goes
        away, a monitor that raises): when its sampling or scoring fails, the update of ``epoch`` is
        done and nothing of the evaluation is recorded yet, so the checkpoint of ``epoch`` is written
        with ``record`` (its metrics line, not yet written) as the pending evaluation before the error
        goes on (:meth:`_checkpoint_on_failure`): ``--resume`` evaluates ``epoch`` first, writes that
        line, and loses no epoch."""
        with self._checkpoint_on_failure(epoch, f"the evaluation of epoch {epoch} failed", rng=rng, pending_evaluation=record):
            samples = self._evaluation_samples(epoch)
        return self._record_evaluation(*samples)

    def _sample_epoch(self, epoch: int, start: list):
        """Step 1 of the epoch after ``epoch``: its trajectories. Sampling calls the reward (a server
        that goes away, a reward that raises): when it fails, the weights, optimizer and statistics are
        still as epoch ``epoch`` left them, so the checkpoint of that epoch is written, with ``start``,
        every process's random state this epoch started from, before the error goes on
        (:meth:`_checkpoint_on_failure`): ``--resume`` then redoes exactly this epoch and keeps the
        epochs since the last checkpoint."""
        with self._checkpoint_on_failure(epoch, f"sampling epoch {epoch + 1} failed", rng=start):
            return self._sample(self.env, self.cfg.num_batches_per_epoch)

    def _update_epoch(self, epoch: int, traj, start: list):
        """Steps 2 and 3 of the epoch after ``epoch``: per-prompt advantages from the terminal rewards over
        every rank's samples (samples whose reward was dropped as NaN get no weight and are removed),
        then the policy-gradient update. Returns (the finite rewards, the trainer's metrics). When this
        fails before the epoch's first optimizer step (an out-of-memory error in the first forward or
        backward, say), the weights and optimizer are still as epoch ``epoch`` left them and the
        per-prompt statistics are put back, so the checkpoint of ``epoch`` is written as for a failed
        sampling. A failure after that step (memory running out later in the update) finds the weights
        half-updated: they and the optimizer state are put back from a copy made before the update
        (:meth:`~ddpo_rl.trainer.DDPOTrainer.state_snapshot`, kept when it is at most
        :data:`UPDATE_SNAPSHOT_MAX_BYTES`: LoRA, the digits models; not SD's full UNet), and the
        checkpoint of ``epoch`` is written all the same; without a copy the last checkpoint stays the one
        to resume from (the note says which)."""
        cfg = self.cfg
        steps = self.trainer.steps_begun
        keep = self.is_main and epoch > self._checkpointed_epoch  # a failure would write a checkpoint
        tracker = self.tracker.state_dict() if keep and self.tracker is not None else None
        size = self.trainer.state_bytes() if keep else 0
        snapshot = self.trainer.state_snapshot() if keep and size <= UPDATE_SNAPSHOT_MAX_BYTES else None

        def rewind() -> str | None:  # the state back to that of ``epoch``; else why not
            if self.trainer.steps_begun != steps:
                if snapshot is None:
                    return (f"the weights half-updated, and no copy of them kept: with the optimizer state "
                            f"{size / 2**30:.1f} GiB, over {UPDATE_SNAPSHOT_MAX_BYTES / 2**30:g} GiB")
                self.trainer.restore_state(snapshot)
            if tracker is not None:
                self.tracker.load_state_dict(tracker)
            return None

        with self._checkpoint_on_failure(epoch, f"the update of epoch {epoch + 1} failed", rewind, rng=start):
            local = terminal_rewards(traj)
            rewards = distributed.all_gather_cat(local)
            if not bool(torch.isfinite(rewards).any()):  # every rank sees the same: all stop alike
                raise RewardError(
                    f"reward {self.cfg.reward}: not one of the {rewards.numel()} samples of epoch {epoch + 1} had a "
                    "finite reward (--on-invalid-reward drop left them all out): nothing to train on"
                )
            prompts = self.env.base_env.prompts_of(distributed.all_gather_cat(traj[KEYS.prompt_id][:, 0]))
            adv = compute_advantages(rewards, prompts, self.tracker, clip=cfg.adv_clip_max, group_size=cfg.group_size)
            n = local.numel()
            with_advantages(traj, adv[self.dist.rank * n : (self.dist.rank + 1) * n])
            finite = torch.isfinite(local)
            if not bool(finite.all()):
                traj = traj[finite]
            self.policy.train()
            return rewards[torch.isfinite(rewards)], self.trainer.train(traj)

    @contextlib.contextmanager
    def _checkpoint_on_failure(self, epoch: int, what: str, rewind=None, **state):
        """When the block raises, write the checkpoint of ``epoch`` (with ``state``: :meth:`save_checkpoint`'s
        arguments) and say so, then let the error go on; a failure to write it does not hide that error.
        ``rewind``: called on failure, puts back what the block changed of the run's state so that it is
        that of ``epoch`` again, and returns None; or says why it cannot (then nothing is written, and the
        note names the checkpoint to resume from). Written by rank 0 alone, with no collective (under
        torchrun the other ranks may be waiting inside one; every rank holds the same weights, optimizer
        state and statistics, and ``state`` brings every rank's random state): when rank 0 fails, or
        when another rank's failure ends rank 0's collective with an error (gloo; NCCL waits for its
        timeout instead, and torchrun ends the run first); nothing when ``epoch`` is checkpointed
        already (a resumed run that fails again at the same place)."""
        try:
            yield
        except Exception:
            if self.is_main and epoch > self._checkpointed_epoch:
                why = rewind() if rewind is not None else None
                if why is not None:
                    last = (f"that of epoch {self._checkpointed_epoch} (resume with --resume {self.out})"
                            if self._checkpointed_epoch else "none: start again")
                    print(f"note: {what} after its first optimizer step ({why}); the last "
                          f"checkpoint is {last}", file=sys.stderr, flush=True)
                    raise
                try:
                    self.save_checkpoint(epoch, **state)
                except Exception as err:  # the original error matters more
                    print(f"note: the checkpoint of epoch {epoch} could not be written ({err})", file=sys.stderr)
                else:
                    first = " and a resumed run evaluates it first" if state.get("pending_evaluation") else ""
                    print(f"note: {what}; the checkpoint of epoch {epoch} is saved{first} (resume with --resume {self.out})",
                          file=sys.stderr, flush=True)
            raise

    @property
    def interrupted(self) -> bool:
        """Stopped by SIGINT/SIGTERM before ``cfg.epochs``. A signal during the last epoch does not
        count (that run has trained every epoch), nor one in the epoch whose evaluation ended the run
        by ``stop_on_monitor_drop``: both finish (final/, summary.json) as usual."""
        return self._stop_requested and not self.stopped_on_monitor_drop and self.last_epoch < self.cfg.epochs

    # ------------------------------------------------------------------------------------------
    # cleanup
    # ------------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Curves, the final weights in diffusers format, then summary.json."""
        from ddpo_rl.reporting import write_reward_curve, write_summary

        if not self.trainer.params_finite():  # the trainer undoes such steps: this is a bug, not an input
            raise RuntimeError("the trained weights are not finite; the final weights are not written")
        write_reward_curve(
            self.out, title=f"{self.cfg.algorithm} on {self.cfg.reward} ({self.cfg.model})" + (
                f"; evaluations of base + {self.cfg.reference_interpolation:g} x (trained - base)"
                if self.interpolation.active else ""),
            tolerance=self.cfg.monitor_tolerance,
        )
        self._save_before_after()
        if not self.interrupted:
            self.save_final_weights()
        # last: summary.json marks the run finished (describe_run, run_status), so a kill before it
        # leaves a run that resumes and finishes again, never a "finished" one without final/
        return write_summary(
            self.out, self.eval_history, self.cfg,
            stopped_on_monitor_drop=self.stopped_on_monitor_drop, epochs_trained=self.last_epoch,
            interrupted=self.interrupted,
        )

    def _grid_path(self, epoch: int) -> str:
        """samples/epoch_NNNN.png, the sample grid of the evaluation after ``epoch`` (:data:`GRID_NAME`)."""
        return os.path.join(self.out, "samples", f"epoch_{epoch:04d}.png")

    def _save_before_after(self) -> str | None:
        """before_after.png: the sample grids (same prompts and noise at every evaluation) of the base
        model, of the best evaluation within tolerance when it is neither, and of the last evaluation."""
        from ddpo_rl.monitors import best_evaluation
        from ddpo_rl.plotting import save_side_by_side

        if not self.eval_history:
            return None
        best = best_evaluation([e.as_dict() for e in self.eval_history], self.cfg.monitor_tolerance)["epoch"]
        epochs = list(dict.fromkeys([self.eval_history[0].epoch, best, self.eval_history[-1].epoch]))
        paths = [p for p in map(self._grid_path, epochs) if os.path.exists(p)]
        return save_side_by_side(paths, os.path.join(self.out, "before_after.png")) if paths else None

    def save_final_weights(self, name: str = "final", epoch: int | None = None) -> str:
        """The trained weights in diffusers format under ``output_dir/name`` (final/, or best/), with
        ``ddpo_rl.json`` saying which epoch of which run they are; interpolated towards the reference
        when ``reference_interpolation`` < 1, as every evaluation is."""
        from ddpo_rl.checkpoint import save_trained_weights

        cfg = self.cfg
        epoch = self.last_epoch if epoch is None else epoch
        info = {"epoch": epoch, "algorithm": cfg.algorithm, "reward": cfg.reward, "model": cfg.model,
                "seed": cfg.seed, "reference_interpolation": cfg.reference_interpolation,
                "run_dir": os.path.abspath(self.out)}
        with self.interpolation.applied():  # the weights the evaluations measured
            return save_trained_weights(self.policy.noise_model, os.path.join(self.out, name), cfg.use_lora, info=info)

    def cleanup(self) -> None:
        self.stop_request.restore()
        if getattr(self, "run_logger", None) is not None:
            self.run_logger.close()  # logs what is left: the reward curve
        if hasattr(getattr(self, "reward_fn", None), "shutdown"):  # an AsyncReward's thread pool
            self.reward_fn.shutdown()
        if self.run_dir is not None:
            self.run_dir.close()  # releases the lock
        distributed.destroy()


def run(cfg: DDPOConfig) -> dict:
    """Setup, train, cleanup: what every recipe script calls."""
    recipe = DDPORecipe(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


def main(argv=None, algorithm: str = "ddpo_is", preset: str | None = None) -> dict:
    """Command-line entry point of the recipe scripts: parse, run, and report input errors in one line.
    ``preset``: the script's default preset (``--preset`` overrides it)."""
    from ddpo_rl.config import parse_cli

    with report_user_errors():
        return run(parse_cli(argv, algorithm=algorithm, **({"preset": preset} if preset else {})))
