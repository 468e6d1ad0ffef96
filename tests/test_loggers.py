"""The run's records mirrored into torchrl's loggers (ddpo_rl.loggers)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from ddpo_rl.loggers import LOGGERS, RunLogger, check_logger, make_logger, make_run_logger
from tests.helpers import read_jsonl


def _write_run(out, records, evals=(), images=()):
    os.makedirs(out / "samples", exist_ok=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(out / "eval.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in evals)
    for name in images:
        Image.fromarray(np.full((6, 10, 3), 200, dtype=np.uint8)).save(out / name)


def _csv_scalars(out) -> dict[str, list[tuple[int, float]]]:
    root = out / "logs" / out.name / "scalars"
    result = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            tag = os.path.relpath(os.path.join(dirpath, name), root)[: -len(".csv")]
            with open(os.path.join(dirpath, name)) as f:
                result[tag] = [(int(step), float(v)) for step, v in csv.reader(f)]
    return result


def test_csv_logger_mirrors_new_lines_once(tmp_path):
    out = tmp_path / "run"
    _write_run(out, [{"epoch": 1, "reward_mean": 0.5, "kl_approx": None, "flag": True}], [{"epoch": 0, "eval_reward_mean": 2.0}])
    run_logger = make_run_logger("csv", str(out))
    run_logger.sync()
    _write_run(out, [{"epoch": 2, "reward_mean": 0.75, "kl_approx": 0.1}])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "reward_me')  # a line still being written: logged once complete
    run_logger.sync()
    scalars = _csv_scalars(out)
    assert scalars["metrics/reward_mean"] == [(1, 0.5), (2, 0.75)]
    assert scalars["metrics/kl_approx"] == [(2, 0.1)]  # None values are not logged
    assert scalars["eval/eval_reward_mean"] == [(0, 2.0)]
    assert "metrics/flag" not in scalars
    with open(out / "metrics.jsonl", "a") as f:
        f.write('an": 1.0}\n')
    run_logger.close()
    assert _csv_scalars(out)["metrics/reward_mean"] == [(1, 0.5), (2, 0.75), (3, 1.0)]


def test_resumed_run_skips_what_the_earlier_process_logged(tmp_path):
    out = tmp_path / "run"
    _write_run(out, [{"epoch": 1, "reward_mean": 1.0}, {"epoch": 2, "reward_mean": 2.0}], images=["samples/epoch_0002.png"])
    run_logger = make_run_logger("csv", str(out), start_epoch=2)
    _write_run(out, [{"epoch": 3, "reward_mean": 3.0}])
    run_logger.close()
    assert _csv_scalars(out)["metrics/reward_mean"] == [(3, 3.0)]


def test_a_resume_after_epoch_0_skips_epoch_0_and_a_fresh_run_logs_it(tmp_path):
    """Records that count from epoch 0 (dppo_gym's; DDPO's base evaluation): start_epoch 0 means the earlier
    process logged epoch 0; None, a fresh run, logs it."""
    for start, expected in ((0, [(1, 1.0)]), (None, [(0, 0.5), (1, 1.0)]), (-1, [(0, 0.5), (1, 1.0)])):
        out = tmp_path / f"run{start}"
        _write_run(out, [{"epoch": 0, "reward_mean": 0.5}])
        run_logger = make_run_logger("csv", str(out), start_epoch=start)
        _write_run(out, [{"epoch": 1, "reward_mean": 1.0}])
        run_logger.close()
        assert _csv_scalars(out)["metrics/reward_mean"] == expected, start


def test_tensorboard_logger_takes_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _write_run(out, [{"epoch": 1, "reward_mean": 0.5}, {"epoch": 2, "reward_mean": 0.25}],
               images=["samples/epoch_0000.png", "samples/epoch_0002.png"])
    run_logger = make_run_logger("tensorboard", str(out))
    run_logger.sync()
    _write_run(out, [], images=["reward_curve.png"])
    run_logger.close()
    events = EventAccumulator(str(out / "logs" / "run"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("metrics/reward_mean")] == [(1, 0.5), (2, 0.25)]
    assert [e.step for e in events.Images("samples")] == [0, 2]
    assert [(e.step, e.width, e.height) for e in events.Images("reward_curve")] == [(2, 10, 6)]


def test_tensorboard_of_a_resumed_run_shows_the_redone_epochs_not_the_lost_ones(tmp_path):
    """An attempt logged epochs 1-3 and was killed after its checkpoint of epoch 2; the resumed run
    redoes epoch 3 (to another value) and goes on: TensorBoard shows one value per step, the
    resumed run's (its writer purges the earlier events past the checkpoint)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _write_run(out, [{"epoch": e, "reward_mean": float(e)} for e in (1, 2, 3)])
    first = make_run_logger("tensorboard", str(out))
    first.close()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "reward_mean": float(e)}) + "\n" for e in (1, 2)))
    resumed = make_run_logger("tensorboard", str(out), start_epoch=2)
    _write_run(out, [{"epoch": 3, "reward_mean": 30.0}, {"epoch": 4, "reward_mean": 40.0}])
    resumed.close()
    events = EventAccumulator(str(out / "logs" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("metrics/reward_mean")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_csv_of_a_resumed_run_shows_the_redone_epochs_not_the_lost_ones(tmp_path):
    out = tmp_path / "run"
    _write_run(out, [{"epoch": e, "reward_mean": float(e)} for e in (1, 2, 3)])
    make_run_logger("csv", str(out)).close()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "reward_mean": float(e)}) + "\n" for e in (1, 2)))
    with open(out / "logs" / "run" / "scalars" / "metrics" / "reward_mean.csv", "a") as f:
        f.write("1")  # the kill struck while a row (of step 1x) was being written
    resumed = make_run_logger("csv", str(out), start_epoch=2)
    _write_run(out, [{"epoch": 3, "reward_mean": 30.0}, {"epoch": 4, "reward_mean": 40.0}])
    resumed.close()
    assert _csv_scalars(out)["metrics/reward_mean"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_recipe_run_with_tensorboard_logs_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddpo_rl.config import preset_config
    from recipes.ddpo_recipe import run

    out = tmp_path / "tb_run"
    run(preset_config("tiny", epochs=2, output_dir=str(out), progress=False, logger="tensorboard"))
    events = EventAccumulator(str(out / "logs" / "tb_run"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    metrics = read_jsonl(out / "metrics.jsonl")
    logged = 0
    for key in metrics[0]:
        values = [(m["epoch"], m[key]) for m in metrics if isinstance(m[key], float)]
        if key == "epoch" or not values:
            continue
        got = [(e.step, e.value) for e in events.Scalars(f"metrics/{key}")]
        assert got == [(step, pytest.approx(v, rel=1e-6)) for step, v in values], key
        logged += 1
    assert logged >= 10
    evals = read_jsonl(out / "eval.jsonl")
    assert [e.step for e in events.Scalars("eval/eval_reward_mean")] == [e["epoch"] for e in evals]
    assert [e.step for e in events.Images("samples")] == [e["epoch"] for e in evals]
    assert "reward_curve" in events.Tags()["images"]


@pytest.mark.parametrize("kind, module, kwargs", [("wandb", "wandb", {"offline": True}), ("mlflow", "mlflow", {})])
def test_optional_loggers_construct_offline(kind, module, kwargs, tmp_path, monkeypatch):
    pytest.importorskip(module)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    _write_run(out, [{"epoch": 1, "reward_mean": 0.5}], images=["reward_curve.png"])
    run_logger = make_run_logger(kind, str(out), kwargs, hparams={"seed": 0, "reward_kwargs": {"resize": 32}})
    assert isinstance(run_logger, RunLogger)
    run_logger.close()


def test_logger_choice_is_checked():
    assert make_logger("none", "unused") is None
    assert "tensorboard" in LOGGERS
    with pytest.raises(ValueError, match="^logger: "):
        make_logger("neptune", "unused")
    with pytest.raises(ValueError, match="^logger_kwargs: "):
        make_logger("csv", "unused", {"project": "x"})


def test_a_tracker_whose_package_is_missing_is_named_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    import ddpo_rl.loggers as loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match="^logger: 'tensorboard' needs the tensorboard package.*pip install tensorboard"):
        check_logger("tensorboard")
    with pytest.raises(ValueError, match="^logger: 'tensorboard' needs"):
        make_logger("tensorboard", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    check_logger("csv")  # needs nothing but torchrl
    check_logger("none", {"ignored": 1})
