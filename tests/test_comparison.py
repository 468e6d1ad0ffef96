"""ddpo_rl.comparison: run planning (reuse / resume / refuse), aggregation and the markdown table."""

from __future__ import annotations

import json
import os
import statistics

import pytest

from ddpo_rl.comparison import PlannedRun, aggregate, plan_runs, run_status, to_markdown, training_curves
from ddpo_rl.config import ConfigError, parse_cli

OVR = ["--preset", "tiny", "--epochs", "3"]


def _fake_finished_run(run, final_train: float, final_eval: float, base=(-1.0, 0.1, -1.2, 0.2)):
    """Write what a finished recipe run leaves: config.json, summary.json, metrics.jsonl, final/."""
    os.makedirs(os.path.join(run.out, "final"), exist_ok=True)
    run.cfg.to_json(os.path.join(run.out, "config.json"))
    bt, bts, be, bes = base
    summary = {
        "algorithm": run.algorithm, "seed": run.seed,
        "base": {"epoch": 0, "train_prompts_reward_mean": bt, "train_prompts_reward_std": bts,
                 "eval_reward_mean": be, "eval_reward_std": bes},
        "final": {"epoch": run.cfg.epochs, "train_prompts_reward_mean": final_train, "eval_reward_mean": final_eval},
        "train_prompts_gain_in_base_std": (final_train - bt) / bts,
        "eval_prompts_gain_in_base_std": (final_eval - be) / bes,
    }
    with open(os.path.join(run.out, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(run.out, "metrics.jsonl"), "w") as f:
        for e in range(1, run.cfg.epochs + 1):
            f.write(json.dumps({"epoch": e, "reward_mean": final_train * e / run.cfg.epochs, "clip_fraction": 0.1 * e}) + "\n")


def test_plan_covers_every_algorithm_and_seed_with_equal_queries(tmp_path):
    runs = plan_runs(["ddpo_is", "ddpo_sf", "rwr"], [0, 1], OVR, str(tmp_path))
    assert [(r.algorithm, r.seed) for r in runs] == [(a, s) for a in ("ddpo_is", "ddpo_sf", "rwr") for s in (0, 1)]
    assert {r.cfg.epochs * r.cfg.samples_per_epoch for r in runs} == {3 * 4}
    assert all(r.status == "new" for r in runs)
    assert len({r.out for r in runs}) == 6
    assert runs[0].cli_args()[-6:] == ["--seed", "0", "--output-dir", runs[0].out, "--progress", "false"]


def test_status_done_resume_and_refused(tmp_path):
    cfg = parse_cli([*OVR, "--output-dir", str(tmp_path / "r")])
    assert run_status(cfg) == "new"
    os.makedirs(tmp_path / "r" / "checkpoints")
    cfg.to_json(str(tmp_path / "r" / "config.json"))
    assert run_status(cfg) == "new"  # started, never checkpointed: start again
    from ddpo_rl.comparison import PlannedRun

    assert PlannedRun("ddpo_is", 0, cfg, "new").cli_args()[-2:] == ["--overwrite", "true"]  # over its leftovers
    (tmp_path / "r" / "checkpoints" / "checkpoint.pt").write_bytes(b"x")
    assert run_status(cfg) == "resume"
    (run,) = plan_runs(["ddpo_is"], [0], [*OVR], str(tmp_path / "c"))
    _fake_finished_run(run, -0.5, -0.6)
    assert run_status(run.cfg) == "done"
    assert "--resume" not in run.cli_args()
    # the same directory planned with another setting is refused, naming the field
    with pytest.raises(ConfigError, match="learning_rate"):
        plan_runs(["ddpo_is"], [0], [*OVR, "--learning-rate", "1e-3"], str(tmp_path / "c"))
    # --progress does not count as a difference
    assert run_status(parse_cli([*OVR, "--output-dir", run.out, "--progress", "true"])) == "done"


def test_a_loss_setting_goes_to_the_runs_of_its_loss_and_one_no_run_reads_is_refused(tmp_path):
    """A single run refuses --clip-epsilon under DDPO-SF (a setting it would silently ignore); a comparison
    passes it to its DDPO-IS runs only, and refuses it when no compared algorithm reads it."""
    with pytest.raises(ConfigError, match="clip_epsilon: set, but algorithm ddpo_sf does not use it"):
        parse_cli([*OVR, "--clip-epsilon", "0.01"], algorithm="ddpo_sf")
    ovr = [*OVR, "--clip-epsilon", "0.01", "--rwr-temperature=2"]
    runs = {r.algorithm: r for r in plan_runs(["ddpo_is", "ddpo_sf", "rwr"], [0], ovr, str(tmp_path / "c"))}
    assert runs["ddpo_is"].cfg.clip_epsilon == 0.01 and runs["rwr"].cfg.rwr_temperature == 2.0
    assert "--clip-epsilon" in runs["ddpo_is"].cli_args() and "--rwr-temperature=2" not in runs["ddpo_is"].cli_args()
    assert "--clip-epsilon" not in runs["ddpo_sf"].cli_args() and "--rwr-temperature=2" not in runs["ddpo_sf"].cli_args()
    assert "--rwr-temperature=2" in runs["rwr"].cli_args() and "--clip-epsilon" not in runs["rwr"].cli_args()
    for r in runs.values():  # what each script is started with parses, and is the planned run
        assert parse_cli(r.cli_args(), algorithm=r.algorithm) == r.cfg
    with pytest.raises(ConfigError, match=r"rwr_temperature: set, but none of the compared algorithms \(ddpo_is, ddpo_sf\)"):
        plan_runs(["ddpo_is", "ddpo_sf"], [0], ovr, str(tmp_path / "d"))
    # a run stored by an older comparison that passed the setting to every run is the same run
    (sf,) = plan_runs(["ddpo_sf"], [0], OVR, str(tmp_path / "e"))
    stored = parse_cli([*OVR, "--output-dir", sf.out, "--algorithm", "ddpo_sf"])
    stored.clip_epsilon = 0.01
    _fake_finished_run(PlannedRun("ddpo_sf", 0, stored, "new"), -0.5, -0.6)
    assert run_status(sf.cfg) == "done"


@pytest.mark.parametrize("flag", ["--seed", "--algorithm", "--output-dir", "--resume"])
def test_per_run_flags_are_refused_in_overrides(tmp_path, flag):
    with pytest.raises(ConfigError, match="set per run"):
        plan_runs(["ddpo_is"], [0], [*OVR, flag, "1"], str(tmp_path))


def test_aggregate_means_stds_and_markdown(tmp_path):
    runs = plan_runs(["ddpo_is", "rwr"], [0, 1, 2], OVR, str(tmp_path))
    finals = {("ddpo_is", 0): -0.5, ("ddpo_is", 1): -0.6, ("ddpo_is", 2): -0.7, ("rwr", 0): -0.9, ("rwr", 1): -0.8, ("rwr", 2): -0.9}
    for r in runs:
        _fake_finished_run(r, finals[r.algorithm, r.seed], finals[r.algorithm, r.seed] - 0.1, base=(-1.0 - 0.01 * r.seed, 0.1, -1.2, 0.2))
    table = aggregate(runs)
    assert table["reward_queries"] == 12 and table["seeds"] == [0, 1, 2]
    is_vals = [finals["ddpo_is", s] for s in (0, 1, 2)]
    m = table["methods"]["ddpo_is"]
    assert m["train_prompts"]["mean"] == pytest.approx(statistics.fmean(is_vals))
    assert m["train_prompts"]["std"] == pytest.approx(statistics.pstdev(is_vals))
    assert m["eval_prompts"]["mean"] == pytest.approx(statistics.fmean(is_vals) - 0.1)
    assert m["train_prompts_gain_in_base_std"]["mean"] == pytest.approx((statistics.fmean(is_vals) + 1.01) / 0.1)
    assert m["per_seed"]["1"]["last_clip_fraction"] == pytest.approx(0.3)
    assert table["base"]["train_prompts"] == pytest.approx({"mean": -1.01, "std": 0.1})  # averaged over seeds
    md = to_markdown(table)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in rows[1:]] == ["base model", "ddpo_is", "rwr"]
    assert "-0.6000 ± 0.0816" in rows[2] and "12 reward queries" in md
    curves = training_curves(runs)
    assert curves["rwr"][0] == [4, 8, 12]  # reward queries, not epochs
    assert curves["rwr"][1][-1] == pytest.approx(statistics.fmean([-0.9, -0.8, -0.9]))


