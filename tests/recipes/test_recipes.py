"""The recipe scripts end to end on the tiny random model: outputs, errors, kill and resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, TRAIN_FIELDS, read_json, read_jsonl, subprocess_env



def run_recipe(script, *args, timeout=300, **popen):
    cmd = [sys.executable, os.path.join(ROOT, "recipes", script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=ROOT, **popen)


@pytest.mark.parametrize("script", ["ddpo_is.py", "ddpo_sf.py", "rwr.py"])
def test_recipe_smoke(script, tmp_path):
    out = tmp_path / "run"
    res = run_recipe(script, "--preset", "tiny", "--epochs", "2", "--output-dir", str(out), "--progress", "false")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("epoch", "reward_mean", "reward_std", "eval_reward_mean", "loss", "clip_fraction", "kl_approx", "seconds"):
            assert key in m
        assert m["loss"] is not None and torch.isfinite(torch.tensor(m["loss"]))
        assert m["sampling_threads"] == m["training_threads"] == 1  # OMP_NUM_THREADS=1 fixes them
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["algorithm"] == script[:-3]
    for name in ("reward_curve.png", "summary.json", "samples/epoch_0000.png", "samples/epoch_0002.png",
                 "checkpoints/checkpoint.pt", "final/unet/diffusion_pytorch_model.safetensors"):
        assert (out / name).exists(), name


@pytest.mark.parametrize(
    "args, field",
    [
        (["--preset", "nope"], "preset"),
        (["--reward", "beauty"], "reward"),
        (["--epochs", "-1"], "epochs"),
        (["--minibatch-size", "3"], "minibatch_size"),
        (["--eta", "0"], "eta"),
        (["--prompts", "/nonexistent/prompts.txt"], "prompt"),
        (["--model", "/nonexistent/pipeline"], "/nonexistent/pipeline"),
        (["--bogus-field", "1"], "bogus_field"),
        (["--prompts", "{EMPTY_FILE}"], "prompts: prompt file"),
        (["--eval-prompts", "{EMPTY_FILE}"], "eval_prompts: prompt file"),
        (["--prompts", "no_such_set"], "prompts: unknown prompt set"),
        (["--eval-prompts", "digits:3-12"], "eval_prompts:"),
        (["--model", "{EMPTY_DIR}"], "model: "),
        (["--model", "{DIGITS_DIR_WITHOUT_WEIGHTS}"], "is a saved digits model without unet, text_encoder, scheduler"),
        (["--sample-batch-size", "0"], "sample_batch_size"),
        (["--gradient-accumulation-steps", "3"], "minibatch_size"),
        (["--learning-rate", "abc"], "learning_rate"),
        (["--reward-kwargs", '{"no_such_arg": 1}'], "reward_kwargs"),
        (["--reward", "tests.recipes.bad_rewards:no_such_factory"], "reward: "),
        (["--kl-coef", "-0.1"], "kl_coef"),
        (["--monitor-rewards", "beauty"], "monitor_rewards: 'beauty' is not a reward"),
        (["--monitor-rewards", "tests.recipes.bad_rewards:fails_to_load"], "monitor_rewards: monitor"),
        (["--reward", "tests.recipes.bad_rewards:fails_to_load"],
         "reward: 'tests.recipes.bad_rewards:fails_to_load' failed to load: OSError: weights not found"),
        (["--monitor-rewards", "digit_alignment", "--monitor-reward-kwargs", '{"digit_alignment": {"nope": 1}}'],
         "monitor_reward_kwargs"),
        (["--stop-on-monitor-drop", "true"], "stop_on_monitor_drop"),
        # prompts without a digit for the digit rewards: refused with the inputs, not at the first evaluation
        (["--prompts", "simple_animals", "--reward", "digit_alignment"],
         "prompts: reward 'digit_alignment' cannot score them: cannot find a digit"),
        (["--prompts", "simple_animals", "--monitor-rewards", "digit_realism"], "prompts: monitor 'digit_realism' cannot"),
        (["--eval-prompts", "simple_animals", "--monitor-rewards", "digit_alignment"], "eval_prompts: monitor 'digit_alignment'"),
        # a value given explicitly that does not fit the (changed) reward is still refused
        (["--reward", "alignment", "--reward-kwargs", '{"resize": 32}'], "reward_kwargs"),
        # a misbehaving reward: met at the first sampled batch (the tiny model makes that seconds)
        (["--reward", "tests.recipes.bad_rewards:nan_for_some"], "--on-invalid-reward drop"),
        (["--reward", "tests.recipes.bad_rewards:wrong_shape"], "wrong_shape_reward returned shape (4, 2)"),
        (["--reward", "tests.recipes.bad_rewards:raises"], "reward server unreachable"),
        (["--learning-rate", "inf"], "learning_rate: must be a finite number"),
        (["--clip-epsilon", "nan"], "clip_epsilon: must be a finite number"),
        (["--learning-rate", "1e300"], "learning_rate: must be in (0, 1]"),
        (["--epochs", "0"], "epochs: must be positive"),
        (["--output-dir", "{FILE}/run"], "output_dir: "),
        (["--prompts", "{LATIN1_FILE}"], "prompts: prompt file"),
        pytest.param(["--device", "cuda"], "device: 'cuda' requested but CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
        (["--resume", "{EMPTY_DIR}"], "resume: no checkpoint"),
    ],
)
def test_bad_input_fails_fast_with_one_line(args, field, tmp_path, capsys):
    from recipes.ddpo_recipe import main

    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    (tmp_path / "not_a_pipeline").mkdir()
    (tmp_path / "digits_without_weights").mkdir()
    (tmp_path / "digits_without_weights" / "model_index.json").write_text('{"_class_name": "DDPODigitsModel"}')
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "latin1.txt").write_bytes("un chat \xe9l\xe9gant\n".encode("latin-1"))
    subst = {"{EMPTY_FILE}": tmp_path / "empty.txt", "{EMPTY_DIR}": tmp_path / "not_a_pipeline",
             "{FILE}": tmp_path / "file", "{LATIN1_FILE}": tmp_path / "latin1.txt",
             "{DIGITS_DIR_WITHOUT_WEIGHTS}": tmp_path / "digits_without_weights"}
    for key, value in subst.items():
        args = [a.replace(key, str(value)) for a in args]
    if "--resume" in args:  # the run continues in the resumed directory
        base = ["--preset", "tiny", "--progress", "false"]
    else:
        base = ["--preset", "tiny", "--output-dir", str(tmp_path / "x"), "--progress", "false"]
    t = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main([*base, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and field in err[0], err
    assert time.perf_counter() - t < 60


def _state_of(run_dir):
    return load_file(os.path.join(run_dir, "final", "unet", "diffusion_pytorch_model.safetensors"))


def assert_same_run(full, part, epochs: int, fields=TRAIN_FIELDS):
    """``part`` (interrupted or failed, then resumed) logged every epoch once with ``full``'s figures
    (``fields`` of metrics.jsonl; None where ``full`` has None) and ends with its weights."""
    a, b = read_jsonl(os.path.join(full, "metrics.jsonl")), read_jsonl(os.path.join(part, "metrics.jsonl"))
    assert [m["epoch"] for m in b] == list(range(1, epochs + 1))
    for ma, mb in zip(a, b):
        for k in fields:
            expected = ma[k] if ma[k] is None else pytest.approx(ma[k], rel=1e-6, abs=1e-9)
            assert mb[k] == expected, (ma["epoch"], k)
    wa, wb = _state_of(full), _state_of(part)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    common = ["--preset", "tiny", "--epochs", "4", "--eval-every", "10", "--save-every", "1", "--progress", "false"]
    full = tmp_path / "full"
    res = run_recipe("ddpo_is.py", *common, "--output-dir", str(full))
    assert res.returncode == 0, res.stderr[-3000:]

    # the same run, sent SIGTERM once its 2nd epoch is logged: it checkpoints and stops
    part = tmp_path / "part"
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "ddpo_is.py"), *common, "--output-dir", str(part)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        p = part / "metrics.jsonl"
        if p.exists() and len(read_jsonl(p)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)["epoch"]
    assert 2 <= stopped_at < 4, "the signal should stop the run before its end"
    assert not (part / "final").exists()
    assert not (part / ".lock").exists(), "a stopped run must release its directory"
    summary = read_json(part / "summary.json")
    assert (summary["interrupted"], summary["epochs_trained"], summary["epochs"]) == (True, stopped_at, 4)

    res = run_recipe("ddpo_is.py", *common, "--output-dir", str(part), "--resume", str(part))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = read_json(part / "summary.json")
    assert (summary["interrupted"], summary["epochs_trained"]) == (False, 4)
    assert_same_run(full, part, 4)


def test_a_reward_that_fails_mid_run_keeps_the_epochs_since_the_last_checkpoint(tmp_path, capsys):
    """The reward raises while epoch 4 samples (checkpoints every 10 epochs): the checkpoint of epoch 3
    is written, with the random state epoch 4 started from, and the error still stops the run in one
    line; --resume (the reward back) then ends exactly as the run that never failed."""
    from recipes.ddpo_recipe import main
    from tests.recipes import bad_rewards

    def run(out, call, *extra):
        marker = str(tmp_path / f"{out}.failed")
        reward = ["--reward", "tests.recipes.bad_rewards:fail_once",
                  "--reward-kwargs", json.dumps({"call": call, "marker": marker})]
        main(["--preset", "tiny", "--eval-every", "3", "--save-every", "10", "--progress", "false",
              "--output-dir", str(tmp_path / out), *reward, *extra])
        return marker

    calls = bad_rewards.CALLS[run("three", 10**9, "--epochs", "3")]  # the reward calls of epochs 0-3
    run("full", 10**9, "--epochs", "6")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run("failed", calls + 1, "--epochs", "6")  # the first call of epoch 4 fails
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "reward server unreachable" in err and "the checkpoint of epoch 3 is saved" in err
    part = tmp_path / "failed"
    assert torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)["epoch"] == 3
    assert [m["epoch"] for m in read_jsonl(part / "metrics.jsonl")] == [1, 2, 3]
    main(["--resume", str(part), "--progress", "false"])  # the marker exists: the reward no longer fails
    assert_same_run(tmp_path / "full", part, 6)


def test_a_monitor_that_fails_mid_run_keeps_the_epochs_since_the_last_checkpoint(tmp_path, capsys):
    """A monitor raises during the evaluation of epoch 6 (evaluations every 3 epochs, checkpoints every
    10): the checkpoint of epoch 6 is written with that evaluation pending, and the error still stops the
    run in one line; --resume (the monitor back) evaluates epoch 6 first and ends exactly as the run that
    never failed, each record once, even after a killed earlier resume had begun to write them."""
    from ddpo_rl.checkpoint import read_weights_info
    from recipes.ddpo_recipe import main
    from tests.recipes import bad_rewards

    monitor = "tests.recipes.bad_rewards:fail_once"

    def run(out, call, *extra):
        marker = str(tmp_path / f"{out}.failed")
        main(["--preset", "tiny", "--eval-every", "3", "--save-every", "10", "--progress", "false",
              "--output-dir", str(tmp_path / out), "--monitor-rewards", monitor,
              "--monitor-reward-kwargs", json.dumps({monitor: {"call": call, "marker": marker}}), *extra])
        return marker

    calls = bad_rewards.CALLS[run("three", 10**9, "--epochs", "3")]  # the monitor calls of the evaluations at 0 and 3
    run("full", 10**9, "--epochs", "7")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run("failed", calls + 1, "--epochs", "7")  # the first monitor call of the evaluation at 6 fails
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "reward server unreachable" in err
    assert "the evaluation of epoch 6 failed; the checkpoint of epoch 6 is saved" in err
    part = tmp_path / "failed"
    state = torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 6 and state["pending_evaluation"]["epoch"] == 6
    assert [m["epoch"] for m in read_jsonl(part / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert [e["epoch"] for e in read_jsonl(part / "eval.jsonl")] == [0, 3]
    assert not (part / "samples" / "epoch_0006.png").exists()
    # what a resumed run killed after the evaluation's records and before its checkpoint would leave
    with open(part / "eval.jsonl", "a") as f:
        f.write(json.dumps({**read_jsonl(part / "eval.jsonl")[-1], "epoch": 6}) + "\n")
    shutil.copy(part / "samples" / "epoch_0003.png", part / "samples" / "epoch_0006.png")
    main(["--resume", str(part), "--progress", "false"])  # the marker exists: the monitor no longer fails
    assert_same_run(tmp_path / "full", part, 7, (*TRAIN_FIELDS, "eval_reward_mean", "train_prompts_reward_mean"))
    assert all(m["seconds"] > 0 for m in read_jsonl(part / "metrics.jsonl"))
    ea, eb = read_jsonl(tmp_path / "full" / "eval.jsonl"), read_jsonl(part / "eval.jsonl")
    assert [e["epoch"] for e in eb] == [0, 3, 6, 7]
    for xa, xb in zip(ea, eb):
        assert xb["monitors"][monitor] == pytest.approx(xa["monitors"][monitor], rel=1e-6), xa["epoch"]
        assert xb["train_prompts_reward_mean"] == pytest.approx(xa["train_prompts_reward_mean"], rel=1e-6)
    assert torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)["pending_evaluation"] is None
    summary_a = read_json(tmp_path / "full" / "summary.json")
    summary_b = read_json(part / "summary.json")
    assert summary_a["best_epoch"] == summary_b["best_epoch"] == read_weights_info(str(part / "best"))["epoch"]


def test_an_update_that_fails_before_its_first_step_keeps_the_epochs_since_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The update of epoch 4 raises (an out-of-memory error in its first forward, say; checkpoints every
    10 epochs) before any optimizer step: the weights are still those of epoch 3, the per-prompt
    statistics are put back, and the checkpoint of epoch 3 is written with the random state epoch 4
    started from; --resume then ends exactly as the run that never failed. Failing after the first
    optimizer step does the same from the copy of the weights and optimizer state kept for the update;
    without that copy (state too large to keep) it writes nothing (the weights are half-updated) and
    names the checkpoint to resume from."""
    from ddpo_rl.trainer import DDPOTrainer
    from recipes import ddpo_recipe
    from recipes.ddpo_recipe import main

    # per-prompt statistics from the second sample of a prompt on: the failed epoch's rewards must not stay in them
    common = ["--preset", "tiny", "--epochs", "6", "--eval-every", "3", "--progress", "false", "--stat-min-count", "2"]
    main([*common, "--save-every", "10", "--output-dir", str(tmp_path / "full")])
    real_train, real_step = DDPOTrainer.train, DDPOTrainer._optimizer_step
    calls = {"train": 0, "step": 0}

    def failing_train(self, batch):
        calls["train"] += 1
        if calls["train"] == 4:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return real_train(self, batch)

    monkeypatch.setattr(DDPOTrainer, "train", failing_train)
    capsys.readouterr()
    part = tmp_path / "failed"
    with pytest.raises(torch.OutOfMemoryError):
        main([*common, "--save-every", "10", "--output-dir", str(part)])
    err = capsys.readouterr().err
    assert "the update of epoch 4 failed; the checkpoint of epoch 3 is saved" in err
    assert torch.load(part / "checkpoints" / "checkpoint.pt", weights_only=False)["epoch"] == 3
    monkeypatch.setattr(DDPOTrainer, "train", real_train)
    main(["--resume", str(part), "--progress", "false"])
    assert_same_run(tmp_path / "full", part, 6)

    def failing_step(self, losses):  # the first step of epoch 4 is taken, then the update raises
        norm = real_step(self, losses)
        calls["step"] += 1
        if calls["step"] == steps_per_epoch * 3 + 1:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return norm

    steps_per_epoch = 0

    def counting_step(self, losses):
        nonlocal steps_per_epoch
        steps_per_epoch += 1
        return real_step(self, losses)

    monkeypatch.setattr(DDPOTrainer, "_optimizer_step", counting_step)
    main([*common, "--epochs", "1", "--output-dir", str(tmp_path / "one")])
    monkeypatch.setattr(DDPOTrainer, "_optimizer_step", failing_step)
    capsys.readouterr()
    with pytest.raises(torch.OutOfMemoryError):
        main([*common, "--save-every", "2", "--output-dir", str(tmp_path / "late")])
    err = capsys.readouterr().err
    assert "the update of epoch 4 failed; the checkpoint of epoch 3 is saved" in err
    assert torch.load(tmp_path / "late" / "checkpoints" / "checkpoint.pt", weights_only=False)["epoch"] == 3
    monkeypatch.setattr(DDPOTrainer, "_optimizer_step", real_step)
    main(["--resume", str(tmp_path / "late"), "--progress", "false"])
    assert_same_run(tmp_path / "full", tmp_path / "late", 6)

    # the same failure with no copy kept (the weights and optimizer state over the limit): nothing written
    calls["step"] = 0
    monkeypatch.setattr(DDPOTrainer, "_optimizer_step", failing_step)
    monkeypatch.setattr(ddpo_recipe, "UPDATE_SNAPSHOT_MAX_BYTES", 1000)
    with pytest.raises(torch.OutOfMemoryError):
        main([*common, "--save-every", "2", "--output-dir", str(tmp_path / "large")])
    err = capsys.readouterr().err
    assert "the update of epoch 4 failed after its first optimizer step (the weights half-updated, and no copy" in err
    assert "GiB); the last checkpoint is that of epoch 2" in err
    assert torch.load(tmp_path / "large" / "checkpoints" / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_the_fp16_loss_scale_is_part_of_the_checkpoint(tmp_path):
    """With fp16 mixed precision the GradScaler's scale is training state: a resumed run that started again
    from the initial scale would skip optimizer steps (inf gradients) that the uninterrupted run took."""
    from ddpo_rl.config import parse_cli
    from recipes.ddpo_recipe import DDPORecipe

    common = ["--preset", "tiny", "--mixed-precision", "fp16", "--progress", "false"]
    recipe = DDPORecipe(parse_cli([*common, "--output-dir", str(tmp_path / "run")])).setup()
    try:
        scaler = recipe.trainer.grad_scaler
        assert scaler.is_enabled()
        scaler.scale(torch.ones(()))  # the scale is made on first use
        scaler.update(512.0)  # where overflows would have brought it
        recipe.save_checkpoint(1)
    finally:
        recipe.cleanup()
    resumed = DDPORecipe(parse_cli([*common, "--resume", str(tmp_path / "run")])).setup()
    try:
        assert resumed.trainer.grad_scaler.get_scale() == 512.0
    finally:
        resumed.cleanup()


def test_a_monitor_value_left_out_is_counted_in_the_record(tmp_path, capsys):
    """A monitor's non-finite values are left out of its mean and std; eval.jsonl, summary.json and the
    lines a run ends with say how many, so that a mean over half the samples does not read as one over
    all of them."""
    from recipes.ddpo_recipe import main

    monitors = "tests.recipes.bad_rewards:nan_for_some,digit_alignment"
    main(["--preset", "tiny", "--epochs", "1", "--progress", "false", "--output-dir", str(tmp_path / "run"),
          "--monitor-rewards", monitors])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("monitor ")]
    assert "2 base values not finite, left out" in printed[0] and "2 final values" in printed[0]
    assert "left out" not in printed[1]  # digit_alignment
    for record in read_jsonl(tmp_path / "run" / "eval.jsonl"):
        nan_half = record["monitors"]["tests.recipes.bad_rewards:nan_for_some"]
        assert nan_half["train_left_out"] == nan_half["eval_left_out"] == 2  # 4 samples, every other one NaN
        assert math.isfinite(nan_half["train_mean"])
        assert "train_left_out" not in record["monitors"]["digit_alignment"]  # nothing left out: no field
    summary = read_json(tmp_path / "run" / "summary.json")["monitors"]
    for label in ("training prompts", "held-out prompts"):
        assert summary["tests.recipes.bad_rewards:nan_for_some"][label]["base_left_out"] == 2
        assert summary["tests.recipes.bad_rewards:nan_for_some"][label]["final_left_out"] == 2
        assert "base_left_out" not in summary["digit_alignment"][label]


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path):
    from ddpo_rl.config import parse_cli
    from recipes.ddpo_recipe import run

    def go(seed, name):
        out = tmp_path / name
        run(parse_cli(["--preset", "tiny", "--epochs", "2", "--seed", str(seed), "--output-dir", str(out), "--progress", "false"]))
        return [[m[k] for k in TRAIN_FIELDS] for m in read_jsonl(out / "metrics.jsonl")]

    assert go(0, "a") == go(0, "b")
    assert go(0, "a2") != go(1, "c")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from ddpo_rl import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_torch_save({"epoch": 1}, str(path))

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_torch_save({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["epoch"] == 1


def test_dropped_rewards_are_left_out_and_training_continues(tmp_path):
    out = tmp_path / "run"
    res = run_recipe(
        "ddpo_is.py", "--preset", "tiny", "--epochs", "2", "--output-dir", str(out), "--progress", "false",
        "--reward", "tests.recipes.bad_rewards:nan_for_some", "--on-invalid-reward", "drop",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dropping 2/4 samples with non-finite reward" in res.stderr
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["num_samples"] == 2  # 4 sampled, every other one NaN
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("reward_mean", "loss", "grad_norm"))
        assert m["skipped_steps"] == 0
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    # the evaluations' means are over the finite rewards, and every record says over how many
    for record in read_jsonl(out / "eval.jsonl"):
        assert record["num_samples"] == record["eval_num_samples"] == 2  # 4 per prompt set, every other NaN
        assert record["train_left_out"] == record["eval_left_out"] == 2
        assert math.isfinite(record["eval_reward_mean"])
    summary = read_json(out / "summary.json")
    assert summary["final"]["eval_num_samples"] == summary["final"]["eval_left_out"] == 2
    assert ("rewards not finite, left out of the means above: 2 training-prompt samples of the base "
            "evaluation, 2 held-out samples of the base evaluation") in res.stdout
    # a resumed run's summary reads the base evaluation from the checkpoint: the counts come with it
    res = run_recipe("ddpo_is.py", "--resume", str(out), "--epochs", "3", "--progress", "false")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["epochs_trained"] == 3
    assert summary["base"]["eval_num_samples"] == summary["base"]["train_left_out"] == 2


def test_more_steps_than_the_model_was_trained_with_is_one_line_and_leaves_no_directory(tmp_path):
    """The model's training timesteps are known once it is loaded, after the run directory is made: the
    error names the field, and the directory made for the run is removed again."""
    out = tmp_path / "run"
    res = run_recipe("ddpo_is.py", "--preset", "tiny", "--num-inference-steps", "5000", "--output-dir", str(out))
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: num_inference_steps: 5000 is more than the 1000 timesteps")
    assert not out.exists()


def test_a_reward_never_finite_stops_the_run_with_one_line(tmp_path):
    """--on-invalid-reward drop with every reward dropped: the evaluation records null means over 0
    samples (valid JSON, not NaN), and the first epoch stops with one line instead of "training" on
    nothing and reporting a finished run."""
    out = tmp_path / "run"
    res = run_recipe(
        "ddpo_is.py", "--preset", "tiny", "--epochs", "2", "--output-dir", str(out), "--progress", "false",
        "--reward", "tests.recipes.bad_rewards:inf_for_all", "--on-invalid-reward", "drop",
    )
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not one of the 4 samples of epoch 1 had a finite reward" in errors[0]
    assert "Traceback" not in res.stderr
    (base,) = [json.loads(line, parse_constant=pytest.fail) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert base["train_prompts_reward_mean"] is None and base["eval_reward_std"] is None
    assert base["num_samples"] == 0 and base["train_left_out"] == base["eval_left_out"] == 4
    assert not (out / "metrics.jsonl").exists() and not (out / "summary.json").exists()


class _PoisonFirstLoss:
    """Wraps a loss module: the first forward's loss is NaN (then the real loss)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, td):
        out = self.inner(td)
        self.calls += 1
        if self.calls == 1:
            out.set("loss_objective", out.get("loss_objective") * float("nan"))
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_is_skipped_and_logged(where, tmp_path):
    from ddpo_rl.config import parse_cli
    from recipes.ddpo_recipe import DDPORecipe

    out = tmp_path / "run"
    recipe = DDPORecipe(parse_cli(["--preset", "tiny", "--epochs", "2", "--eval-every", "10", "--output-dir", str(out),
                                   "--progress", "false"])).setup()
    try:
        initial = [p.detach().clone() for p in recipe.params]
        if where == "loss":
            recipe.trainer.loss_module = _PoisonFirstLoss(recipe.trainer.loss_module)
        else:  # a finite loss whose gradient is not: one hook, first backward only
            fired = []

            def hook(grad):
                if fired:
                    return grad
                fired.append(True)
                return grad * float("inf")

            recipe.params[0].register_hook(hook)
        seen_after_epoch1 = []
        train = recipe.trainer.train

        def train_and_look(batch):
            result = train(batch)
            if not seen_after_epoch1:
                seen_after_epoch1.append([p.detach().clone() for p in recipe.params])
            return result

        recipe.trainer.train = train_and_look
        recipe.train()
    finally:
        recipe.cleanup()
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["skipped_steps"] for m in metrics] == [1, 0]  # tiny preset: one optimizer step per epoch
    # the undone step's gradient norm is no value (null, read strictly: never NaN), the epoch's loss is the
    # mean of its finite forwards
    assert metrics[0]["grad_norm"] is None and metrics[1]["grad_norm"] is not None
    assert all(isinstance(m["loss"], float) for m in metrics), metrics
    assert all(torch.equal(a, b) for a, b in zip(initial, seen_after_epoch1[0])), "the skipped step changed weights"
    assert any(not torch.equal(a, p.detach()) for a, p in zip(initial, recipe.params)), "epoch 2 did not train"
    assert all(torch.isfinite(p).all() for p in recipe.params)
    ckpt = torch.load(out / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert ckpt["skipped_steps"] == 1


def test_compare_algorithms_runs_reuses_and_refuses(tmp_path):
    out = tmp_path / "cmp"
    args = ["--seeds", "0", "1", "--jobs", "2", "--progress", "false", "--output-dir", str(out),
            "--preset", "tiny", "--epochs", "1", "--clip-epsilon", "0.01"]
    res = run_recipe("compare_algorithms.py", *args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # DDPO-IS's clip range goes to its runs only, and the comparison says so
    assert "note: --clip-epsilon goes to the ddpo_is runs only" in res.stdout
    clips = {a: json.loads((out / a / "seed0" / "config.json").read_text())["clip_epsilon"] for a in ("ddpo_is", "rwr")}
    assert clips == {"ddpo_is": 0.01, "rwr": 1e-4}
    table = json.loads((out / "comparison.json").read_text())
    assert set(table["methods"]) == {"ddpo_is", "ddpo_sf", "rwr"}
    assert table["reward_queries"] == 4
    for algo, m in table["methods"].items():
        assert m["train_prompts"]["n"] == 2
        for seed in (0, 1):
            cfg = json.loads((out / algo / f"seed{seed}" / "config.json").read_text())
            assert (cfg["algorithm"], cfg["seed"], cfg["epochs"]) == (algo, seed, 1)
    assert "| ddpo_sf |" in (out / "comparison.md").read_text() and (out / "comparison.png").exists()

    # run again: every run is reused, nothing retrained
    stamp = (out / "rwr" / "seed1" / "metrics.jsonl").stat().st_mtime_ns
    res = run_recipe("compare_algorithms.py", *args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(": done ->") == 6
    assert (out / "rwr" / "seed1" / "metrics.jsonl").stat().st_mtime_ns == stamp

    # the same directories with another setting: refused in one line before anything runs
    res = run_recipe("compare_algorithms.py", *args, "--learning-rate", "0.1", timeout=300)
    assert res.returncode == 2 and "learning_rate" in res.stderr and "Traceback" not in res.stderr


def test_fresh_run_does_not_append_to_an_earlier_runs_logs(tmp_path, capsys):
    from recipes.ddpo_recipe import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 7, "reward_mean": 0.0}) + "\n")
    (out / "eval.jsonl").write_text(json.dumps({"epoch": 0, "eval_reward_mean": 0.0}) + "\n")
    args = ["--preset", "tiny", "--epochs", "1", "--output-dir", str(out), "--progress", "false"]
    with pytest.raises(SystemExit) as exc:  # refused: the directory holds an earlier run
        main(args)
    assert exc.value.code == 2 and "--overwrite true" in capsys.readouterr().err
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [7]
    res = run_recipe("ddpo_is.py", *args, "--overwrite", "true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1]
    assert [e["epoch"] for e in read_jsonl(out / "eval.jsonl")] == [0, 1]


@pytest.mark.slow
def test_interrupted_comparison_resumes_its_runs(tmp_path):
    out = tmp_path / "cmp"
    # 20 epochs of ~0.2 s: the runs are still going when the signal lands after the first epoch
    args = ["--algorithms", "ddpo_is", "rwr", "--seeds", "0", "--jobs", "2", "--progress", "false",
            "--output-dir", str(out), "--preset", "tiny", "--epochs", "20", "--save-every", "1", "--eval-every", "100"]
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "compare_algorithms.py"), *args]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # stop the comparison once a run has logged an epoch
        if any(len(read_jsonl(p)) >= 1 for p in out.glob("*/seed0/metrics.jsonl")):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert not (out / "comparison.json").exists()
    stopped = [p for p in out.glob("*/seed0") if not (p / "final").exists()]
    assert stopped, "the SIGTERM should stop at least one run before its end"

    res = run_recipe("compare_algorithms.py", *args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ": resume ->" in res.stdout
    for algo in ("ddpo_is", "rwr"):
        assert [m["epoch"] for m in read_jsonl(out / algo / "seed0" / "metrics.jsonl")] == list(range(1, 21))
    assert json.loads((out / "comparison.json").read_text())["methods"]["rwr"]["train_prompts"]["n"] == 1


def test_group_size_sets_the_prompt_order_and_the_advantages(tmp_path):
    """--group-size G: every training batch holds G consecutive samples of each prompt, and the
    advantages the trainer gets are the rewards standardised within those groups."""
    from ddpo_rl.advantages import group_advantages
    from ddpo_rl.collector import terminal_rewards
    from ddpo_rl.config import parse_cli
    from ddpo_rl.keys import KEYS
    from recipes.ddpo_recipe import DDPORecipe

    recipe = DDPORecipe(parse_cli(["--preset", "tiny", "--epochs", "1", "--group-size", "2", "--eval-every", "10",
                                   "--output-dir", str(tmp_path / "run"), "--progress", "false"])).setup()
    seen = []
    train = recipe.trainer.train
    recipe.trainer.train = lambda batch: (seen.append(batch.clone()), train(batch))[1]
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    batch = seen[0]
    ids = batch[KEYS.prompt_id][:, 0]
    assert (ids[0::2] == ids[1::2]).all()
    expected = group_advantages(terminal_rewards(batch), 2).clamp(-recipe.cfg.adv_clip_max, recipe.cfg.adv_clip_max)
    torch.testing.assert_close(batch[KEYS.advantage][:, 0, 0], expected)
    assert (batch[KEYS.advantage][:, 0, 0].reshape(-1, 2).sum(1).abs() < 1e-5).all()


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf", "rwr"])
def test_recipe_runs_a_flow_matching_model(algorithm, tmp_path, monkeypatch):
    """A model whose scheduler is FlowMatchEulerDiscreteScheduler gets the flow policy (SD3-style call,
    pooled embeddings from the encoder), and the recipe's loop, logs and outputs work unchanged."""
    import ddpo_rl.models.loading as loading
    from ddpo_rl.config import parse_cli
    from ddpo_rl.flow_policy import FlowMatchingPolicy
    from recipes.ddpo_recipe import DDPORecipe
    from tests.helpers import HashEncoder, flow_scheduler, tiny_sd3_transformer, to_images

    def build_model(name, device, **kw):
        return loading.DiffusionModel(
            unet=tiny_sd3_transformer(), scheduler=flow_scheduler(), encode_prompts=HashEncoder(),
            decode=to_images, latent_shape=(4, 8, 8), kind="tiny",
        )

    monkeypatch.setattr(loading, "build_model", build_model)
    out = tmp_path / "run"
    recipe = DDPORecipe(parse_cli(["--preset", "tiny", "--algorithm", algorithm, "--group-size", "2", "--epochs", "2",
                                   "--output-dir", str(out), "--progress", "false"])).setup()
    try:
        assert isinstance(recipe.policy, FlowMatchingPolicy) and recipe.policy.head.pooled
        assert recipe.policy.head.noise_level == recipe.cfg.noise_level
        recipe.train()
    finally:
        recipe.cleanup()
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert (out / "summary.json").exists() and (out / "final" / "transformer" / "config.json").exists()


@pytest.mark.parametrize("embedded, objective", [("digits", "epsilon"), ("digits-flow", "flow")])
def test_recipe_fine_tunes_a_saved_digits_directory_like_the_embedded_model(tmp_path, embedded, objective):
    """`--model DIR` with a directory written by save_digits_model (here a copy of the packaged one, of
    either objective) gets the digits defaults (JPEG at 32 px, the digit monitor) and trains exactly as
    `--model digits` / `--model digits-flow` (the same sampler: DDIM, or the flow SDE)."""
    from ddpo_rl.models.digits import packaged_model_dir
    from recipes.ddpo_recipe import main

    model_dir = tmp_path / "my-digits"
    shutil.copytree(packaged_model_dir(objective), model_dir)
    small = ["--epochs", "1", "--sample-batch-size", "8", "--num-batches-per-epoch", "1", "--minibatch-size", "8",
             "--eval-num-samples", "8", "--grid-samples-per-prompt", "1", "--progress", "false"]
    for name, model in (("embedded", embedded), ("dir", str(model_dir))):
        main(["--model", model, "--output-dir", str(tmp_path / name), *small])
    configs = {n: json.loads((tmp_path / n / "config.json").read_text()) for n in ("embedded", "dir")}
    assert configs["dir"]["model"] == str(model_dir)
    assert configs["dir"]["reward_kwargs"] == {"resize": 32} and configs["dir"]["monitor_rewards"] == ["digit_alignment", "digit_realism"]
    metrics = {n: read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("embedded", "dir")}
    evals = {n: read_jsonl(tmp_path / n / "eval.jsonl") for n in ("embedded", "dir")}
    for key in ("loss", "reward_mean", "kl_to_reference"):
        assert metrics["dir"][-1][key] == metrics["embedded"][-1][key], key
    assert evals["dir"] == evals["embedded"]
