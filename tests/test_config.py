import json

import pytest

from ddpo_rl.config import PRESETS, ConfigError, DDPOConfig, cli_help, parse_cli, preset_config, unused_fields


def test_defaults_are_the_digits_preset_and_valid():
    cfg = parse_cli([])
    assert cfg.preset == "digits" and cfg.model == "digits-flow"
    assert (cfg.group_size, cfg.kl_coef, cfg.guidance_scale, cfg.epochs) == (4, 0.03, 3.0, 48)
    assert cfg.samples_per_epoch == cfg.sample_batch_size * cfg.num_batches_per_epoch
    assert PRESETS["digits"] == {} and preset_config("digits") == DDPOConfig()


def test_other_presets_state_what_the_digits_preset_sets_for_its_own_model():
    """The digits preset's model, groups, learning rate, KL, tolerance and cadence are chosen for the
    digits-flow model: another preset that inherited them would run a setting measured for another model
    (the SD 3.5 presets ran with the digits preset's KL 0.1, where Flow-GRPO's compressibility run has 0)."""
    own = ("model", "group_size", "learning_rate", "kl_coef", "reference_interpolation", "monitor_tolerance", "epochs",
           "eval_every", "save_every")
    for name, values in PRESETS.items():
        if name != "digits":
            assert set(own) <= set(values), (name, sorted(set(own) - set(values)))
    assert preset_config("sd35-compressibility").kl_coef == 0.0 and preset_config("sd15-compressibility").kl_coef == 0.0
    ddim = preset_config("digits-ddim")  # the DDIM run the README's front measured
    assert (ddim.model, ddim.group_size, ddim.learning_rate, ddim.kl_coef, ddim.epochs) == ("digits", None, 3e-4, 0.1, 30)


def test_every_preset_validates():
    for name in PRESETS:
        preset_config(name).validate()


def test_cli_sets_any_field_with_types():
    cfg = parse_cli(
        ["--preset", "tiny", "--epochs", "7", "--seed=3", "--output-dir", "x", "--learning-rate", "1e-3",
         "--use-lora", "true", "--reward-kwargs", '{"resize": 32}', "--revision", "none"]
    )
    assert (cfg.preset, cfg.epochs, cfg.seed, cfg.output_dir) == ("tiny", 7, 3, "x")
    assert cfg.learning_rate == 1e-3 and cfg.use_lora is True
    assert cfg.reward_kwargs == {"resize": 32} and cfg.revision is None


def test_recipe_default_algorithm_is_overridable():
    assert parse_cli([], algorithm="rwr").algorithm == "rwr"
    assert parse_cli(["--algorithm", "ddpo_sf"], algorithm="rwr").algorithm == "ddpo_sf"


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--preset", "digitz"], "preset"),
        (["--learning-rat", "1"], "learning_rat"),
        (["--epochs", "0"], "epochs"),
        (["--epochs", "ten"], "epochs"),
        (["--sample-batch-size", "-1"], "sample_batch_size"),
        (["--eta", "0"], "eta"),
        (["--eta", "1.5"], "eta"),
        (["--seed", "-1"], "seed"),
        (["--max-grad-norm", "-1"], "max_grad_norm"),
        (["--adam-beta1", "1.5"], "adam_beta1"),
        (["--adam-beta2", "1"], "adam_beta2"),
        (["--adam-epsilon", "-1"], "adam_epsilon"),
        (["--adam-weight-decay", "-0.1"], "adam_weight_decay"),
        (["--rwr-temperature", "0"], "rwr_temperature"),
        (["--rwr-quantile", "1"], "rwr_quantile"),
        (["--stat-min-count", "100", "--stat-buffer-size", "10"], "stat_min_count"),
        (["--lora-rank", "8"], "lora_rank"),  # without --use-lora true: full fine-tuning, silently
        (["--lora-alpha", "8", "--use-lora", "false"], "lora_alpha"),
        (["--minibatch-size", "5"], "minibatch_size"),
        (["--algorithm", "ppo"], "algorithm"),
        (["--use-lora", "maybe"], "use_lora"),
        (["--epochs"], "epochs"),
        (["--group-size", "5"], "group_size"),  # does not divide sample_batch_size=32
        (["--group-size", "-2"], "group_size"),
        (["--noise-level", "0"], "noise_level"),
        (["--prompt-cache-size", "0"], "prompt_cache_size"),
    ],
)
def test_bad_input_names_the_field(argv, field):
    with pytest.raises(ConfigError) as err:
        parse_cli(argv)
    assert str(err.value).startswith(field)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv, field, why",
    [
        (["--rwr-temperature", "2"], "rwr_temperature", "algorithm ddpo_is does not use it"),
        (["--rwr-mode", "sparse", "--algorithm", "ddpo_sf"], "rwr_mode", "algorithm ddpo_sf does not use it"),
        (["--clip-epsilon", "0.01", "--algorithm", "rwr"], "clip_epsilon", "algorithm rwr does not use it"),
        (["--kl-coef", "0", "--kl-sigma-scale", "0.2"], "kl_sigma_scale", "kl_coef is 0"),
        (["--per-prompt-stat-tracking", "false", "--stat-buffer-size", "8"], "stat_buffer_size", "per_prompt_stat_tracking is false"),
        (["--group-size", "4", "--stat-min-count", "4"], "stat_min_count", "group_size 4"),
        (["--monitor-rewards", "", "--monitor-tolerance", "2"], "monitor_tolerance", "monitor_rewards is empty"),
        (["--preset", "digits-ddim", "--noise-level", "0.5"], "noise_level", "model 'digits' samples with DDIM"),
        (["--eta", "0.5"], "eta", "model 'digits-flow' is a flow-matching model"),
        (["--model", "digits", "--noise-level", "0.5"], "noise_level", "model 'digits' samples with DDIM"),
        (["--preset", "tiny", "--sde-window-size", "2"], "sde_window_size", "model 'tiny' samples with DDIM"),
        (["--preset", "flow-digits", "--eta", "0.5"], "eta", "model 'flow-digits' is a flow-matching model"),
    ],
)
def test_a_setting_the_run_would_not_read_is_refused(argv, field, why):
    """Given on the command line, a field the run would silently ignore is one line naming it and why."""
    with pytest.raises(ConfigError) as err:
        parse_cli(argv)
    assert str(err.value).startswith(f"{field}: set, but {why}") and "\n" not in str(err.value)
    i = argv.index(f"--{field.replace('_', '-')}")
    assert field in unused_fields(parse_cli(argv[:i] + argv[i + 2 :]))  # the same run without it: unused there


