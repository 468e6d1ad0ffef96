"""The Stable Diffusion path of the recipe, end to end on CPU, on a tiny pipeline saved to disk.

The pipeline is built in code (random weights), written with ``save_pretrained`` and passed as
``--model <dir>``: the recipe loads it with the same code that loads runwayml/stable-diffusion-v1-5.
Each run is one DDPO-IS epoch of an sd15 preset with its sizes scaled down (4 steps, 2 x 2 samples,
minibatch 2 x accumulation 2), LoRA on, guidance 5.
"""

from __future__ import annotations

import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import json
import math

import pytest
import torch

from ddpo_rl.config import parse_cli
from recipes.ddpo_recipe import DDPORecipe, main, run
from ddpo_rl.rewards.jpeg import JpegCompressibility
from tests.helpers import TRAIN_FIELDS, read_jsonl
from tests.rewards.test_aesthetic import _random_published_state_dict, _tiny_clip
from tests.rewards.test_alignment import model_dirs  # noqa: F401  (fixture: tiny BLIP + tiny BERT on disk)


#: image shapes seen by RecordingJpeg (the recipe builds the reward by "module:factory" name)
SEEN_SHAPES: list[tuple[int, ...]] = []


class RecordingJpeg(JpegCompressibility):
    """The jpeg_compressibility reward, recording the shape of every image batch it scores."""

    def __call__(self, images, prompts=None):
        SEEN_SHAPES.append(tuple(images.shape))
        return super().__call__(images, prompts)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from tests.helpers import build_tiny_sd_pipeline_dir

    return build_tiny_sd_pipeline_dir(tmp_path_factory.mktemp("sd") / "tiny-sd-pipeline")


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "train.txt").write_text("a cat riding a bike\na dog playing chess\n")
    (root / "eval.txt").write_text("a horse washing dishes\n")
    return str(root / "train.txt"), str(root / "eval.txt")


def sd_args(pipeline_dir, out, *extra):
    """The sd15-compressibility preset with its sizes scaled down, on the tiny pipeline, without monitors."""
    return [
        "--preset", "sd15-compressibility", "--model", pipeline_dir, "--device", "cpu",
        "--use-lora", "true", "--guidance-scale", "5", "--mixed-precision", "no",
        "--epochs", "1", "--num-inference-steps", "4", "--sample-batch-size", "2", "--num-batches-per-epoch", "2",
        "--minibatch-size", "2", "--gradient-accumulation-steps", "2", "--stat-min-count", "2",
        "--eval-num-samples", "2", "--grid-samples-per-prompt", "1", "--output-dir", str(out), "--progress", "false",
        "--monitor-rewards", "",  # the preset's monitors (aesthetic, BLIP) need hub weights; tests/test_monitors.py covers them
        *extra,
    ]


def assert_finite_metrics(out):
    (m,) = read_jsonl(out / "metrics.jsonl")
    for k in TRAIN_FIELDS:
        assert m[k] is not None and math.isfinite(m[k]), (k, m[k])
    assert m["skipped_steps"] == 0 and m["num_samples"] == 4
    return m


