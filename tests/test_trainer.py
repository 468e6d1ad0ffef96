"""The trainer's non-finite guard: a step whose result is not finite is undone, weights and optimizer state."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from ddpo_rl.keys import KEYS
from ddpo_rl.trainer import DDPOTrainer, TrainConfig


class LinearLoss(nn.Module):
    """loss = mean(advantage * <w, x>): finite for any finite w."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 3))

    def forward(self, td):
        return TensorDict({"loss_objective": (td[KEYS.advantage].squeeze(-1) * (td["x"] @ self.w)).mean()}, [])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"x": torch.randn(4, 2, 3, generator=g), KEYS.advantage: torch.randn(4, 2, 1, generator=g)}, [4, 2])


def _trainer(lr, minibatch_size=4):
    loss = LinearLoss()
    opt = torch.optim.AdamW(loss.parameters(), lr=lr, weight_decay=1e-4, foreach=True)
    trainer = DDPOTrainer(loss, opt, TrainConfig(minibatch_size=minibatch_size), generator=torch.Generator().manual_seed(0))
    after_step = []  # what each optimizer step produced, before the guard looks at it
    opt.register_step_post_hook(lambda o, a, k: after_step.append(
        (loss.w.detach().clone(), {n: v.clone() for n, v in o.state[loss.w].items()})))
    return loss, opt, trainer, after_step


def test_update_that_overflows_is_undone_and_training_goes_on():
    # lr 1e30 is finite: the 1st step takes the weights to ~1e30 (finite), the 2nd one's weight decay
    # (x (1 - lr * wd) = x -1e26) to inf. The guard restores the weights and the Adam state of step 1.
    loss, opt, trainer, after_step = _trainer(1e30, minibatch_size=2)
    out = trainer.train(_batch(0))
    assert len(after_step) == 2 and not torch.isfinite(after_step[1][0]).all(), "the 2nd update should overflow"
    assert out["skipped_steps"].item() == 1 and trainer.skipped_steps == 1
    w1, state1 = after_step[0]
    assert torch.isfinite(w1).all() and w1.abs().max() > 1e20
    assert torch.equal(loss.w.detach(), w1), "the undone step changed the weights"
    for k, v in opt.state[loss.w].items():
        assert torch.equal(v, state1[k]), k
    for g in opt.param_groups:
        g["lr"] = 1e-2
    trainer.train(_batch(1))  # from the restored state, training goes on
    assert trainer.skipped_steps == 1 and trainer.params_finite() and not torch.equal(loss.w.detach(), w1)


def test_undone_first_step_leaves_the_optimizer_uninitialised():
    loss, opt, trainer, after_step = _trainer(1e-2)
    w = loss.w.detach().clone()
    with torch.no_grad():
        loss.w.grad = None
    poisoned = _batch(0)
    poisoned["x"][0, 0, 0] = float("nan")  # a NaN loss: the step is taken, then undone
    trainer.train(poisoned)
    assert trainer.skipped_steps == 1 and torch.equal(loss.w.detach(), w)
    assert len(opt.state[loss.w]) == 0 and trainer.params_finite()


def test_after_step_is_called_once_per_optimizer_step():
    """The host-side hook (the recipes' thread governor) runs after every optimizer step, and only then."""
    loss = LinearLoss()
    opt = torch.optim.AdamW(loss.parameters(), lr=1e-2)
    weights_seen = []
    trainer = DDPOTrainer(loss, opt, TrainConfig(minibatch_size=2), generator=torch.Generator().manual_seed(0),
                          after_step=lambda: weights_seen.append(loss.w.detach().clone()))
    trainer.train(_batch(0))  # 4 trajectories, minibatch 2: two optimizer steps
    assert len(weights_seen) == 2 and not torch.equal(weights_seen[0], weights_seen[1])
    assert torch.equal(weights_seen[1], loss.w.detach())


