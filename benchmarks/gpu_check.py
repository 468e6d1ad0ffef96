"""The GPU check: GPU tests, sampling/training throughput, and two recipe epochs, in one command.

    python benchmarks/gpu_check.py OUT_DIR [--dry-run]

(``benchmarks/gpu_check.sh`` installs the carried wheels first, then runs this.) Steps, each in
its own process with a time limit, so one failure does not lose the others' figures:

1. ``pytest -m gpu``: the CUDA-graph sampler against the eager loop and the env path, etc.
2. ``benchmarks/throughput.py``: SD-1.5 UNet architecture (random weights), batch 8, 50 steps,
   CFG 7.5, bf16: the collection methods, the trainer vs a bare loop, the env overhead.
3. ``benchmarks/recipe_epoch.py``: 2 epochs of the DDPO-IS recipe on an SD-1.5-architecture
   pipeline with random weights built from config and saved with diffusers (LoRA, CFG 7.5,
   32 samples per epoch, T = 50): seconds per epoch split into sampling and training, peak GPU
   memory, the paper's epoch extrapolated.

Writes ``OUT_DIR/gpu_check.json`` (every step's status, seconds and JSON; the targets at the top
level: see benchmarks/README.md, "Targets") and ``OUT_DIR/summary.txt``, plus each step's log
and JSON. ``--dry-run`` runs the same steps on CPU with tiny sizes (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "ddpo_rl.benchmarks.gpu_check/1"


def steps(out: str, dry: bool) -> list[dict]:
    py = sys.executable
    if dry:
        tput = ["--model", "tiny", "--device", "cpu", "--batch", "2", "--steps", "3", "--cfg", "7.5",
                "--warmup", "0", "--repeats", "1", "--threads", "1"]
        recipe = ["--model", "tiny", "--device", "cpu", "--samples", "4", "--batch", "2", "--steps", "3", "--threads", "1"]
    else:
        tput = ["--model", "sd15", "--device", "cuda", "--batch", "8", "--steps", "50", "--cfg", "7.5", "--dtype", "bf16",
                "--warmup", "1", "--repeats", "3", "--train-repeats", "2"]
        recipe = ["--model", "sd15", "--device", "cuda", "--samples", "32", "--batch", "8", "--steps", "50"]
    pytest_args = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/"]
    if dry:  # on CPU the gpu tests skip; collect one file to stay fast
        pytest_args[-1] = "tests/test_sampling.py"
    return [
        {"name": "gpu_tests", "cmd": [py, "-m", "pytest", *pytest_args], "timeout": 120, "json": None},
        {"name": "throughput", "cmd": [py, "benchmarks/throughput.py", *tput, "--json", os.path.join(out, "throughput.json")],
         "timeout": 200 if not dry else 120, "json": os.path.join(out, "throughput.json")},
        {"name": "recipe_epochs", "cmd": [py, "benchmarks/recipe_epoch.py", *recipe, "--epochs", "2", "--json",
                                          os.path.join(out, "recipe_epoch.json")],
         "timeout": 220 if not dry else 120, "json": os.path.join(out, "recipe_epoch.json")},
    ]


def run_step(step: dict, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1")
    log_path = os.path.join(out, f"{step['name']}.log")
    t = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(step["cmd"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=step["timeout"]).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"returncode": rc, "ok": rc == 0, "seconds": time.perf_counter() - t, "log": os.path.basename(log_path),
              "command": " ".join(step["cmd"][1:])}
    if step["json"] and os.path.exists(step["json"]):
        with open(step["json"]) as f:
            result["result"] = json.load(f)
    with open(log_path) as f:
        tail = f.read().strip().splitlines()
    result["last_line"] = " ".join(tail[-1].split()) if tail else ""
    return result


def targets(report: dict) -> dict:
    """The issue's targets, each with the JSON field that answers it (null when a step failed)."""
    tput = report["steps"]["throughput"].get("result") or {}
    rec = report["steps"]["recipe_epochs"].get("result") or {}
    tg = tput.get("targets", {})
    out = {key: tg.get(key) for key in ("collection_vs_baseline", "collection_vs_pipeline", "env_overhead_pct", "trainer_overhead_pct")}
    out["targets_apply"] = tg.get("applies")
    pe = rec.get("paper_epoch") or {}
    out["paper_epoch_seconds"] = {
        "one_gpu": pe.get("one_gpu_seconds"), "eight_gpus_ideal": pe.get("eight_gpus_seconds_ideal"),
        "reference_eight_a100": pe.get("reference_seconds"), "comparable": pe.get("comparable"),
    }
    out["recipe_per_epoch"] = rec.get("per_epoch")
    out["recipe_peak_gpu_memory_bytes"] = rec.get("peak_gpu_memory_bytes")
    return out


def summary_text(report: dict) -> str:
    lines = [f"gpu_check ({'DRY RUN, CPU, tiny sizes' if report['dry_run'] else 'GPU'}): {report['device']}, "
             f"torch {report['torch']}, {report['total_seconds']:.0f} s"]
    for name, st in report["steps"].items():
        lines.append(f"- {name}: {'ok' if st['ok'] else 'FAILED (' + str(st['returncode']) + ')'} in {st['seconds']:.0f} s; {st['last_line'][:160]}")
    t = report["targets"]
    for key in ("collection_vs_baseline", "collection_vs_pipeline", "env_overhead_pct", "trainer_overhead_pct"):
        v = t.get(key)
        if v:
            m = v["measured"]
            lines.append(f"  {key}: {m:.3f} (target {v['target']}: {'met' if v['met'] else 'NOT met'})" if m is not None
                         else f"  {key}: not measured")
    if t.get("recipe_per_epoch"):
        for e in t["recipe_per_epoch"]:
            lines.append(f"  recipe epoch {e['epoch']}: sampling {e['sampling_seconds']:.2f} s, training {e['training_seconds']:.2f} s")
    mem = t.get("recipe_peak_gpu_memory_bytes")
    lines.append(f"  recipe peak GPU memory: {mem / 2**30:.2f} GiB" if mem else "  recipe peak GPU memory: n/a")
    pe = t.get("paper_epoch_seconds") or {}
    if pe.get("one_gpu") is not None and pe.get("comparable") is False:
        lines.append("  paper epoch: not extrapolated here (a run of the paper's configuration on a GPU only)")
    elif pe.get("one_gpu") is not None:
        lines.append(f"  paper epoch extrapolated: {pe['one_gpu']:.1f} s on one GPU, {pe['eight_gpus_ideal']:.1f} s on eight "
                     f"(reference {pe['reference_eight_a100']:.0f} s on 8x A100)")
    if not t.get("targets_apply"):
        lines.append("  (targets apply only to the GPU run: SD-1.5 UNet, batch 8, 50 steps, CFG)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU with tiny sizes")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        raise SystemExit(2)
    t0 = time.perf_counter()
    report = {
        "schema": SCHEMA,
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu",
        "torch": torch.__version__,
        "steps": {},
    }
    for step in steps(out, args.dry_run):
        print(f"gpu_check: {step['name']} ...", flush=True)
        report["steps"][step["name"]] = run_step(step, out)
        print(f"gpu_check: {step['name']}: {'ok' if report['steps'][step['name']]['ok'] else 'FAILED'}", flush=True)
    report["total_seconds"] = time.perf_counter() - t0
    report["targets"] = targets(report)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = summary_text(report)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    if not all(st["ok"] for st in report["steps"].values()):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