def run_recipe(cfg, after_setup=None) -> DDPORecipe:
    """What recipes.ddpo_recipe.run does (setup, train, cleanup), keeping the recipe to inspect its model."""
    recipe = DDPORecipe(cfg)
    try:
        recipe.setup()
        recipe.before = {n: p.detach().clone() for n, p in recipe.policy.noise_model.named_parameters()}
        if after_setup is not None:
            after_setup(recipe)
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def test_one_lora_epoch_on_a_saved_pipeline(pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ddpo_rl.lora import get_lora_state_dict

    out = tmp_path / "run"
    SEEN_SHAPES.clear()
    # another reward drops the preset's JPEG kwargs (they follow the reward), so they are given here
    cfg = parse_cli(sd_args(pipeline_dir, out, "--reward", "tests.recipes.test_sd_pipeline:RecordingJpeg",
                            "--reward-kwargs", '{"resize": 512}'))
    assert (cfg.num_inference_steps, cfg.guidance_scale, cfg.eta, cfg.clip_epsilon) == (4, 5.0, 1.0, 1e-4)
    assert cfg.reward_kwargs == {"resize": 512}
    recipe = run_recipe(cfg)

    # only the LoRA parameters changed, and they did change
    unet = recipe.policy.noise_model
    after = dict(unet.named_parameters())
    lora = [n for n in after if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert all(not p.requires_grad for n, p in after.items() if n not in lora)
    changed = {n for n, p in after.items() if not torch.equal(p, recipe.before[n])}
    assert changed and changed <= set(lora), sorted(changed - set(lora))[:3]

    m = assert_finite_metrics(out)
    assert m["reward_mean"] < 0  # minus the JPEG size in kB

    # every image the reward saw was decoded by the VAE at the pipeline's resolution
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert SEEN_SHAPES and {s[1:] for s in SEEN_SHAPES} == {(3, side, side)}
    assert sum(s[0] for s in SEEN_SHAPES) >= 4  # training batches (and the evaluations)

    # final/ holds diffusers-format LoRA weights that StableDiffusionPipeline loads
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    pipe.load_lora_weights(str(out / "final"))
    (adapter,) = pipe.unet.peft_config
    loaded, trained = get_lora_state_dict(pipe.unet, adapter), get_lora_state_dict(unet)
    assert loaded.keys() == trained.keys() and len(loaded) == len(lora)
    for k in trained:
        torch.testing.assert_close(loaded[k], trained[k])
    image = pipe(
        "a cat", num_inference_steps=2, guidance_scale=5.0, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 3, side, side) and torch.isfinite(image).all()


def test_kl_to_the_lora_free_unet_and_a_monitor_through_the_recipe(pipeline_dir, tmp_path):
    """LoRA + kl_coef: the reference is the same UNet with its adapters off (no copy); KL logged; monitor in eval.jsonl."""
    out = tmp_path / "kl"
    cfg = parse_cli(sd_args(pipeline_dir, out, "--kl-coef", "0.5", "--monitor-rewards", "sample_diversity",
                            "--eval-num-samples", "4"))
    recipe = run_recipe(cfg)
    assert recipe.loss.reference == "adapters" and recipe.loss.reference_head is None
    (m,) = read_jsonl(out / "metrics.jsonl")
    assert m["kl_to_reference"] is not None and m["kl_to_reference"] >= 0 and m["loss_kl"] >= 0
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["epoch"] for e in evals] == [0, 1] and "sample_diversity" in evals[-1]["monitors"]
    assert (out / "best" / "pytorch_lora_weights.safetensors").is_file()


def test_bf16_autocast_epoch_keeps_lora_weights_fp32(pipeline_dir, tmp_path):
    out = tmp_path / "bf16"
    dtypes = []  # UNet output dtypes: bf16 under autocast, in sampling and training alike

    def record(module, args, output):
        dtypes.append((torch.is_grad_enabled(), output.sample.dtype))

    recipe = run_recipe(
        parse_cli(sd_args(pipeline_dir, out, "--mixed-precision", "bf16")),
        after_setup=lambda r: r.policy.noise_model.register_forward_hook(record),
    )
    assert {d for _, d in dtypes} == {torch.bfloat16} and {g for g, _ in dtypes} == {False, True}, set(dtypes)
    params = dict(recipe.policy.noise_model.named_parameters())
    lora = [p for n, p in params.items() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert any(not torch.equal(p, recipe.before[n]) for n, p in params.items() if "lora_" in n)
    assert recipe.trainer.grad_scaler is None  # only fp16 scales the loss
    assert_finite_metrics(out)


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    weights = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_random_published_state_dict(), weights)
    _tiny_clip().save_pretrained(root / "clip")
    return str(weights), str(root / "clip")


def test_aesthetic_reward_from_files_through_the_recipe(pipeline_dir, prompt_files, aesthetic_files, tmp_path):
    weights, clip_dir = aesthetic_files
    out = tmp_path / "aesthetic"
    kwargs = json.dumps({"weights": weights, "clip_model": clip_dir, "device": "cpu", "dtype": "float32"})
    run(parse_cli(sd_args(
        pipeline_dir, out, "--preset", "sd15-aesthetic", "--reward-kwargs", kwargs,
        "--prompts", prompt_files[0], "--eval-prompts", prompt_files[1],
    )))
    m = assert_finite_metrics(out)
    assert m["reward_std"] > 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_missing_aesthetic_weights_is_a_one_line_error(pipeline_dir, aesthetic_files, tmp_path, capsys):
    kwargs = json.dumps({"weights": str(tmp_path / "nowhere.pth"), "clip_model": aesthetic_files[1]})
    with pytest.raises(SystemExit) as exc:
        main(sd_args(pipeline_dir, tmp_path / "x", "--reward", "aesthetic", "--reward-kwargs", kwargs))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: reward: 'aesthetic' failed to load:"), err
    assert "aesthetic predictor weights not found" in err[0] and "nowhere.pth" in err[0]
    assert "goes in --reward-kwargs" in err[0]


def test_vlm_alignment_reward_async_through_the_recipe(pipeline_dir, prompt_files, model_dirs, tmp_path):  # noqa: F811
    blip, bert = model_dirs
    out = tmp_path / "alignment"
    kwargs = json.dumps({
        "captioner": blip, "similarity": "bertscore", "similarity_model": bert, "device": "cpu",
        "captioner_kwargs": {"max_new_tokens": 4},
    })
    cfg = parse_cli(sd_args(
        pipeline_dir, out, "--preset", "sd15-alignment", "--reward-kwargs", kwargs,
        "--prompts", prompt_files[0], "--eval-prompts", prompt_files[1],
    ))
    assert cfg.reward == "vlm_alignment" and cfg.reward_async
    recipe = run_recipe(cfg)
    assert type(recipe.reward_fn).__name__ == "AsyncReward" and recipe.env.transform.asynchronous
    m = assert_finite_metrics(out)
    assert 0 <= m["reward_mean"] <= 1 + 1e-5  # BERTScore recall of a caption against the prompt