def test_steps_begun_counts_every_optimizer_step_before_it_changes_the_weights():
    """The recipe checkpoints a failed update only while no step has begun: the count must rise before the
    weights change (a step that raises inside the optimizer counts), and count undone steps too."""
    loss, opt, trainer, after_step = _trainer(1e-2, minibatch_size=2)
    trainer.train(_batch(0))  # 4 trajectories, minibatch 2: two optimizer steps
    assert trainer.steps_begun == 2 == len(after_step)
    poisoned = _batch(1)
    poisoned["x"][0, 0, 0] = float("nan")  # its first step is undone by the guard, and still counted
    trainer.train(poisoned)
    assert trainer.steps_begun == 4 and trainer.skipped_steps == 1

    def failing_step(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    w = loss.w.detach().clone()
    opt.step = failing_step
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train(_batch(2))
    assert trainer.steps_begun == 5 and torch.equal(loss.w.detach(), w)


@pytest.mark.parametrize("first_update", [True, False])
def test_a_state_snapshot_puts_the_trainer_back_as_it_was(first_update):
    """What the recipe keeps across an epoch's update: restored after some steps, the weights, the optimizer
    state (uninitialised again before the first update), the counters and the next update equal those of
    a trainer that never took the steps."""
    def made():
        loss, opt, trainer, _ = _trainer(1e-2, minibatch_size=2)
        if not first_update:
            trainer.train(_batch(0))
        return loss, opt, trainer

    loss, opt, trainer = made()
    assert trainer.state_bytes() == (3 if first_update else 3 + 3 + 3 + 1) * 4  # w; then Adam's two moments and step
    snapshot = trainer.state_snapshot()
    trainer.train(_batch(1))
    assert trainer.steps_begun == (4 if not first_update else 2)
    trainer.restore_state(snapshot)
    other_loss, other_opt, other = made()
    assert torch.equal(loss.w.detach(), other_loss.w.detach()) and loss.w.grad is None
    assert trainer.steps_begun == other.steps_begun and trainer.skipped_steps == other.skipped_steps
    assert opt.state[loss.w].keys() == other_opt.state[other_loss.w].keys()
    for k, v in opt.state[loss.w].items():
        assert torch.equal(v, other_opt.state[other_loss.w][k])
    trainer.generator.manual_seed(5), other.generator.manual_seed(5)
    trainer.train(_batch(2)), other.train(_batch(2))
    assert torch.equal(loss.w.detach(), other_loss.w.detach())


def test_no_clipping_is_none_and_a_zero_norm_is_refused():
    """clip_grad_norm_ to 0 zeroes every gradient (a run that trains nothing): the trainer refuses it, and
    the recipes' max_grad_norm 0 means no clipping (None here), as in transformers' Trainer."""
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        TrainConfig(max_grad_norm=0).validate()
    loss = LinearLoss()
    trainer = DDPOTrainer(loss, torch.optim.SGD(loss.parameters(), lr=1.0), TrainConfig(minibatch_size=4, max_grad_norm=None))
    w, batch = loss.w.detach().clone(), _batch(0)
    batch[KEYS.advantage] *= 10
    metrics = trainer.train(batch)
    assert metrics["grad_norm"] > 1  # the default clip (1.0) would have cut it
    torch.testing.assert_close((w - loss.w.detach()).norm(), metrics["grad_norm"])  # SGD, lr 1: the whole gradient


def test_the_recipes_max_grad_norm_zero_turns_clipping_off(tmp_path):
    from ddpo_rl.config import parse_cli
    from recipes.ddpo_recipe import DDPORecipe

    recipe = DDPORecipe(parse_cli(["--preset", "tiny", "--max-grad-norm", "0", "--output-dir", str(tmp_path / "run"),
                                   "--progress", "false"])).setup()
    try:
        assert recipe.trainer.config.max_grad_norm is None
    finally:
        recipe.cleanup()



def test_metrics_are_means_over_the_finite_values():
    """An epoch with one undone NaN step reports the loss of the forwards that were finite (not NaN, which
    metrics.jsonl could only write as no value); with no finite forward at all, the mean is NaN."""
    loss, opt, trainer, _ = _trainer(0.0, minibatch_size=1)  # lr 0: every forward sees the same weights
    batch = _batch(0)
    per_forward = batch[KEYS.advantage].squeeze(-1) * (batch["x"] @ loss.w.detach())  # [4, 2]: one forward each
    batch["x"][0, 0, 0] = float("nan")  # trajectory 0, step 0: one NaN forward of the eight
    out = trainer.train(batch)
    assert trainer.skipped_steps == 1  # the optimizer step of trajectory 0
    expected = per_forward.flatten()[1:].mean()
    assert torch.allclose(out["loss"], expected) and torch.allclose(out["loss_objective"], expected)
    assert torch.isfinite(out["grad_norm"])  # three steps of four had a finite gradient
    lone = TensorDict({"x": torch.full((1, 1, 3), float("nan")), KEYS.advantage: torch.ones(1, 1, 1)}, [1, 1])
    out = trainer.train(lone)
    assert torch.isnan(out["loss"]) and torch.isnan(out["grad_norm"]) and trainer.skipped_steps == 2