def _front_run(kl, seed, final_reward, final_digit, mid_digit=0.9):
    from ddpo_rl.comparison import front_row

    def ev(epoch, reward, digit):
        return {"epoch": epoch, "train_prompts_reward_mean": reward, "train_prompts_reward_std": 0.1,
                "monitors": {"digit_alignment": {"train_mean": digit, "train_std": 0.1, "eval_mean": digit, "eval_std": 0.1}}}

    evals = [ev(0, -1.0, 0.9), ev(10, -0.9, mid_digit), ev(20, final_reward, final_digit)]
    mon = {"base_mean": 0.9, "final_mean": final_digit, "final_over_base": final_digit / 0.9}
    summary = {"kl_coef": kl, "seed": seed, "final": {"epoch": 20}, "train_prompts_gain_in_base_std": (final_reward + 1.0) / 0.1,
               "eval_prompts_gain_in_base_std": 0.0,
               "monitors": {"digit_alignment": {"training prompts": mon, "held-out prompts": mon}}}
    return front_row(summary, [{"seconds": 2.0, "kl_to_reference": 0.1}] * 20, evals, tolerance=1.0)


def test_kl_front_rows_criteria_alarm_and_table():
    from ddpo_rl.comparison import front_markdown, front_table

    good = _front_run(0.1, 0, -0.7, 0.85)   # +3 base std, digits at 0.94 x base
    bad = _front_run(0.0, 0, -0.5, 0.2)     # +5 base std, digits erased
    assert good["passes"] and not bad["passes"]
    assert good["alarm_epoch"] is None and bad["alarm_epoch"] == 20 and bad["best_epoch"] == 10
    assert [p["epoch"] for p in bad["path"]] == [10, 20] and bad["path"][1]["min_monitor_ratio"] == pytest.approx(0.2 / 0.9)
    assert bad["path"][1]["monitor_ratios"] == {"digit_alignment": pytest.approx(0.2 / 0.9)}
    assert good["seconds"] == 40.0
    front = front_table([good, bad, _front_run(0.1, 1, -0.95, 0.88)])
    assert front["by_kl_coef"]["0.1"]["passing_seeds"] == 1 and front["by_kl_coef"]["0.0"]["passing_seeds"] == 0
    md = front_markdown(front, "header")
    assert md.startswith("header") and "| 0.1 | 1 |" in md and "1/2" in md


