"""The torchrl env / TensorDict machinery of the sampling loop, isolated from the network.

    python benchmarks/env_overhead.py --json env_overhead.json [--device cuda] [--batch 8 --steps 50]

The noise model is replaced by a near-free module (``x * w``), so what is timed is everything
*around* the UNet: TensorDict construction, the actor's TensorDictModule / distribution wrappers,
``env.step``'s spec processing, ``step_mdp``, the stack at the end. Compared per denoising step:

- ``torchrl_env_rollout``  env.rollout(T, policy, break_when_any_done=False)
- ``collect_trajectories`` ddpo_rl.collector (env.step loop without the per-step done check)
- ``plain_tensors``        the same policy math (DDIMGaussianHead + DDIMGaussian) on plain tensors
- ``fast_sampler``         ddpo_rl.sampling.FastSampler (static buffers; a CUDA graph on GPU)

It also counts host-sync points per batch (``Tensor.__bool__``/``item``/``tolist``/... seen by a
TorchFunctionMode): on GPU each one stops the host from queueing the next UNet call while the
current one runs. ``throughput.py`` gives the overhead as a percentage of a real sampling loop;
this script gives its absolute size, which is what to compare with a UNet step's duration.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import ddpo_rl  # noqa: E402,F401
from ddpo_rl.atomic import write_json  # noqa: E402
from ddpo_rl.errors import report_user_errors  # noqa: E402
from ddpo_rl.run_dir import prepare_output_file  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

SYNC_OPS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "nonzero"}


class NearFreeModel(torch.nn.Module):
    """Stands in for the UNet: one multiply, so the loop's machinery dominates."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, encoder_hidden_states=None):
        return x * self.w


class SyncCounter(TorchFunctionMode):
    """Counts tensor -> host conversions (each is a device sync on GPU)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> dict:
    from ddpo_rl.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="trajectories sampled in parallel")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps T")
    ap.add_argument("--latent-size", type=int, default=8, help="latent H=W")
    ap.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--repeats", type=int, default=21, help="timed rollouts of each path")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids thread-pool wake-up noise on a loaded CPU)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.json:
        prepare_output_file(args.json, "json")  # before measuring: a bad path loses nothing
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from benchmarks.throughput import Setup, make_ddpo_eager, make_plain_policy_loop, make_torchrl_rollout
    from ddpo_rl.sampling import FastSampler

    T = args.steps
    s = Setup(args, device, unet=NearFreeModel())
    sampler = FastSampler(s.env, s.policy)
    fns = {
        "torchrl_env_rollout": make_torchrl_rollout(s),
        "collect_trajectories": make_ddpo_eager(s),
        "plain_tensors": make_plain_policy_loop(s),
        "fast_sampler": sampler.sample,
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        fn(), fn()
    times = {k: [] for k in fns}
    load0 = os.getloadavg()
    for _ in range(args.repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    syncs = {}
    for k, fn in fns.items():
        with SyncCounter() as sc:
            fn()
        syncs[k] = dict(sc.counts)
    plain = statistics.median(times["plain_tensors"])
    result = {
        "schema": "ddpo_rl.benchmarks.env_overhead/1",
        "config": {**vars(args), "model": "near-free (x * w)"},
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "methods": {
            k: {
                "median_s": statistics.median(v),
                "ms_per_step": 1e3 * statistics.median(v) / T,
                "machinery_ms_per_step_vs_plain": 1e3 * (statistics.median(v) - plain) / T,
                "host_syncs_per_batch": sum(syncs[k].values()),
                "host_syncs_by_op": syncs[k],
            }
            for k, v in times.items()
        },
    }
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"Sampling-loop machinery, near-free model, batch {args.batch}, {T} steps, cfg {args.cfg}, {device}, load {result['loadavg_start']}")
        for col in ("method", "ms/step", "machinery ms/step vs plain", "host syncs/batch"):
            t.add_column(col, justify="left" if col == "method" else "right")
        for k, m in result["methods"].items():
            t.add_row(k, f"{m['ms_per_step']:.3f}", f"{m['machinery_ms_per_step_vs_plain']:+.3f}", str(m["host_syncs_per_batch"]))
        Console(stderr=True, width=140).print(t)
    except ImportError:
        print(json.dumps(result, indent=1), file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    with report_user_errors():
        main()
