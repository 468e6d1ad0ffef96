"""The end-of-run report: summary.json written by write_summary, read back as the lines a run prints."""

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

from ddpo_rl.reporting import format_summary, write_summary


@dataclass
class _Eval:  # the recipe's EvalResult, without the recipe
    epoch: int
    train_mean: float
    train_std: float
    eval_mean: float
    eval_std: float
    n: int = 128
    monitors: dict = field(default_factory=dict)

    def as_dict(self):
        return dict(epoch=self.epoch, train_prompts_reward_mean=self.train_mean, train_prompts_reward_std=self.train_std,
                    eval_reward_mean=self.eval_mean, eval_reward_std=self.eval_std, num_samples=self.n,
                    monitors=self.monitors)


def _monitor(train_mean, eval_mean, std=0.1):
    return {"acc": dict(train_mean=train_mean, train_std=std, eval_mean=eval_mean, eval_std=std)}


def _weights(run_dir, name, epoch):  # what save_trained_weights leaves beside the weights
    (run_dir / name).mkdir()
    (run_dir / name / "ddpo_rl.json").write_text(json.dumps({"epoch": epoch}))


def _cfg(**kw):
    return SimpleNamespace(algorithm="ddpo_is", reward="jpeg_compressibility", model="digits", seed=0, kl_coef=0.0,
                           epochs=kw.pop("epochs", 3), monitor_tolerance=kw.pop("monitor_tolerance", 1.0), **kw)


def test_the_report_reads_the_summary_and_marks_a_monitor_beyond_tolerance(tmp_path):
    history = [_Eval(0, -1.0, 0.1, -2.0, 0.5, monitors=_monitor(0.9, 0.8)),
               _Eval(1, -0.9, 0.1, -1.5, 0.5, monitors=_monitor(0.85, 0.8)),   # within tolerance: the best
               _Eval(3, -0.7, 0.1, -1.0, 0.5, monitors=_monitor(0.6, 0.79))]   # acc on the training prompts -3 std
    _weights(tmp_path, "best", 1)
    summary = write_summary(str(tmp_path), history, _cfg(), epochs_trained=3)
    lines = format_summary(summary, str(tmp_path))
    text = "\n".join(lines)
    assert lines[0].startswith(f"finished 3 of 3 epochs; run directory {tmp_path}")
    assert "training prompts -1 -> -0.7 (+3.00 base std), held-out -2 -> -1 (+2.00 base std)" in lines[1]
    assert lines[2] == ("monitor acc: training 0.9 -> 0.6 (0.67 x, -3.00 base std, beyond tolerance), "
                        "held-out 0.8 -> 0.79 (0.99 x, -0.10 base std)")
    assert "over-optimisation: monitor acc on the training prompts" in text and "epoch 3" in text
    assert lines[-1].startswith("weights: best/ epoch 1 (+1.00 base std")  # no final/ written in this test
    assert "final/" not in lines[-1]


def test_the_report_of_a_stopped_run_and_of_one_without_monitors(tmp_path):
    history = [_Eval(0, -1.0, 0.1, -2.0, 0.5), _Eval(1, -1.1, 0.1, -2.0, 0.5)]
    _weights(tmp_path, "final", 1)
    _weights(tmp_path, "best", 2)  # not the best evaluation (0): e.g. a run of an older ddpo_rl, killed and resumed
    summary = write_summary(str(tmp_path), history, _cfg(epochs=5), epochs_trained=1, interrupted=True)
    lines = format_summary(summary, str(tmp_path))
    assert lines[0].startswith("stopped after 1 of 5 epochs (interrupted)")
    assert "(base -> epoch 1)" in lines[1] and "(-1.00 base std)" in lines[1]
    assert not any(line.startswith("monitor ") for line in lines)
    assert "over-optimisation alarm: none (tolerance 1 base std)" in lines
    assert (summary["final_weights_epoch"], summary["best_weights_epoch"], summary["best_epoch"]) == (1, 2, 0)
    assert lines[-1] == ("weights: final/ epoch 1; best/ epoch 2, not the best evaluation (epoch 0), "
                         "whose weights no longer exist")


def test_a_monitor_with_nothing_to_measure_and_a_run_without_evaluations(tmp_path):
    none = {"acc": dict(train_mean=None, train_std=None, eval_mean=0.5, eval_std=0.1)}
    history = [_Eval(0, -1.0, 0.1, -2.0, 0.5, monitors=none), _Eval(2, -1.0, 0.1, -2.0, 0.5, monitors=none)]
    lines = format_summary(write_summary(str(tmp_path), history, _cfg()), str(tmp_path))
    assert "training n/a -> n/a (n/a x, n/a base std)" in lines[2]
    assert format_summary(write_summary(str(tmp_path / "x"), [], _cfg()), "d") == [
        "finished 3 of 3 epochs; run directory d (summary.json, reward_curve.png, before_after.png, samples/)"]


def test_format_or_na_says_n_a_for_no_value_and_formats_the_rest():
    from ddpo_rl.reporting import format_or_na

    assert format_or_na(None) == "n/a" and format_or_na(float("nan"), ".1f") == "n/a"
    assert format_or_na(-1.2345, ".1f") == "-1.2" and format_or_na(float("inf"), ".1f") == "inf" and format_or_na(3) == "3"
