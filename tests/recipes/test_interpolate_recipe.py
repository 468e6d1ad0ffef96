"""recipes/interpolate.py on tiny runs: lambda 1 and 0.5 measured afterwards are exactly what runs
trained with them evaluated; the run directory is only read; one-line errors."""

import json
import os

import pytest

from ddpo_rl.config import parse_cli
from recipes.ddpo_recipe import run
from recipes.interpolate import main
from tests.helpers import read_jsonl

ARGS = ["--preset", "tiny", "--progress", "false", "--epochs", "2", "--eval-every", "2", "--save-every", "2",
        "--kl-coef", "0.1", "--monitor-rewards", "digit_alignment"]
KEYS = ("train_prompts_reward_mean", "eval_reward_mean", "train_prompts_reward_std", "eval_reward_std")


def _listing(d):
    return sorted((os.path.relpath(os.path.join(r, f), d), os.path.getmtime(os.path.join(r, f)), os.path.getsize(os.path.join(r, f)))
                  for r, _, fs in os.walk(d) for f in fs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    run(parse_cli([*ARGS, "--output-dir", str(root / "one")]))
    run(parse_cli([*ARGS, "--output-dir", str(root / "half"), "--reference-interpolation", "0.5"]))
    return root


def test_measured_lambdas_are_what_runs_with_them_evaluated_and_the_run_is_only_read(runs, capsys):
    before = _listing(runs / "one")
    out = runs / "measured"
    results = main([str(runs / "one"), "--lambdas", "1", "0.5", "--json", str(out / "i.json"), "--md", str(out / "i.md"),
                    "--png", str(out / "i.png")])
    assert _listing(runs / "one") == before  # nothing written, nothing touched
    (r,) = results
    one, half = read_jsonl(runs / "one" / "eval.jsonl"), read_jsonl(runs / "half" / "eval.jsonl")
    assert (r["epoch"], r["kl_coef"], r["trained_with"]) == (2, 0.1, 1.0)
    assert all(r["base"][k] == one[0][k] for k in KEYS)  # the same base evaluation
    by_lambda = {p["lambda"]: p for p in r["points"]}
    for lam, evals in ((1.0, one), (0.5, half)):
        rec = by_lambda[lam]["record"]
        assert all(rec[k] == evals[-1][k] for k in KEYS), (lam, rec, evals[-1])
        assert rec["monitors"] == evals[-1]["monitors"]
    assert by_lambda[1.0]["record"]["train_prompts_reward_mean"] != by_lambda[0.5]["record"]["train_prompts_reward_mean"]
    written = json.loads((out / "i.json").read_text())
    assert written["lambdas"] == [1.0, 0.5] and len(written["runs"][0]["points"]) == 2
    table = (out / "i.md").read_text()
    assert "| 0.1, 0, 2 | 1 |" in table and "| 0.1, 0, 2 | 0.5 |" in table and (out / "i.png").stat().st_size > 0
    said = capsys.readouterr().out
    assert "lambda 0.5: smallest gain" in said and "of 1 runs meet both criteria" in said


def test_a_run_measured_from_its_checkpoint_not_its_interpolated_final(runs):
    """The half run's final/ holds interpolated weights; measured at lambda 0.5 from its checkpoint, it
    evaluates as it did (the trained weights are what the checkpoint keeps)."""
    (r,) = main([str(runs / "half"), "--lambdas", "0.5"])
    assert r["trained_with"] == 0.5
    last = read_jsonl(runs / "half" / "eval.jsonl")[-1]
    assert all(r["points"][0]["record"][k] == last[k] for k in KEYS)


@pytest.mark.parametrize("argv, field", [
    (["--lambdas", "0"], "lambdas"),
    (["--lambdas", "1.5"], "lambdas"),
    (["--json", "{TMP}"], "json: {TMP} is a directory"),
    (["--png", "{TMP}/afile/i.png"], "png:"),
])
def test_bad_input_is_one_line_naming_the_field_before_any_evaluation(runs, argv, field, capsys, tmp_path):
    argv = [a.replace("{TMP}", str(tmp_path)) for a in argv]
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        main([str(runs / "one"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {field.replace('{TMP}', str(tmp_path))}"), err


def test_a_directory_without_a_checkpoint_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert capsys.readouterr().err.startswith(f"error: run_dirs: {tmp_path} holds no checkpoint")


def test_another_recipes_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    from ddpo_rl.checkpoint import atomic_torch_save

    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "checkpoint.pt"
    atomic_torch_save({"noise_model": {}}, str(path), kind="dppo_gym")
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: run_dirs: {path}"), err
