"""The recipe's monitors end to end (tiny model): eval.jsonl, the alarm said once, best/, stop_on_monitor_drop, KL logged."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddpo_rl.config import parse_cli
from recipes.ddpo_recipe import run
from tests.helpers import read_jsonl, train_with_a_stop_signal

FALLING = "tests.recipes.bad_rewards:falling"


def _run(tmp_path, name, *args):
    out = tmp_path / name
    cfg = parse_cli(["--preset", "tiny", "--output-dir", str(out), "--progress", "false", "--epochs", "3",
                     "--eval-every", "1", "--save-every", "10", *args])
    return out, run(cfg)


def _unet(path):
    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")


def test_alarm_is_said_once_and_best_is_the_last_evaluation_within_tolerance(tmp_path, capsys):
    out, summary = _run(tmp_path, "run", "--monitor-rewards", f"digit_alignment,{FALLING}", "--kl-coef", "0.1")
    said = capsys.readouterr()
    err = said.err
    assert err.count("over-optimisation") == 1 and f"monitor {FALLING}" in err and "epoch 1" in err, err
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["epoch"] for e in evals] == [0, 1, 2, 3]
    assert all(set(e["monitors"]) == {"digit_alignment", FALLING} for e in evals)
    assert [e.get("monitor_alarm", {}).get("epoch") for e in evals] == [None, 1, None, None]
    assert summary["monitor_alarm"]["epoch"] == 1 and summary["monitor_alarm"]["monitor"] == FALLING
    assert summary["best_epoch"] == 0 and not summary["stopped_on_monitor_drop"]
    assert set(summary["monitors"]["digit_alignment"]) == {"training prompts", "held-out prompts"}
    # best/ holds the base weights (the only evaluation within tolerance), final/ the trained ones
    best, final = _unet(out / "best"), _unet(out / "final")
    assert any(not torch.equal(best[k], final[k]) for k in best)
    # the KL to the reference is logged every epoch, 0 before the first update
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(m["kl_to_reference"] is not None for m in metrics) and metrics[-1]["kl_to_reference"] > 0
    assert Image.open(out / "reward_curve.png").size[1] == 2 * 420  # the monitor panel
    # before_after.png: the base grid (here also best/'s) beside the last evaluation's
    base, last = Image.open(out / "samples" / "epoch_0000.png"), Image.open(out / "samples" / "epoch_0003.png")
    assert Image.open(out / "before_after.png").size == (base.width + 12 + last.width, max(base.height, last.height))
    # the run ends by printing its summary: the alarm again, and which epochs final/ and best/ hold
    report = said.out.splitlines()
    assert report[0].startswith(f"finished 3 of 3 epochs; run directory {out}")
    assert f"over-optimisation: monitor {FALLING}" in said.out and "weights: final/ epoch 3; best/ epoch 0" in said.out


def test_stop_on_monitor_drop_ends_the_run_with_a_checkpoint(tmp_path, capsys):
    out, summary = _run(tmp_path, "stop", "--monitor-rewards", FALLING, "--stop-on-monitor-drop", "true")
    said = capsys.readouterr().out
    assert "stop_on_monitor_drop: run ended at epoch 1" in said and "stopped after 1 of 3 epochs (stop_on_monitor_drop)" in said
    assert summary["stopped_on_monitor_drop"] and summary["final"]["epoch"] == 1 and summary["best_epoch"] == 0
    assert (summary["interrupted"], summary["epochs_trained"], summary["epochs"]) == (False, 1, 3)
    assert len(read_jsonl(out / "metrics.jsonl")) == 1
    assert torch.load(out / "checkpoints" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert (out / "final").is_dir() and (out / "best").is_dir()


def test_the_monitor_stop_says_final_saved_only_once_it_is(tmp_path, capsys, monkeypatch):
    from recipes.ddpo_recipe import DDPORecipe

    real = DDPORecipe.save_final_weights

    def fails(self, name="final", epoch=None):
        if name == "final":
            raise OSError("disk full")
        return real(self, name, epoch)

    monkeypatch.setattr(DDPORecipe, "save_final_weights", fails)
    with pytest.raises(OSError):
        _run(tmp_path, "stop", "--monitor-rewards", FALLING, "--stop-on-monitor-drop", "true")
    assert "final/ saved" not in capsys.readouterr().out


def test_a_signal_in_the_epoch_that_stops_on_the_monitor_still_writes_final(tmp_path, capsys):
    """SIGINT/SIGTERM during the epoch whose evaluation ends the run by stop_on_monitor_drop: the
    run ends as the monitor says (final/ written, not "interrupted"), as announced."""
    from recipes.ddpo_recipe import DDPORecipe

    out = tmp_path / "both"
    recipe = DDPORecipe(parse_cli(["--preset", "tiny", "--output-dir", str(out), "--progress", "false", "--epochs", "3",
                                   "--eval-every", "1", "--monitor-rewards", FALLING,
                                   "--stop-on-monitor-drop", "true"])).setup()
    summary = train_with_a_stop_signal(recipe)
    said = capsys.readouterr().out
    assert "checkpoint and final/ saved" in said and "Resume with" not in said
    assert summary["stopped_on_monitor_drop"] and not summary["interrupted"] and summary["epochs_trained"] == 1
    assert (out / "final").is_dir()


def test_without_monitors_best_is_the_highest_reward(tmp_path):
    out, summary = _run(tmp_path, "plain", "--epochs", "2")
    assert summary["monitors"] == {} and summary["monitor_alarm"] is None
    rewards = {e["epoch"]: e["train_prompts_reward_mean"] for e in read_jsonl(out / "eval.jsonl")}
    assert summary["best_epoch"] == max(rewards, key=rewards.get)
    assert json.loads((out / "config.json").read_text())["kl_coef"] == 0.0
    assert all(m["kl_to_reference"] is None for m in read_jsonl(out / "metrics.jsonl"))


def test_reference_interpolation_is_what_evaluations_and_final_see_and_training_is_unchanged(tmp_path, capsys):
    from ddpo_rl.models.loading import build_model

    args = ("--epochs", "2", "--kl-coef", "0.1")
    out_1, s_1 = _run(tmp_path, "lambda1", *args)
    out_h, s_h = _run(tmp_path, "lambda_half", *args, "--reference-interpolation", "0.5")
    said = capsys.readouterr().out
    # training is that of the trained weights: the same losses, KL and rewards every epoch
    keys = ("reward_mean", "reward_std", "loss", "loss_objective", "loss_kl", "kl_to_reference", "grad_norm")
    m_1, m_h = read_jsonl(out_1 / "metrics.jsonl"), read_jsonl(out_h / "metrics.jsonl")
    assert len(m_1) == 2 and m_1[-1]["kl_to_reference"] > 0
    assert [[m[k] for k in keys] for m in m_1] == [[m[k] for k in keys] for m in m_h]
    # final/ holds base + 0.5 (trained - base)
    base = build_model("tiny", torch.device("cpu")).unet.state_dict()
    trained, half = _unet(out_1 / "final"), _unet(out_h / "final")
    moved = [k for k in base if not torch.equal(trained[k], base[k])]
    assert moved
    for k in base:
        torch.testing.assert_close(half[k], base[k] + 0.5 * (trained[k] - base[k]), rtol=1e-5, atol=1e-6)
    # the base evaluation is the same; later ones measure the interpolated weights
    e_1, e_h = read_jsonl(out_1 / "eval.jsonl"), read_jsonl(out_h / "eval.jsonl")
    assert e_1[0] == e_h[0] and e_1[-1]["train_prompts_reward_mean"] != e_h[-1]["train_prompts_reward_mean"]
    assert (s_1["reference_interpolation"], s_h["reference_interpolation"]) == (1.0, 0.5)
    assert json.loads((out_h / "final" / "ddpo_rl.json").read_text())["reference_interpolation"] == 0.5
    assert said.count("weights (base + 0.5 x (trained - base), as evaluated: reference_interpolation): final/ epoch 2") == 1
    # the checkpoint (what a resume continues) holds the trained weights, not the interpolated ones
    c_1, c_h = (torch.load(o / "checkpoints" / "checkpoint.pt", weights_only=False) for o in (out_1, out_h))
    assert c_h["epoch"] == 2 and c_1["trainable"].keys() == c_h["trainable"].keys()
    assert all(torch.equal(c_1["trainable"][k], c_h["trainable"][k]) for k in c_1["trainable"])


def test_a_run_from_before_reference_interpolation_resumes_evaluating_the_trained_weights(tmp_path):
    """A config.json written before the field existed has no reference_interpolation: that run evaluated
    the trained weights, and resuming it must go on doing so, not take the new default."""
    from ddpo_rl.config import DDPOConfig

    out, _ = _run(tmp_path, "old", "--epochs", "1")
    config = json.loads((out / "config.json").read_text())
    del config["reference_interpolation"]
    (out / "config.json").write_text(json.dumps(config))
    cfg = parse_cli(["--resume", str(out), "--epochs", "2", "--progress", "false"])
    assert cfg.reference_interpolation == 1.0 != DDPOConfig().reference_interpolation
    summary = run(cfg)
    assert (summary["reference_interpolation"], summary["epochs_trained"]) == (1.0, 2)