def test_settings_the_run_reads_and_preset_defaults_are_not_refused():
    """The same fields where they take effect, and presets that merely hold them (RWR's defaults under
    DDPO-IS, the digits preset's stat buffer), pass."""
    assert parse_cli(["--rwr-temperature", "2", "--algorithm", "rwr"]).rwr_temperature == 2.0
    assert parse_cli(["--kl-coef", "0.1", "--kl-sigma-scale", "0.2"]).kl_sigma_scale == 0.2
    assert parse_cli(["--preset", "digits-ddim", "--stat-buffer-size", "64"]).stat_buffer_size == 64
    assert parse_cli(["--group-size", "0", "--stat-buffer-size", "64"]).stat_buffer_size == 64
    assert parse_cli(["--monitor-tolerance", "2"]).monitor_tolerance == 2.0
    assert parse_cli(["--preset", "flow-digits", "--noise-level", "0.5"]).noise_level == 0.5
    assert parse_cli(["--noise-level", "0.5"]).noise_level == 0.5  # the digits-flow model's SDE
    assert parse_cli(["--preset", "digits-ddim", "--eta", "0.5"]).eta == 0.5
    # Stable Diffusion and SD3 by hub id, as the loader decides their kind (nothing is loaded)
    assert parse_cli(["--preset", "sd15-aesthetic", "--eta", "0.5"]).eta == 0.5
    assert parse_cli(["--preset", "sd35-aesthetic", "--noise-level", "0.5"]).noise_level == 0.5
    with pytest.raises(ConfigError, match="noise_level: set, but model 'runwayml/stable-diffusion-v1-5' samples with DDIM"):
        parse_cli(["--preset", "sd15-aesthetic", "--model", "runwayml/stable-diffusion-v1-5", "--noise-level", "0.5"])
    with pytest.raises(ConfigError, match="eta: set, but model .* is a flow-matching model"):
        parse_cli(["--preset", "sd35-aesthetic", "--eta", "0.5"])
    for preset in PRESETS:
        parse_cli(["--preset", preset])
    assert "clip_epsilon" not in unused_fields(parse_cli([])) and "rwr_temperature" in unused_fields(parse_cli([]))


def test_unknown_field_suggests_close_names():
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_cli(["--learning-rat", "1"])


def test_json_round_trip(tmp_path):
    cfg = preset_config("sd15-aesthetic")
    cfg.to_json(tmp_path / "c.json")
    assert DDPOConfig.from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg


def test_sd15_presets_follow_the_paper():
    cfg = preset_config("sd15-compressibility")
    assert cfg.samples_per_epoch == 256
    assert cfg.samples_per_epoch // (cfg.minibatch_size * cfg.gradient_accumulation_steps) == 4
    assert (cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.clip_epsilon, cfg.adv_clip_max) == (50, 1.0, 5.0, 1e-4, 5.0)
    assert cfg.use_lora and cfg.learning_rate == 3e-4 and (cfg.stat_buffer_size, cfg.stat_min_count) == (16, 16)


