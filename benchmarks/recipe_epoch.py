"""Seconds per DDPO epoch, split into sampling and training, and peak memory, of the real recipe.

    python benchmarks/recipe_epoch.py --model sd15 --device cuda --json recipe.json   # the GPU check
    python benchmarks/recipe_epoch.py --model tiny --device cpu --samples 4 --steps 3 # a dry run
    python benchmarks/recipe_epoch.py --preset digits --compare-samplers --json cpu.json

With ``--model sd15|tiny`` it builds a Stable Diffusion pipeline with RANDOM weights from config
(``sd15``: SD-1.5's UNet (860M), VAE and CLIP ViT-L text encoder architectures; ``tiny``: the test
suite's tiny one), saves it with diffusers' ``save_pretrained`` and runs ``DDPORecipe`` on it
in-process: LoRA, CFG, ``--samples`` trajectories of ``--steps`` DDIM steps per epoch, every
timestep trained, the jpeg_compressibility reward (no reward model to load). With ``--preset``
it runs that preset as is (e.g. the digits default). Per epoch it reads metrics.jsonl's
``sampling_seconds`` and ``training_seconds``; the evaluation before the first epoch and after
the last is not in them. Peak memory: ``torch.cuda.max_memory_allocated`` over the run on CUDA,
the process's peak RSS (VmHWM) on CPU.

The paper's epoch (Black et al. 2024: 256 samples, 50 steps, CFG, LoRA, all timesteps trained;
the reference implementation takes 144 s on eight A100s) is extrapolated linearly from the last
epoch's seconds per sample, for one GPU and for eight (the same per-GPU 32 samples).

``--compare-samplers`` runs the same configuration once per sampler ("env", "graphed"), and each
``--variant FIELD JSON`` once more with that field changed; runs are interleaved over
``--repeats`` (order reversed every other repeat), and each variant's median sampling and
training seconds per epoch are reported as ratios to the first run's (> 1: slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import ddpo_rl  # noqa: E402,F401  (first: the first look at the load, torchvision shim)
from ddpo_rl.atomic import write_json  # noqa: E402
from ddpo_rl.errors import report_user_errors  # noqa: E402
from ddpo_rl.run_dir import prepare_output_file  # noqa: E402
import torch  # noqa: E402

SCHEMA = "ddpo_rl.benchmarks.recipe_epoch/1"
PAPER_EPOCH = {"samples": 256, "steps": 50, "reference_seconds": 144.0, "reference_gpus": "8x A100"}


def build_sd15_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with SD-1.5's architectures and random weights (no hub)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddpo_rl.models.tiny import sd_ddim_scheduler
    from ddpo_rl.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of a minute
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            )
        )
    sched = PNDMScheduler.from_config(sd_ddim_scheduler().config, skip_prk_steps=True)  # SD v1 ships PNDM
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_pipeline(model: str, path: str) -> float:
    """Build ``model`` ("sd15" or "tiny") with random weights and save it; returns seconds."""
    from ddpo_rl.models.tiny import build_tiny_sd_pipeline

    t = time.perf_counter()
    pipe = build_sd15_pipeline() if model == "sd15" else build_tiny_sd_pipeline()
    if model == "sd15":  # half the bytes to write and read (the loader casts the UNet back to float32)
        pipe.to(torch.float16)
    pipe.save_pretrained(path)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def recipe_config(args, model_path: str | None, output_dir: str, overrides: dict):
    from ddpo_rl.config import preset_config

    common = dict(output_dir=output_dir, progress=False, epochs=args.epochs, seed=0, **overrides)
    if args.device:
        common["device"] = args.device
    if args.preset:
        return preset_config(args.preset, **{**common, **dict(args.set or [])})
    batch = min(args.batch, args.samples)
    values = dict(
        model=model_path, use_lora=True, guidance_scale=args.cfg,
        num_inference_steps=args.steps, sample_batch_size=batch, num_batches_per_epoch=args.samples // batch,
        minibatch_size=batch, gradient_accumulation_steps=args.samples // batch, timestep_fraction=1.0,
        stat_min_count=2, eval_every=10_000, save_every=10_000, eval_num_samples=batch, grid_samples_per_prompt=1,
        mixed_precision=args.mixed_precision, reward_kwargs={"resize": 64 if args.model == "tiny" else 512},
        monitor_rewards=[],  # the SD presets' monitors load hub weights (aesthetic, BLIP)
    )
    return preset_config("sd15-compressibility", **{**values, **common, **dict(args.set or [])})


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_recipe(cfg) -> dict:
    """DDPORecipe setup/train/cleanup in-process; per-epoch seconds and peak memory."""
    from recipes.ddpo_recipe import DDPORecipe

    cuda = torch.device(cfg.device).type == "cuda" if cfg.device != "auto" else torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    recipe = DDPORecipe(cfg)
    try:
        recipe.setup()
        setup_s = time.perf_counter() - t0
        recipe.train()
        sampler = recipe._samplers.get(id(recipe.env))
        kind = type(sampler).__name__ if sampler is not None else None
        graphed = bool(getattr(sampler, "graphed", False))
        mixed_precision = recipe.mixed_precision
        device = str(recipe.device)
    finally:
        recipe.cleanup()
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return {
        "sampler": cfg.sampler,
        "sampler_class": kind,
        "device": device,
        "cuda_graph": graphed,
        "mixed_precision": mixed_precision,
        "setup_seconds": setup_s,
        "total_seconds": time.perf_counter() - t0,
        "epochs": [
            {"epoch": m["epoch"], "sampling_seconds": m["sampling_seconds"], "training_seconds": m["training_seconds"],
             "seconds": m["seconds"], "reward_mean": m["reward_mean"]}
            for m in metrics
        ],
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def extrapolate_paper_epoch(run: dict, samples_per_epoch: int, comparable: bool) -> dict:
    """The paper's 256-sample epoch from the last epoch's per-sample seconds (linear). ``comparable``: the
    run is the paper's configuration (the SD-1.5 UNet, 50 steps) on a GPU, so that the figure may be set
    beside the reference's."""
    last = run["epochs"][-1]
    per_sample = (last["sampling_seconds"] + last["training_seconds"]) / samples_per_epoch
    one = per_sample * PAPER_EPOCH["samples"]
    return {
        **PAPER_EPOCH,
        "from_epoch": last["epoch"],
        "seconds_per_sample": per_sample,
        "one_gpu_seconds": one,
        "eight_gpus_seconds_ideal": one / 8,
        "ratio_reference_to_eight_gpus": PAPER_EPOCH["reference_seconds"] / (one / 8),
        "comparable": comparable,
        "note": "linear in samples; eight GPUs = the same per-GPU share with no communication cost; "
        "meaningful only for --model sd15 with --steps 50 on a GPU",
    }