def test_kl_front_includes_the_rows_of_an_earlier_front_of_the_same_setup(tmp_path):
    """recipes/kl_front.py --include: an earlier front's rows join this one's; another setup is refused."""
    import json
    import subprocess
    import sys

    from ddpo_rl.comparison import front_table
    from tests.helpers import ROOT, subprocess_env

    from ddpo_rl.config import preset_config

    cfg = preset_config("digits")  # the setup the front's runs would have
    setup = dict(preset="digits", overrides=[], algorithm=cfg.algorithm, reward=cfg.reward,
                 monitor_tolerance=cfg.monitor_tolerance, monitors=cfg.monitor_rewards, epochs=cfg.epochs,
                 eval_num_samples=cfg.eval_num_samples, guidance_scale=cfg.guidance_scale)
    earlier = front_table([_front_run(0.1, 0, -0.7, 0.85), _front_run(0.0, 0, -0.5, 0.2)])
    earlier["setup"] = setup
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    (tmp_path / "other.json").write_text(json.dumps({**earlier, "setup": {**setup, "epochs": 10}}))

    def kl_front(*args):
        cmd = [sys.executable, f"{ROOT}/recipes/kl_front.py", "--kl-coefs", "0.1", "--seeds", "0", "1",
               "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)

    res = kl_front("--no-run", "--include", str(tmp_path / "earlier.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    front = json.loads((tmp_path / "out" / "kl_front_digits.json").read_text())
    assert [(r["kl_coef"], r["seed"]) for r in front["rows"]] == [(0.0, 0), (0.1, 0)]  # in kl_coef order
    assert front["setup"] == setup and (tmp_path / "out" / "kl_front_digits.png").exists()
    # the included (kl_coef, seed) pairs are not run again: nothing left to run here
    res = kl_front("--include", str(tmp_path / "earlier.json"), "--kl-coefs", "0", "0.1", "--seeds", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (tmp_path / "runs" / "digits" / "kl0" / "seed0").exists()
    res = kl_front("--include", str(tmp_path / "other.json"))
    assert res.returncode == 2 and res.stderr.startswith("error: include:") and len(res.stderr.splitlines()) == 1
    (tmp_path / "list.json").write_text("[1, 2]")  # JSON, but not a front
    res = kl_front("--include", str(tmp_path / "list.json"))
    assert res.returncode == 2 and res.stderr.startswith("error: include:") and "not a front's" in res.stderr


def test_kl_front_refuses_to_write_a_front_with_a_failed_run_and_labels_a_partial_one(tmp_path):
    """A run that fails: one line naming its log, exit 1, no front files. ``--no-run`` over a front
    with an unfinished run: the tables and the JSON name the missing run instead of passing as whole."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    def kl_front(*args, out="out"):
        cmd = [sys.executable, f"{ROOT}/recipes/kl_front.py", "--preset", "tiny", "--epochs", "1", "--kl-coefs", "0",
               "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / out), "--progress", "false", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)

    res = kl_front("--seeds", "0", "--reward-kwargs", '{"bogus": 1}', out="failed")
    assert res.returncode == 1
    log = tmp_path / "runs" / "tiny" / "kl0" / "seed0" / "log.txt"
    assert f"error: kl 0 seed 0 failed (exit 2); see {log}" in res.stderr and "bogus" in log.read_text()
    assert not (tmp_path / "failed").exists()

    res = kl_front("--seeds", "0")  # the failed run's directory (its log.txt alone) is started again
    assert res.returncode == 0, res.stderr[-2000:]
    whole = json.loads((tmp_path / "out" / "kl_front_tiny.json").read_text())
    assert "missing" not in whole and "PARTIAL" not in (tmp_path / "out" / "kl_front_tiny.md").read_text()

    res = kl_front("--seeds", "0", "1", "--no-run")
    assert res.returncode == 0, res.stderr[-2000:]
    partial = json.loads((tmp_path / "out" / "kl_front_tiny.json").read_text())
    assert partial["missing"] == [{"kl_coef": 0.0, "seed": 1}]
    assert [(r["kl_coef"], r["seed"]) for r in partial["rows"]] == [(0.0, 0)]
    md = (tmp_path / "out" / "kl_front_tiny.md").read_text()
    assert "PARTIAL: 1 of the 2 planned runs" in md and "kl 0 seed 1" in md


def test_kl_front_passes_a_kl_weighting_to_the_runs_with_a_kl_term_only(tmp_path):
    """--kl-sigma-scale weights the KL term: the front's kl_coef 0 run, which has none (and would refuse it),
    is planned without it; a front whose runs all have kl_coef 0 refuses it."""
    from recipes.kl_front import _plan

    runs = {cfg.kl_coef: (cfg, args) for cfg, args, _ in _plan("tiny", [0.0, 0.1], [0], ["--kl-sigma-scale", "0.2"], str(tmp_path))}
    assert runs[0.1][0].kl_sigma_scale == 0.2 and "--kl-sigma-scale" in runs[0.1][1]
    assert runs[0.0][0].kl_sigma_scale == 0.0 and "--kl-sigma-scale" not in runs[0.0][1]
    for cfg, args in runs.values():
        assert parse_cli(args) == cfg
    with pytest.raises(ConfigError, match="kl_sigma_scale: set, but kl_coef is 0"):
        _plan("tiny", [0.0], [0], ["--kl-sigma-scale", "0.2"], str(tmp_path))
    import subprocess
    import sys

    from tests.helpers import ROOT, subprocess_env

    res = subprocess.run([sys.executable, f"{ROOT}/recipes/kl_front.py", "--preset", "tiny", "--kl-coefs", "0", "0.1",
                          "--seeds", "0", "--no-run", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                          "--kl-sigma-scale", "0.2"], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
                         timeout=300)
    assert "note: --kl-sigma-scale does not go to the kl_coef 0 run(s)" in res.stdout, (res.stdout, res.stderr[-2000:])


def test_status_of_a_run_whose_summary_or_config_is_damaged(tmp_path):
    """A torn summary.json does not count as done (resuming writes it again); a torn config.json is read
    from the checkpoint's record of the config, and without one it is refused naming the file."""
    from ddpo_rl.checkpoint import atomic_torch_save

    (run,) = plan_runs(["ddpo_is"], [0], OVR, str(tmp_path / "c"))
    _fake_finished_run(run, -0.5, -0.6)
    assert run_status(run.cfg) == "done"
    (tmp_path / "c" / "ddpo_is" / "seed0" / "summary.json").write_text('{"final": {"epo')
    assert run_status(run.cfg) == "new"  # no checkpoint in this fake run: started again
    os.makedirs(os.path.join(run.out, "checkpoints"))
    atomic_torch_save({"config": run.cfg.to_dict(), "epoch": 3}, os.path.join(run.out, "checkpoints", "checkpoint.pt"))
    assert run_status(run.cfg) == "resume"
    (tmp_path / "c" / "ddpo_is" / "seed0" / "config.json").write_text('{"preset": "ti')
    assert run_status(run.cfg) == "resume"  # the checkpoint says which config the run has
    with pytest.raises(ConfigError, match="learning_rate"):
        run_status(parse_cli([*OVR, "--output-dir", run.out, "--learning-rate", "1e-3"]))
    os.remove(os.path.join(run.out, "checkpoints", "checkpoint.pt"))
    with pytest.raises(ConfigError, match=r"output_dir: .*config.json cannot be read"):
        run_status(run.cfg)