def test_help_lists_every_field_with_its_docstring():
    text = cli_help()
    assert "--learning-rate" in text and "AdamW learning rate" in text
    assert text.count("\n  --") == len(DDPOConfig.__dataclass_fields__)


def test_sf_with_several_inner_epochs_is_refused():
    with pytest.raises(ConfigError, match="num_inner_epochs: DDPO-SF is on-policy"):
        parse_cli(["--num-inner-epochs", "2"], algorithm="ddpo_sf")
    assert parse_cli(["--num-inner-epochs", "2"], algorithm="ddpo_is").num_inner_epochs == 2


def test_defaults_that_belong_to_a_field_follow_it():
    # the digits preset's JPEG resize belongs to its reward: switching the reward drops it
    cfg = parse_cli(["--reward", "alignment"])
    assert cfg.reward_kwargs == {} and cfg.monitor_rewards == ["sample_diversity", "digit_realism"]
    assert parse_cli(["--reward", "jpeg_incompressibility"]).reward_kwargs == {"resize": 32}
    assert parse_cli(["--reward", "jpeg_incompressibility"]).monitor_rewards == ["digit_alignment", "digit_realism"]
    assert parse_cli(["--preset", "digits-alignment", "--reward", "compressibility"]).reward_kwargs == {"resize": 32}
    # the model too: SD-sized JPEG, SD monitors; the tiny plumbing model has none
    sd = preset_config("digits", model="/some/sd/pipeline")
    assert sd.monitor_rewards == ["aesthetic"] and sd.reward_kwargs == {"resize": 512}
    assert preset_config("sd15-aesthetic", reward="jpeg_compressibility").monitor_rewards == ["aesthetic"]
    assert preset_config("sd15-compressibility", reward="aesthetic").monitor_rewards == ["vlm_alignment"]
    assert preset_config("digits", model="tiny").monitor_rewards == []
    # monitor kwargs belong to the monitors
    cfg = preset_config("digits", monitor_reward_kwargs={"digit_alignment": {"C": 1.0}})
    assert cfg.monitor_reward_kwargs == {"digit_alignment": {"C": 1.0}}
    # values given explicitly are kept as given (the reward checks them when the run is set up)
    cfg = parse_cli(["--reward", "alignment", "--reward-kwargs", '{"C": 1.0}', "--monitor-rewards", "digit_alignment"])
    assert cfg.reward_kwargs == {"C": 1.0} and cfg.monitor_rewards == ["digit_alignment"]
    # an unchanged reward keeps the preset's values
    assert parse_cli(["--reward", "jpeg_compressibility"]).reward_kwargs == {"resize": 32}


def test_monitor_fields_from_the_command_line():
    assert parse_cli(["--monitor-rewards", "digit_alignment,sample_diversity"]).monitor_rewards == [
        "digit_alignment", "sample_diversity"]
    assert parse_cli(["--monitor-rewards", '["sample_diversity"]']).monitor_rewards == ["sample_diversity"]
    assert parse_cli(["--monitor-rewards", ""]).monitor_rewards == []
    cfg = parse_cli(["--kl-coef", "0.5", "--monitor-tolerance", "1", "--stop-on-monitor-drop", "true"])
    assert (cfg.kl_coef, cfg.monitor_tolerance, cfg.stop_on_monitor_drop) == (0.5, 1.0, True)


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--kl-coef", "-1"], "kl_coef"),
        (["--kl-sigma-scale", "-0.1"], "kl_sigma_scale"),
        (["--reference-interpolation", "0"], "reference_interpolation"),
        (["--reference-interpolation", "1.2"], "reference_interpolation"),
        (["--threads", "-1"], "threads"),
        (["--monitor-tolerance", "0"], "monitor_tolerance"),
        (["--monitor-rewards", "", "--stop-on-monitor-drop", "true"], "stop_on_monitor_drop"),
        (["--monitor-reward-kwargs", '{"aesthetic": {}}'], "monitor_reward_kwargs"),
        (["--monitor-rewards", "digit_alignment,digit_alignment"], "monitor_rewards"),
    ],
)
def test_bad_kl_and_monitor_settings_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        parse_cli(argv)


def _float_fields():
    import dataclasses
    import typing

    hints = typing.get_type_hints(DDPOConfig)
    return [f.name for f in dataclasses.fields(DDPOConfig) if "float" in str(hints[f.name])]


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_every_float_field_refuses_non_finite_values(bad):
    names = _float_fields()
    assert "learning_rate" in names and len(names) >= 10
    for name in names:
        with pytest.raises(ConfigError, match=f"^{name}: must be a finite number"):
            parse_cli(["--" + name, bad])


