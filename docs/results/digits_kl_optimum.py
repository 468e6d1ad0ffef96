"""Where the optimum of the KL-regularised objective lies on the digits model, for every coefficient.

For a reward R(x_0, c) that depends on the final image only, the policy over denoising chains that
maximises  E[R] - beta * KL(pi || pi_ref)  (the chain KL) is the reference chain re-weighted by
exp(R / beta) / Z(c); its images follow the tilted distribution

    pi*_beta(x_0 | c)  =  p_ref(x_0 | c) exp(R(x_0, c) / beta) / Z_beta(c).

So the front that KL regularisation can reach at its optimum (whatever the learning rate, the
epochs or the per-step weighting) is computed without training: draw many samples of the base
model (the reference: CFG 3, T 10, eta 1, the default run's sampler), score them with the training
reward and the monitor, and re-weight them per prompt with w_i proportional to exp(R_i / beta)
(self-normalised importance weights). For each beta this prints the tilted training-reward gain
(in the training prompts' base std, the bar's unit), the tilted mean probability of the prompted
digit over its base value (the monitor's ratio), and the effective sample size per prompt
(1 / sum w_i^2) that says how far the estimate can be trusted.

Two reward scales: ``raw`` (R in kB; the objective with the raw reward) and ``per-prompt``
(R standardised per prompt, as the recipe's per-prompt stat tracking trains on); they trace the
same front with differently spaced betas.

    python docs/results/digits_kl_optimum.py --samples 8192 --json docs/results/digits_kl_optimum.json \
        --png docs/results/digits_kl_optimum.png --front docs/results/kl_front_digits-ddim.json \
        --compare "flow-digits, CFG 3=docs/results/digits_kl_optimum_flow_cfg3.json" \
        --compare "DDIM, 3000 steps=docs/results/digits_kl_optimum_3k.json"

A second bound, wider than any tilt: the best that ANY re-weighting of the base samples can do
(``reweighting``). Every objective E[R] - D(pi || pi_ref) whose divergence grows without bound with
the density ratio pi / pi_ref (the KL at every coefficient, chi^2) and every filtering of the
reference's own samples (one round of RWR, rejection sampling, best-of-n distillation) ends at a
distribution that re-weights the reference; the largest training-reward gain such a distribution
reaches while keeping the digit probability at >= r x its base value is a linear programme over the
samples' weights (each prompt keeps its share, the weights are non-negative and, optionally, at most
K x the reference's, i.e. a density ratio <= K, KL <= log K). Solved exactly (scipy's HiGHS; both
estimates are ddpo_rl.headroom's) for r in RATIOS and K in DENSITY_BOUNDS.

(``--from-json F`` prints and plots a saved result without sampling again; ``--preset flow-digits``
and any further recipe flags after ``--``, e.g. ``-- --guidance-scale 3``, measure another model;
for a preset other than ``digits-ddim`` (the DDIM digits model, named ``digits`` when the saved results
were made) the unit is that run's own pooled training-prompt std.) The picture puts the
optimum's points (filled where every prompt's effective sample size is >= 30, rings where fewer
samples carry the estimate) beside every evaluation of the measured KL front's runs.

Analysis only: nothing here is trained. The samples are the recipe's own (its fixed-seed sampler).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: recipes/

from ddpo_rl.atomic import write_text  # noqa: E402
from ddpo_rl.config import parse_cli  # noqa: E402
from ddpo_rl.errors import report_user_errors  # noqa: E402
from ddpo_rl.headroom import reweighting_bound, tilt  # noqa: E402
from ddpo_rl.plotting import save_scatter_png  # noqa: E402
from ddpo_rl.run_dir import prepare_output_file  # noqa: E402
from recipes.ddpo_recipe import DDPORecipe  # noqa: E402
from recipes.headroom import score_base_samples  # noqa: E402

TRAIN_BASE_STD_KB = 0.0931  # the bar's unit: the training prompts' base std (README, digits section)
SEED = 12345  # not the evaluation seed: these samples are independent of the runs' evaluations
# betas, from no tilt to a sharp one: in kB for the raw reward, in per-prompt std for the standardised one
BETAS = {
    "raw": (math.inf, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.04, 0.03, 0.02),
    "per-prompt": (math.inf, 5.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3),
}
# bins of one sample's gain over its prompt's base mean, in the training prompts' base std
GAIN_BINS = (-math.inf, -1.0, 0.0, 1.0, 2.0, 3.0, math.inf)
MIN_ESS = 30  # below this many effective samples in some prompt, the tilted estimate is drawn as a ring
RATIOS = (0.8, 0.85, 0.9, 0.95)  # digit-probability ratios at which the re-weighting bound is solved
DENSITY_BOUNDS = (10.0, 100.0, 1000.0, None)  # largest density ratio pi / pi_ref allowed (None: any)
BAR = (2.0, 0.85)  # issue 11's bar: training-prompt gain (base std), smallest P(digit) ratio


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="base samples per prompt set (default 4096)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--from-json", type=Path, default=None, help="print (and plot) a saved result; no sampling")
    parser.add_argument("--png", type=Path, default=None, help="draw the optimum's front here")
    parser.add_argument("--front", type=Path, default=None, help="a kl_front JSON whose runs the picture shows too")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=JSON",
                        help="another saved result whose trusted points (ESS >= 30) the picture shows too")
    parser.add_argument("--preset", default="digits-ddim",
                        help="the recipe preset whose model is measured (default digits-ddim, the DDIM digits model)")
    parser.add_argument("recipe_args", nargs="*", help="further recipe flags, after --")
    args = parser.parse_args(argv)
    for field in ("json", "png"):  # before the sampling: a bad path loses nothing
        if getattr(args, field) is not None:
            prepare_output_file(str(getattr(args, field)), field)
    results = (json.loads(args.from_json.read_text()) if args.from_json
               else measure(args.samples, args.preset, args.recipe_args))
    report(results)
    if args.json is not None:
        write_text(args.json, json.dumps(results, indent=2) + "\n")
    if args.png is not None:
        others = {label: json.loads(Path(path).read_text()) for label, path in (c.rsplit("=", 1) for c in args.compare)}
        plot(results, args.png, args.front, others)
    return results


def measure(samples: int, preset: str = "digits-ddim", recipe_args: list[str] = ()) -> dict:
    """Draw ``samples`` base samples per prompt set, score them, and tilt them at every beta."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cli = ["--preset", preset, "--output-dir", out, "--epochs", "1", "--progress", "false", *recipe_args]
        cfg = parse_cli(cli, algorithm="ddpo_is")
        recipe = DDPORecipe(cfg).setup()
        try:  # the recipe's own reward and digit-classifier monitor on its evaluation path
            scored = score_base_samples(recipe, samples, SEED)
            data = {name: (d["reward"], d["monitors"]["digit_alignment"], d["prompt_ids"]) for name, d in scored.items()}
        finally:
            recipe.cleanup()

    train_reward = data["train"][0].double()
    unit = TRAIN_BASE_STD_KB if preset == "digits-ddim" and not recipe_args else train_reward.std().item()
    results = {"samples_per_set": samples, "preset": preset, "recipe_args": list(recipe_args),
               "unit_kb": unit, "seconds": None, "sets": {}}
    for name, (reward, prob, ids) in data.items():
        n_groups, present = int(ids.max().item()) + 1, ids.unique()
        means = torch.zeros(n_groups, dtype=torch.float64)  # per prompt id; ids absent from this set stay 0 / 1
        std = torch.ones(n_groups, dtype=torch.float64)
        for g in present:
            means[g], std[g] = reward[ids == g].double().mean(), reward[ids == g].double().std()
        base_r, base_p, _ = tilt(reward, prob, ids, math.inf, std)
        rows = {}
        for mode, scale in (("raw", torch.ones(n_groups, dtype=torch.float64)), ("per-prompt", std)):
            for beta in BETAS[mode]:
                r, p, ess = tilt(reward, prob, ids, beta, scale)
                rows.setdefault(mode, []).append({
                    "beta": beta if math.isfinite(beta) else None,
                    "gain": (r - base_r) / unit,
                    "ratio": p / base_p,
                    "min_ess": ess,
                })
        # the correlation behind the tilt: P(digit) of the base samples by how compressible they are
        gain = (reward.double() - means[ids]) / unit
        bins = []
        for lo, hi in zip(GAIN_BINS[:-1], GAIN_BINS[1:]):
            m = (gain >= lo) & (gain < hi)
            bins.append({
                "from": lo if math.isfinite(lo) else None, "to": hi if math.isfinite(hi) else None,
                "count": int(m.sum().item()),
                "ratio": (prob[m].double().mean() / base_p).item() if m.any() else None,
            })
        # the best any re-weighting of these samples can do (bounds every such regularised objective)
        bound_rows = []
        for density_bound in DENSITY_BOUNDS:
            for ratio in RATIOS:
                best = reweighting_bound(reward, prob, ids, ratio * base_p, density_bound)
                bound_rows.append({
                    "density_bound": density_bound, "ratio": ratio,
                    "gain": None if best is None else (best[0] - base_r) / unit,
                    "p_ratio": None if best is None else best[1] / base_p,
                })
        results["sets"][name] = {
            "base_reward_kb": base_r, "base_p_digit": base_p, "by_gain": bins, "reweighting": bound_rows,
            "per_prompt_std_kb": std[present].tolist(),
            "counts": torch.bincount(ids).tolist(), "tilt": rows,
        }
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def report(results: dict) -> None:
    """Print the tilts of both reward scales and the samples by gain as markdown tables."""
    for mode in ("raw", "per-prompt"):
        unit = "kB" if mode == "raw" else "per-prompt std"
        print(f"\n{mode} reward (beta in {unit})\n| beta | train: gain, ratio, min ESS | held-out: gain, ratio, min ESS |")
        print("|---|---|---|")
        for i, beta in enumerate(BETAS[mode]):
            cells = []
            for name in ("train", "eval"):
                row = results["sets"][name]["tilt"][mode][i]
                cells.append(f"{row['gain']:+.2f}, {row['ratio']:.3f}, {row['min_ess']:.0f}")
            print(f"| {'inf (base)' if math.isinf(beta) else beta} | {cells[0]} | {cells[1]} |")
    print("\n| one sample's gain over its prompt's base mean | train: samples, P(digit) ratio | held-out |\n|---|---|---|")
    for i, b in enumerate(results["sets"]["train"]["by_gain"]):
        cells = []
        for name in ("train", "eval"):
            row = results["sets"][name]["by_gain"][i]
            cells.append(f"{row['count']}, " + ("-" if row["ratio"] is None else f"{row['ratio']:.3f}"))
        print(f"| {b['from']} .. {b['to']} | {cells[0]} | {cells[1]} |")
    if "reweighting" in results["sets"]["train"]:
        print("\nlargest gain of any re-weighting of the base samples at P(digit) >= r x base "
              "(density ratio <= K)\n| K | " + " | ".join(f"r {r}: train / held-out" for r in RATIOS) + " |")
        print("|---" * (len(RATIOS) + 1) + "|")
        for density_bound in DENSITY_BOUNDS:
            cells = []
            for ratio in RATIOS:
                pair = [next(row["gain"] for row in results["sets"][name]["reweighting"]
                             if row["density_bound"] == density_bound and row["ratio"] == ratio)
                        for name in ("train", "eval")]
                cells.append(" / ".join("-" if g is None else f"{g:+.2f}" for g in pair))
            print(f"| {'any' if density_bound is None else f'{density_bound:g}'} | " + " | ".join(cells) + " |")
    print(f"\n{results['samples_per_set']} samples per prompt set, unit {results['unit_kb']:.4f} kB, "
          f"{results['seconds']} s")


