"""The recipes guard their run directory: one run per directory, honest resumes, verified checkpoints,
one-line errors (tiny model, in-process: seconds each)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
import torch

from ddpo_rl.checkpoint import atomic_torch_save, previous_path
from ddpo_rl.config import parse_cli
from ddpo_rl.run_dir import LOCK_NAME, RunLock
from tests.helpers import read_json, read_jsonl, train_with_a_stop_signal

TINY = ["--preset", "tiny", "--progress", "false", "--eval-every", "10"]


def _digest(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _fails(capsys, argv, algorithm="ddpo_is") -> str:
    from recipes.ddpo_recipe import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv, algorithm=algorithm)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the recipe gets as far as loading a model."""
    import ddpo_rl.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(loading, "build_model", refuse)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch tiny run (checkpoints at epochs 1 and 2); tests copy it."""
    from recipes.ddpo_recipe import main

    out = tmp_path_factory.mktemp("runs") / "run"
    main([*TINY, "--epochs", "2", "--save-every", "1", "--output-dir", str(out)])
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(run_dir, capsys, no_model_load):
    before = _digest(run_dir)
    err = _fails(capsys, [*TINY, "--epochs", "2", "--output-dir", str(run_dir)])
    assert "holds a finished run (2 of 2 epochs)" in err and "--overwrite true" in err and f"--resume {run_dir}" in err
    assert _digest(run_dir) == before


def test_an_overwrite_whose_set_up_fails_leaves_the_earlier_run_whole(run_dir, tmp_path, capsys):
    """--overwrite true removes the earlier run only once the new run can start: a model directory that
    fails to load (found after the run directory is opened, unlike a missing one) stops the run with one
    line and loses nothing; an overwrite that can start then replaces the run, with a note."""
    from recipes.ddpo_recipe import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    before = _digest(run_dir)
    overwrite = [*TINY, "--epochs", "1", "--output-dir", str(run_dir), "--overwrite", "true"]
    err = _fails(capsys, [*overwrite, "--model", str(broken), "--monitor-rewards", ""])
    assert err.startswith("error: model:") and "lacks the component folder" in err
    assert _digest(run_dir) == before
    main(overwrite)
    assert "removed the earlier run" in capsys.readouterr().err
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert read_json(run_dir / "summary.json")["epochs_trained"] == 1


def test_an_overwrite_with_a_logger_that_is_not_installed_changes_nothing(run_dir, capsys, monkeypatch, no_model_load):
    """The logger is made last, after the earlier run is removed: a tracker whose package is missing is
    refused with the inputs, before the run directory or a model is touched."""
    import ddpo_rl.loggers as loggers

    monkeypatch.setattr(loggers, "PACKAGES", {**loggers.PACKAGES, "csv": "a_package_that_is_not_installed"})
    before = _digest(run_dir)
    err = _fails(capsys, [*TINY, "--epochs", "1", "--output-dir", str(run_dir), "--overwrite", "true", "--logger", "csv"])
    assert err.startswith("error: logger: 'csv' needs the a_package_that_is_not_installed package")
    assert _digest(run_dir) == before


def test_resume_continues_in_the_resumed_directory_and_applies_and_records_changes(run_dir, tmp_path, monkeypatch, capsys):
    from recipes.ddpo_recipe import main

    monkeypatch.chdir(tmp_path)  # the preset's default output_dir (outputs/tiny) would be here
    main(["--resume", str(run_dir), "--epochs", "3", "--learning-rate", "0.01"])  # the run's own config otherwise
    assert "learning_rate: 0.0003 -> 0.01" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists(), "resume wrote outside the resumed run"
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert (cfg["epochs"], cfg["learning_rate"], cfg["output_dir"]) == (3, 0.01, str(run_dir))
    assert [h["event"] for h in cfg["history"]] == ["start", "resume"]
    assert cfg["history"][1]["epoch"] == 2
    changed = dict(cfg["history"][1]["changed"])
    assert changed.pop("output_dir")["to"] == str(run_dir)  # the run was copied here from the fixture's directory
    assert changed == {"epochs": {"from": 2, "to": 3}, "learning_rate": {"from": 3e-4, "to": 0.01}}
    ckpt = torch.load(run_dir / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 3 and ckpt["config"]["learning_rate"] == 0.01 and ckpt["history"] == cfg["history"]
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.01]  # applied to the optimizer, not only recorded


def test_resume_after_a_kill_mid_write_drops_the_torn_line_and_restores_best(run_dir, capsys):
    """The kill struck while a log line was half written and while best/ was being replaced (between
    its two renames: the previous best/ set aside, the new one not yet in place), after the grid of
    an evaluation past the checkpoint was saved: the resume drops it with the log lines (with another
    --eval-every the resumed run would not evaluate that epoch again and replace it)."""
    from recipes.ddpo_recipe import DDPORecipe

    best_before = _digest(run_dir / "best")
    assert best_before
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "reward_me')
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_pro')
    os.replace(run_dir / "best", run_dir / ".best.old-12345")
    grids = sorted(os.listdir(run_dir / "samples"))
    (run_dir / "samples" / "epoch_0003.png").write_bytes(b"the killed attempt's epoch-3 grid")
    recipe = DDPORecipe(parse_cli(["--resume", str(run_dir), "--epochs", "3"]))
    try:
        recipe.setup()  # the resume repairs the directory before any epoch runs
        assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
        assert [e["epoch"] for e in read_jsonl(run_dir / "eval.jsonl")] == [0, 2]
        assert sorted(os.listdir(run_dir / "samples")) == grids == ["epoch_0000.png", "epoch_0002.png"]
        assert _digest(run_dir / "best") == best_before  # the previous best/, moved back
        assert not [n for n in os.listdir(run_dir) if n.startswith(".") and n != LOCK_NAME]
        recipe.train()
    finally:
        recipe.cleanup()
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert [e["epoch"] for e in read_jsonl(run_dir / "eval.jsonl")] == [0, 2, 3]
    assert not [n for n in os.listdir(run_dir) if n.startswith(".") and n != LOCK_NAME]


def test_a_kill_while_final_weights_are_written_leaves_a_run_to_resume_not_a_finished_one(tmp_path, monkeypatch):
    from recipes.ddpo_recipe import DDPORecipe, main
    from ddpo_rl.run_dir import describe_run

    real = DDPORecipe.save_final_weights

    def killed(self, name="final", epoch=None):
        if name == "final":
            raise KeyboardInterrupt("killed while writing final/")
        return real(self, name, epoch)

    out = tmp_path / "run"
    monkeypatch.setattr(DDPORecipe, "save_final_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        main([*TINY, "--epochs", "1", "--output-dir", str(out)])
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    assert describe_run(str(out)) == "an interrupted run (stopped after epoch 1 of 1)"
    monkeypatch.setattr(DDPORecipe, "save_final_weights", real)
    main(["--resume", str(out)])
    assert (out / "summary.json").exists() and any((out / "final").iterdir())


@pytest.mark.parametrize("signal_epoch", [1, 2])
def test_a_stopped_run_says_so_and_a_signal_in_the_last_epoch_still_finishes(tmp_path, capsys, signal_epoch):
    """SIGINT/SIGTERM sets the stop flag; here it is set while epoch ``signal_epoch`` of 2 trains.
    Stopped after epoch 1: summary.json says interrupted (1 of 2 epochs), no final/. Signalled in the
    last epoch: every epoch has trained, so the run finishes (final/, interrupted false)."""
    from recipes.ddpo_recipe import DDPORecipe
    from ddpo_rl.run_dir import describe_run

    out = tmp_path / "run"
    train_with_a_stop_signal(DDPORecipe(parse_cli([*TINY, "--epochs", "2", "--output-dir", str(out)])).setup(),
                             during_epoch=signal_epoch)
    summary = read_json(out / "summary.json")
    assert (summary["epochs"], summary["epochs_trained"]) == (2, signal_epoch)
    assert summary["interrupted"] is (signal_epoch < 2)
    assert (out / "final").is_dir() is (signal_epoch == 2)
    said = capsys.readouterr().out
    if signal_epoch < 2:
        assert f"stopped at epoch 1; checkpoint saved. Resume with --resume {out}" in said
        assert describe_run(str(out)) == "an interrupted run (stopped after epoch 1 of 2)"
    else:
        assert "stopped at epoch" not in said
        assert describe_run(str(out)) == "a finished run (2 of 2 epochs)"


def test_final_and_best_say_which_epoch_they_hold_and_the_summary_tells_a_stale_final(tmp_path):
    """final/ and best/ carry ddpo_rl.json (epoch, run). A finished 2-epoch run resumed for 4 epochs
    and stopped after epoch 3 keeps the final/ of epoch 2: summary.json says so
    (final_weights_epoch 2, epochs_trained 3, interrupted)."""
    from ddpo_rl.checkpoint import read_weights_info
    from recipes.ddpo_recipe import DDPORecipe, run

    out = tmp_path / "run"
    summary = run(parse_cli([*TINY, "--epochs", "2", "--eval-every", "1", "--output-dir", str(out)]))
    final, best = read_weights_info(str(out / "final")), read_weights_info(str(out / "best"))
    assert final["epoch"] == 2 and final["run_dir"] == str(out) and final["algorithm"] == "ddpo_is"
    assert best["epoch"] == summary["best_epoch"]
    assert summary["final_weights_epoch"] == 2 and not summary["interrupted"]

    resumed = DDPORecipe(parse_cli(["--resume", str(out), "--epochs", "4", "--progress", "false"])).setup()
    summary = train_with_a_stop_signal(resumed)
    assert (summary["interrupted"], summary["epochs_trained"], summary["final_weights_epoch"]) == (True, 3, 2)
    assert read_weights_info(str(out / "final"))["epoch"] == 2
    assert read_weights_info(str(tmp_path / "nowhere")) is None


def _kill_at_checkpoint(recipe_cls, monkeypatch, epoch):
    """Make the checkpoint of ``epoch`` fail as a SIGKILL before it would (nothing after it runs)."""
    real = recipe_cls.save_checkpoint

    def save(self, e, *args, **kwargs):
        if e == epoch:
            raise KeyboardInterrupt(f"killed before the checkpoint of epoch {e}")
        return real(self, e, *args, **kwargs)

    monkeypatch.setattr(recipe_cls, "save_checkpoint", save)


def test_best_never_holds_weights_of_an_evaluation_the_resumed_run_redid(tmp_path, monkeypatch):
    """Evaluations every epoch, checkpoints every 2. The evaluations of epochs 3 and 4 are each the
    best so far, then the run is killed before epoch 4's checkpoint. The resumed run redoes epochs 3
    and 4 from the checkpoint of epoch 2 and, here, scores lower (a changed config or a GPU's other
    round-off can do that; the rule below stands in for it): best/ must hold epoch 2's weights, the
    best of what eval.jsonl has, not the lost epoch 4's."""
    import ddpo_rl.monitors as monitors
    from ddpo_rl.checkpoint import read_weights_info
    from recipes.ddpo_recipe import BEST_PENDING, DDPORecipe, run

    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "4", "--eval-every", "1", "--save-every", "2", "--output-dir", str(out)]
    monkeypatch.setattr(monitors, "best_evaluation", lambda history, tolerance: history[-1])  # each one best
    _kill_at_checkpoint(DDPORecipe, monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(parse_cli(argv))
    assert read_weights_info(str(out / "best"))["epoch"] == 2  # what the checkpoint of epoch 2 covers
    assert read_weights_info(str(out / BEST_PENDING))["epoch"] == 4  # waiting for a checkpoint

    monkeypatch.undo()
    monkeypatch.setattr(monitors, "best_evaluation",  # the redone epochs 3 and 4 score below epoch 2
                        lambda history, tolerance: [r for r in history if r["epoch"] <= 2][-1])
    run(parse_cli(["--resume", str(out)]))
    assert read_weights_info(str(out / "best"))["epoch"] == 2
    assert not (out / BEST_PENDING).exists()
    assert [e["epoch"] for e in read_jsonl(out / "eval.jsonl")] == [0, 1, 2, 3, 4]


def test_a_kill_between_the_checkpoint_and_best_is_mended_on_resume(tmp_path, monkeypatch):
    """Killed after the checkpoint of epoch 2 was written, before best/ took epoch 2's weights: the
    resume finds them pending and covered by the checkpoint, and moves them into best/."""
    import ddpo_rl.monitors as monitors
    from ddpo_rl.checkpoint import read_weights_info
    from recipes.ddpo_recipe import BEST_PENDING, DDPORecipe

    out = tmp_path / "run"
    real = DDPORecipe._settle_best

    def killed(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed before best/ was replaced")
        return real(self, epoch)

    monkeypatch.setattr(DDPORecipe, "_settle_best", killed)
    monkeypatch.setattr(monitors, "best_evaluation", lambda history, tolerance: history[-1])  # each one best
    recipe = DDPORecipe(parse_cli([*TINY, "--epochs", "2", "--eval-every", "2", "--save-every", "2",
                                   "--output-dir", str(out)]))
    try:
        recipe.setup()
        with pytest.raises(KeyboardInterrupt):
            recipe.train()
    finally:
        recipe.cleanup()
    monkeypatch.undo()
    assert read_weights_info(str(out / "best")) is None and read_weights_info(str(out / BEST_PENDING))["epoch"] == 2
    resumed = DDPORecipe(parse_cli(["--resume", str(out)]))
    try:
        resumed.setup()
        assert read_weights_info(str(out / "best"))["epoch"] == 2 and not (out / BEST_PENDING).exists()
    finally:
        resumed.cleanup()


def test_resume_with_fewer_epochs_than_reached_is_refused(run_dir, capsys, no_model_load):
    before = _digest(run_dir)
    err = _fails(capsys, ["--resume", str(run_dir), "--epochs", "1"])
    assert err.startswith("error: epochs: 1 is below the epoch the run has reached (2)")
    assert _digest(run_dir) == before


@pytest.mark.parametrize("argv, algorithm, field", [
    ([], "rwr", "algorithm"),
    (["--seed", "1"], "ddpo_is", "seed"),
    (["--sample-batch-size", "8"], "ddpo_is", "sample_batch_size"),
    (["--reward", "jpeg_incompressibility"], "ddpo_is", "reward"),
])
def test_resume_refuses_fixed_fields_before_any_model_is_loaded(run_dir, capsys, no_model_load, argv, algorithm, field):
    before = _digest(run_dir)
    err = _fails(capsys, [*TINY, "--resume", str(run_dir), *argv], algorithm=algorithm)
    assert err.startswith(f"error: {field}: cannot change on resume")
    assert _digest(run_dir) == before


def test_resume_with_another_output_dir_is_refused(run_dir, tmp_path, capsys, no_model_load):
    err = _fails(capsys, [*TINY, "--resume", str(run_dir), "--output-dir", str(tmp_path / "elsewhere")])
    assert "output_dir: --resume continues the run in its own directory" in err
    assert not (tmp_path / "elsewhere").exists()


def _damage(path, how):
    data = open(path, "rb").read()
    data = {"truncated": data[: len(data) // 2], "zero_bytes": b"", "text": b"hello\n",
            "overwritten_4k": data[:5000] + b"\0" * 4096 + data[9096:]}[how]
    open(path, "wb").write(data)


@pytest.mark.parametrize("how", ["truncated", "zero_bytes", "text", "overwritten_4k"])
def test_damaged_checkpoint_falls_back_to_the_previous_one_and_keeps_it(run_dir, capsys, how):
    from recipes.ddpo_recipe import DDPORecipe

    newest = run_dir / "checkpoints" / "checkpoint.pt"
    _damage(newest, how)
    recipe = DDPORecipe(parse_cli([*TINY, "--resume", str(run_dir)])).setup()
    try:
        assert recipe.start_epoch == 1
        err = capsys.readouterr().err
        assert f"{newest}" in err and "resuming from the previous checkpoint" in err
        recipe.save_checkpoint(2)  # the damaged file is replaced, the sound previous one kept
    finally:
        recipe.cleanup()
    assert torch.load(newest, weights_only=False)["epoch"] == 2
    assert torch.load(previous_path(str(newest)), weights_only=False)["epoch"] == 1


@pytest.mark.parametrize("how", ["truncated", "zero_bytes", "text", "overwritten_4k"])
def test_damaged_checkpoints_without_fallback_are_one_line_and_change_nothing(run_dir, capsys, no_model_load, how):
    newest = run_dir / "checkpoints" / "checkpoint.pt"
    _damage(newest, how)
    _damage(previous_path(str(newest)), how)
    before = _digest(run_dir)
    err = _fails(capsys, [*TINY, "--resume", str(run_dir)])
    assert err.startswith(f"error: resume: {newest}: ")
    assert _digest(run_dir) == before


@pytest.mark.parametrize("with_trailer", [True, False])
def test_resuming_a_dppo_gym_directory_is_refused_as_foreign(tmp_path, capsys, no_model_load, with_trailer):
    out = tmp_path / "gym"
    out.mkdir()
    from recipes.dppo_gym import DPPOGymConfig

    (out / "config.json").write_text(json.dumps(dataclasses.asdict(DPPOGymConfig(output_dir=str(out)))))
    state = {"noise_model": {"w": torch.zeros(2)}, "critic": {}, "optimizer": {}}
    if with_trailer:
        atomic_torch_save(state, str(out / "checkpoint.pt"), kind="dppo_gym")
    else:  # written before checksums existed
        torch.save(state, out / "checkpoint.pt")
    before = _digest(out)
    err = _fails(capsys, [*TINY, "--resume", str(out)])
    assert "foreign" in err and str(out / "checkpoint.pt") in err
    assert _digest(out) == before


def test_second_run_into_a_directory_in_use_is_refused_naming_the_holder(tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(str(out)).acquire()
    try:
        err = _fails(capsys, [*TINY, "--output-dir", str(out)])
    finally:
        lock.release()
    assert f"is in use by another run (pid {os.getpid()} on " in err
    assert os.listdir(out) == []


def test_interrupted_run_releases_its_lock(tmp_path, monkeypatch):
    from ddpo_rl.trainer import DDPOTrainer
    from recipes.ddpo_recipe import run

    def interrupted(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(DDPOTrainer, "train", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(parse_cli([*TINY, "--output-dir", str(out)]))
    assert not (out / LOCK_NAME).exists()
    RunLock(str(out)).acquire().release()


def test_update_with_non_finite_result_is_undone_and_the_run_ends_with_finite_weights(tmp_path, capsys):
    from recipes.ddpo_recipe import DDPORecipe

    out = tmp_path / "run"
    # two optimizer steps per epoch; lr 1e30 (finite) takes the weights to ~1e30, the next step to inf
    recipe = DDPORecipe(parse_cli([*TINY, "--minibatch-size", "2", "--output-dir", str(out)])).setup()
    try:
        for g in recipe.optimizer.param_groups:
            g["lr"] = 1e30
        recipe.train()
    finally:
        recipe.cleanup()
    skipped = [m["skipped_steps"] for m in read_jsonl(out / "metrics.jsonl")]
    assert sum(skipped) >= 1
    assert "optimizer step(s) undone" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in recipe.params)
    from safetensors.torch import load_file

    final = load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


@pytest.mark.parametrize("argv, field", [
    (["--env", "NoSuchEnv-v0"], "env: 'NoSuchEnv-v0' is not a gymnasium env id"),
    (["--env", "CartPole-v1"], "env: CartPole-v1 has a Discrete action space"),
    (["--epochs", "0"], "epochs: must be positive"),
    (["--actor-lr", "nan"], "actor_lr: must be a finite number"),
    (["--output-dir", "{FILE}/run"], "output_dir: "),
])
def test_dppo_gym_user_errors_are_one_line(tmp_path, capsys, argv, field):
    from recipes.dppo_gym import main

    (tmp_path / "file").write_text("x")
    argv = [a.replace("{FILE}", str(tmp_path / "file")) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["--output-dir", str(tmp_path / "out"), "--progress", "false", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + field), err


def test_dppo_gym_rerun_is_refused_unless_overwrite(tmp_path, capsys):
    from recipes.dppo_gym import main

    out = tmp_path / "gym"
    small = ["--output-dir", str(out), "--progress", "false", "--epochs", "1", "--num-envs", "2", "--rollout-steps", "10",
             "--demo-rollouts", "1", "--bc-steps", "5", "--eval-episodes", "2", "--minibatch-size", "20"]
    main(small)
    assert json.loads((out / "config.json").read_text())["history"][0]["event"] == "start"
    before = _digest(out)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(small)
    err = capsys.readouterr().err
    assert "holds a finished run (1 of 1 epochs)" in err and "--overwrite" in err and f"--resume {out}" in err
    assert _digest(out) == before
    main([*small, "--overwrite", "true"])


def test_compare_algorithms_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    from recipes.compare_algorithms import main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--output-dir", str(tmp_path / "file" / "cmp"), "--progress", "false", "--preset", "tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output_dir: "), err


@pytest.mark.parametrize("damage", ["torn", "missing", "not an object"])
def test_resume_reads_the_config_from_the_checkpoint_when_config_json_is_damaged(tmp_path, capsys, damage):
    """config.json torn or deleted (it is written atomically, so by something else): the checkpoint records
    the config, so --resume goes on with the run's own settings (not the default preset's, which would be
    refused field by field), says so, and writes config.json again with the history."""
    from recipes.ddpo_recipe import main

    out = tmp_path / "run"
    main([*TINY, "--epochs", "1", "--output-dir", str(out), "--learning-rate", "1e-3"])
    if damage == "missing":
        (out / "config.json").unlink()
    else:
        (out / "config.json").write_text('{"preset": "tiny", "epo' if damage == "torn" else "[1, 2]")
    capsys.readouterr()
    main(["--resume", str(out), "--epochs", "2", "--progress", "false"])
    err = capsys.readouterr().err
    assert f"{out / 'config.json'} is {'missing' if damage == 'missing' else 'damaged'}" in err
    config = read_json(out / "config.json")
    assert (config["preset"], config["learning_rate"], config["epochs"]) == ("tiny", 1e-3, 2)
    assert [h["event"] for h in config["history"]] == ["start", "resume"]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