def test_tilde_is_expanded_in_path_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_cli(["--output-dir", "~/runs/x", "--prompts", "~/p.txt"])
    assert cfg.output_dir == str(tmp_path / "runs" / "x") and cfg.prompts == str(tmp_path / "p.txt")


def test_resume_writes_into_the_resumed_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for resume in (run, run / "checkpoints", run / "checkpoints" / "checkpoint.pt"):
        assert parse_cli(["--preset", "tiny", "--resume", str(resume)]).output_dir == str(run)
    assert parse_cli(["--preset", "tiny", "--resume", str(run), "--output-dir", str(run)]).output_dir == str(run)
    with pytest.raises(ConfigError, match="^output_dir: --resume continues the run in its own directory"):
        parse_cli(["--preset", "tiny", "--resume", str(run), "--output-dir", str(tmp_path / "other")])


def test_changeable_on_resume_names_real_fields():
    import dataclasses

    from ddpo_rl.config import CHANGEABLE_ON_RESUME

    names = {f.name for f in dataclasses.fields(DDPOConfig)}
    assert CHANGEABLE_ON_RESUME <= names
    for fixed in ("algorithm", "model", "use_lora", "lora_rank", "seed", "reward", "prompts", "sample_batch_size"):
        assert fixed not in CHANGEABLE_ON_RESUME


def test_resume_starts_from_the_runs_config_and_applies_only_what_the_command_sets(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stored = parse_cli(["--preset", "tiny", "--seed", "3", "--epochs", "2", "--output-dir", "/old/place"]).to_dict()
    (run / "config.json").write_text(json.dumps({**stored, "history": [{"event": "start", "epoch": 0}]}))
    cfg = parse_cli(["--resume", str(run), "--epochs", "5"], algorithm="ddpo_is")
    assert (cfg.preset, cfg.model, cfg.seed, cfg.epochs, cfg.output_dir) == ("tiny", "tiny", 3, 5, str(run))
    assert parse_cli(["--resume", str(run)], algorithm="rwr").algorithm == "rwr"  # the script's choice: checked on resume
    assert parse_cli(["--resume", str(run), "--preset", "digits"]).preset == "digits"
    with pytest.raises(ConfigError, match="^output_dir: --resume continues"):  # even the preset's default path
        parse_cli(["--resume", str(run), "--output-dir", "outputs/tiny"])


def test_flow_grpo_presets_registered_and_the_script_default_preset():
    from ddpo_rl.config import FLOW_PRESETS

    assert "flow-digits" in PRESETS and set(FLOW_PRESETS) <= set(PRESETS)
    cfg = parse_cli([], preset="flow-digits")  # recipes/flow_grpo.py's default
    assert cfg.preset == "flow-digits" and cfg.model == "flow-digits" and (cfg.group_size or 1) > 1
    assert cfg.reward == "jpeg_compressibility" and cfg.monitor_rewards == ["digit_alignment", "digit_realism"]
    assert parse_cli(["--preset", "digits"], preset="flow-digits").model == "digits-flow"  # --preset wins
    assert preset_config("sd35-compressibility").monitor_rewards == ["aesthetic"]


@pytest.mark.parametrize("argv, field", [
    (["--sde-window-size", "11"], "sde_window_size"),
    (["--sde-window-size", "4", "--sde-window-start", "7"], "sde_window_start"),
    (["--sde-window-start", "-1"], "sde_window_start"),
])
def test_sde_window_bad_values_are_named(argv, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        parse_cli(argv, preset="flow-digits")


def test_a_stored_config_without_a_field_added_since_reads_as_its_run_had_it():
    """reference_interpolation did not exist before: a run without it evaluated the trained weights (1),
    whatever DDPOConfig's default is now; a checkpoint's config lacking it is no change on resume."""
    from ddpo_rl.config import ADDED_FIELDS, stored_defaults, with_added_fields
    from ddpo_rl.run_dir import resume_changes

    assert ADDED_FIELDS["reference_interpolation"] == 1.0 != DDPOConfig().reference_interpolation
    assert with_added_fields({"seed": 3})["reference_interpolation"] == 1.0
    assert with_added_fields({"reference_interpolation": 0.5})["reference_interpolation"] == 0.5
    old = {k: v for k, v in DDPOConfig(reference_interpolation=1.0).to_dict().items() if k != "reference_interpolation"}
    assert resume_changes(old, DDPOConfig(reference_interpolation=1.0).to_dict(), (), stored_defaults()) == {}
    with pytest.raises(ConfigError, match="^reference_interpolation: cannot change on resume"):
        resume_changes(old, DDPOConfig().to_dict(), (), stored_defaults())