def _points(results: dict, trusted: bool) -> list[tuple[float, float]]:
    """(smaller P(digit) ratio of the two prompt sets, training gain) of every tilt, trusted or not."""
    train, held_out = results["sets"]["train"]["tilt"], results["sets"]["eval"]["tilt"]
    return [(min(a["ratio"], b["ratio"]), a["gain"]) for mode in train for a, b in zip(train[mode], held_out[mode])
            if (min(a["min_ess"], b["min_ess"]) >= MIN_ESS) == trusted]


def _bound_points(results: dict, density_bound: float | None) -> list[tuple[float, float]]:
    """(r, largest training gain of a re-weighting at P(digit) >= r x base) where both sets can keep r."""
    if "reweighting" not in results["sets"]["train"]:
        return []
    rows = {name: {row["ratio"]: row for row in results["sets"][name]["reweighting"]
                   if row["density_bound"] == density_bound} for name in ("train", "eval")}
    return [(r, row["gain"]) for r, row in rows["train"].items()
            if row["gain"] is not None and rows["eval"].get(r, {}).get("gain") is not None]


def plot(results: dict, path: Path, front: Path | None, others: dict | None = None) -> None:
    """Training gain against the smaller P(digit) ratio of the two prompt sets, the bar's lines dashed."""
    groups = {"KL optimum (ESS >= 30)": _points(results, True), "KL optimum (ESS < 30)": _points(results, False)}
    colors = {"KL optimum (ESS >= 30)": 1, "KL optimum (ESS < 30)": 1, "runs, every eval": 0}
    for k, (label, other) in enumerate((others or {}).items()):
        groups[label] = _points(other, True)
        colors[label] = 2 + k
    # the best any re-weighting of the base samples can do (any density ratio; at most 100 x the reference's)
    for density_bound, label, color in ((None, "re-weighting, any", 5), (100.0, "re-weighting, <= 100x", 4)):
        points = _bound_points(results, density_bound)
        if points:
            groups[label], colors[label] = points, color
    if front is not None:
        runs = json.loads(front.read_text())["rows"]
        # the digit classifier's ratio (fronts made with more monitors also hold realism's; older ones only this)
        groups["runs, every eval"] = [(e.get("monitor_ratios", {}).get("digit_alignment", e["min_monitor_ratio"]), e["train_gain"])
                                      for r in runs for e in r["path"]]
    save_scatter_png(
        str(path), groups, title="digits: optimum of reward - beta KL and the best re-weighting of the base samples, vs the runs",
        xlabel="smallest P(digit) final/base (train & held-out)", ylabel="reward gain (base std)",
        hlines=(BAR[0],), vlines=(BAR[1],), colors=colors, size=(900, 480),
        hollow=("KL optimum (ESS < 30)", "runs, every eval"),
    )


if __name__ == "__main__":
    with report_user_errors():
        main()