def parse_args(argv=None):
    from ddpo_rl.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--model", choices=["sd15", "tiny"], default="sd15", help="random-weight pipeline to build (ignored with --preset)")
    ap.add_argument("--preset", default=None, help="run this preset as is instead (e.g. digits)")
    ap.add_argument("--device", default=None, help="cpu, cuda, auto (default: the preset's)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each run (the first includes warm-up)")
    ap.add_argument("--samples", type=int, default=32, help="trajectories per epoch")
    ap.add_argument("--batch", type=int, default=8, help="sample and train batch")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps T")
    ap.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--mixed-precision", default="auto", help="auto, no, fp16 or bf16")
    ap.add_argument("--sampler", default="auto", help="auto, env or graphed")
    ap.add_argument("--compare-samplers", action="store_true", help="run env and graphed, report the ratio")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("FIELD", "JSON"), help="one more run with this field changed")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant (interleaved)")
    ap.add_argument("--set", nargs=2, action="append", metavar=("FIELD", "JSON"), help="another config field")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the recipe's)")
    ap.add_argument("--workdir", default=None, help="where the pipeline and run outputs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    args.set = [(k, json.loads(v)) for k, v in (args.set or [])]
    args.variant = [(k, json.loads(v)) for k, v in (args.variant or [])]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.json:
        prepare_output_file(args.json, "json")  # before measuring: a bad path loses nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        model_path, build_s = None, None
        if not args.preset:
            model_path = os.path.join(work, f"{args.model}-random")
            build_s = save_pipeline(args.model, model_path)
        variants = [("sampler=env", {"sampler": "env"}), ("sampler=graphed", {"sampler": "graphed"})] if args.compare_samplers \
            else [(f"sampler={args.sampler}", {"sampler": args.sampler})]
        variants += [(f"{k}={json.dumps(v)}", {"sampler": args.sampler, k: v}) for k, v in args.variant]
        runs = {label: [] for label, _ in variants}
        load = [os.getloadavg()[0]]
        for r in range(args.repeats):
            for i, (label, overrides) in enumerate(variants if r % 2 == 0 else variants[::-1]):
                cfg = recipe_config(args, model_path, os.path.join(work, f"run-{r}-{i}"), overrides)
                runs[label].append(run_recipe(cfg))
                load.append(os.getloadavg()[0])
        samples = cfg.samples_per_epoch
    result = {
        "schema": SCHEMA,
        "config": {
            "model": args.preset or args.model, "epochs": args.epochs, "samples_per_epoch": samples,
            "steps": cfg.num_inference_steps, "cfg": cfg.guidance_scale, "lora": cfg.use_lora,
            "mixed_precision": cfg.mixed_precision, "device": cfg.device, "set": dict(args.set), "repeats": args.repeats,
        },
        "machine": {
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_1min": load, "torch": torch.__version__,
        },
        "pipeline_build_and_save_seconds": build_s,
        "runs": runs,
    }
    main_run = runs[variants[0][0]][0]
    result["per_epoch"] = main_run["epochs"]
    result["peak_gpu_memory_bytes"] = main_run["peak_gpu_memory_bytes"]
    comparable = (result["config"]["model"] == "sd15" and cfg.num_inference_steps == PAPER_EPOCH["steps"]
                  and torch.device(main_run["device"]).type == "cuda")
    result["paper_epoch"] = extrapolate_paper_epoch(main_run, samples, comparable)
    if len(variants) > 1:
        med = {
            label: {part: statistics.median(e[f"{part}_seconds"] for run in rs for e in run["epochs"]) for part in ("sampling", "training")}
            for label, rs in runs.items()
        }
        base = variants[0][0]
        result["comparison"] = {
            "base": base,
            "median_seconds_per_epoch": med,
            "ratio_to_base": {label: {part: m[part] / med[base][part] for part in m} for label, m in med.items()},
        }
    print(summary_lines(result))
    if args.json:
        write_json(args.json, result)
    return result


def summary_lines(r: dict) -> str:
    lines = [f"recipe epochs: {r['config']['model']}, {r['config']['samples_per_epoch']} samples x {r['config']['steps']} steps, "
             f"cfg {r['config']['cfg']}, LoRA {r['config']['lora']}, on {r['machine']['device_name']}"]
    for s, runs in r["runs"].items():
        for run in runs:
            eps = ", ".join(f"epoch {e['epoch']}: {e['sampling_seconds']:.2f} s sampling + {e['training_seconds']:.2f} s training"
                            for e in run["epochs"])
            mem = run["peak_gpu_memory_bytes"]
            lines.append(f"  sampler {s} ({run['sampler_class']}, graph {run['cuda_graph']}, {run['mixed_precision']}): {eps}"
                         + (f"; peak GPU memory {mem / 2**30:.2f} GiB" if mem else ""))
    pe = r["paper_epoch"]
    if pe.get("comparable", True):
        lines.append(f"  paper epoch (256 samples) extrapolated: {pe['one_gpu_seconds']:.1f} s on one GPU, "
                     f"{pe['eight_gpus_seconds_ideal']:.1f} s on eight (reference: 144 s on 8x A100)")
    else:
        lines.append(f"  256 samples of this configuration, extrapolated: {pe['one_gpu_seconds']:.1f} s on one "
                     f"{r['machine']['device_name']}, {pe['eight_gpus_seconds_ideal']:.1f} s on eight; not the paper's "
                     "epoch (that is --model sd15 --steps 50 on a GPU, to set beside the reference's 144 s on 8x A100)")
    for label, ratio in (r.get("comparison") or {}).get("ratio_to_base", {}).items():
        lines.append(f"  {label}: sampling x{ratio['sampling']:.3f}, training x{ratio['training']:.3f} the time of {r['comparison']['base']}")
    return "\n".join(lines)


if __name__ == "__main__":
    with report_user_errors():
        main()
