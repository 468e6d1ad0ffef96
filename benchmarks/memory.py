"""Resident memory of a long in-process training run, measured after every epoch.

    python benchmarks/memory.py --model tiny --epochs 20 --json mem.json
    python benchmarks/memory.py --preset digits --epochs 20 --json mem.json   # needs the digits model

Runs :class:`recipes.ddpo_recipe.DDPORecipe` in this process (evaluation and checkpoints at their
usual cadence) and reads VmRSS from /proc/self/status after each epoch (psutil if
/proc is missing). Prints and writes (``--json``) the per-epoch RSS, the start/end/peak and
the growth per epoch fitted over the second half of the run (the first epochs include
one-off allocations: optimizer state, allocator warm-up).
Any other ``--FIELD VALUE`` is passed to the recipe config (e.g. ``--use-lora true``).
"""

from __future__ import annotations

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)
from ddpo_rl.atomic import write_json
from ddpo_rl.errors import report_user_errors
from ddpo_rl.run_dir import prepare_output_file

import argparse
import gc
import os
import platform
import sys
import tempfile
import time


def rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import psutil  # not a dependency: only where /proc is missing

    return psutil.Process().memory_info().rss / 2**20


def slope(xs, ys) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main(argv=None) -> dict:
    from ddpo_rl.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--preset", default="tiny", help="the preset to run")
    ap.add_argument("--model", default=None, help="override the preset's model (e.g. tiny)")
    ap.add_argument("--epochs", type=int, default=20, help="epochs of the run")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--output-dir", default=None, help="run outputs (default: a temporary directory)")
    args, rest = ap.parse_known_args(argv)
    if args.json:
        prepare_output_file(args.json, "json")  # before the run: a bad path loses nothing

    from ddpo_rl.config import parse_cli

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
    from recipes.ddpo_recipe import DDPORecipe

    out = args.output_dir or tempfile.mkdtemp(prefix="ddpo_mem_")
    cli = ["--preset", args.preset, "--epochs", str(args.epochs), "--output-dir", out, "--progress", "false", *rest]
    if args.model:
        cli += ["--model", args.model]
    cfg = parse_cli(cli)

    samples = [("start", rss_mib())]
    recipe = DDPORecipe(cfg).setup()
    samples.append(("after_setup", rss_mib()))
    per_epoch: list[dict] = []
    t_start = time.perf_counter()

    # one RSS reading per epoch, right after its policy update (the trainer call is a per-epoch
    # hook that needs no change to the recipe); epoch k's evaluation and checkpoint are in the
    # reading of epoch k + 1
    train = recipe.trainer.train

    def train_and_measure(batch):
        result = train(batch)
        del batch
        gc.collect()
        per_epoch.append({"epoch": len(per_epoch) + 1, "rss_mib": rss_mib(), "seconds": time.perf_counter() - t_start})
        return result

    recipe.trainer.train = train_and_measure
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    gc.collect()
    samples.append(("end", rss_mib()))

    rss = [e["rss_mib"] for e in per_epoch]
    half = per_epoch[len(per_epoch) // 2 :]
    report = {
        "command": " ".join([os.path.basename(sys.executable), "benchmarks/memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {platform.system()} {os.cpu_count()} cpus, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "torch": __import__("torch").__version__,
        "config": {k: getattr(cfg, k) for k in ("preset", "model", "epochs", "use_lora", "sample_batch_size",
                                                  "num_batches_per_epoch", "num_inference_steps", "eval_every", "save_every")},
        "rss_mib": dict(samples),
        "first_epoch_rss_mib": rss[0],
        "last_epoch_rss_mib": rss[-1],
        "peak_rss_mib": max(rss),
        "growth_first_to_last_mib": rss[-1] - rss[0],
        "growth_per_epoch_second_half_mib": slope([e["epoch"] for e in half], [e["rss_mib"] for e in half]),
        "per_epoch": per_epoch,
    }
    print(f"rss after setup {samples[1][1]:.1f} MiB; epoch 1 {rss[0]:.1f}, epoch {len(rss)} {rss[-1]:.1f}, "
          f"peak {max(rss):.1f} MiB; growth {rss[-1] - rss[0]:+.1f} MiB "
          f"({report['growth_per_epoch_second_half_mib']:+.2f} MiB/epoch over the second half)")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    with report_user_errors():
        main()
