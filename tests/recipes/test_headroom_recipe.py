"""recipes/headroom.py on the tiny model: the base row, the bound's order in K, the bound above the
tilt, the JSON, and one-line errors."""

import json

import pytest
from PIL import Image

from recipes.headroom import DENSITY_BOUNDS, RATIOS, SETS, main

ARGS = ["--preset", "tiny", "--monitor-rewards", "digit_alignment,digit_realism", "--samples", "20"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("headroom")
    returned = main([*ARGS, "--json", str(out / "h.json"), "--png", str(out / "front.png")])
    written = json.loads((out / "h.json").read_text())
    return returned, written, out


def test_json_holds_every_monitor_and_both_prompt_sets(results):
    returned, written, out = results
    assert written["preset"] == "tiny" and written["samples_per_set"] == 20
    assert sorted(written["monitors"]) == ["digit_alignment", "digit_realism"]
    assert written["unit"] == pytest.approx(returned["unit"]) and written["unit"] > 0
    for result in written["monitors"].values():
        assert len(result["tilt"]) == 9 and len(result["bound"]) == len(DENSITY_BOUNDS) * len(RATIOS)
        for row in result["tilt"] + result["bound"]:
            assert set(SETS) <= set(row)
    for monitor in written["monitors"]:  # one picture per monitor
        with Image.open(out / f"front_{monitor}.png") as image:
            assert image.size == (900, 480)


def test_base_row_is_no_change_and_sharper_tilts_gain_more(results):
    for result in results[0]["monitors"].values():
        base = result["tilt"][0]
        assert base["beta"] is None
        for s in SETS:
            assert base[s]["gain"] == pytest.approx(0.0, abs=1e-12) and base[s]["ratio"] == pytest.approx(1.0)
            gains = [row[s]["gain"] for row in result["tilt"]]
            assert all(a <= b + 1e-9 for a, b in zip(gains, gains[1:]))  # betas are listed from flat to sharp
            assert gains[-1] > 0


def test_bound_grows_with_k_and_lies_above_every_tilt_that_keeps_the_monitor(results):
    for result in results[0]["monitors"].values():
        for s in SETS:
            for r in RATIOS:
                column = [next(b[s] for b in result["bound"] if b["density_bound"] == k and b["ratio"] == r)
                          for k in DENSITY_BOUNDS]
                assert all(v is not None for v in column)  # the base weights keep any r <= 1
                assert all(a <= b + 1e-9 for a, b in zip(column, column[1:]))
                # a tilt is one re-weighting: where it keeps r x the monitor, any-density bound >= its gain
                for row in result["tilt"]:
                    if row[s]["ratio"] >= r:
                        assert column[-1] >= row[s]["gain"] - 1e-9


@pytest.mark.parametrize(
    "args, field",
    [
        (["--preset", "tiny", "--samples", "8"], "monitor_rewards"),  # the tiny preset has none
        ([*ARGS[:4], "--samples", "1"], "samples"),
        ([*ARGS[:2], "--monitor-rewards", "nope", "--samples", "8"], "monitor_rewards"),
        # outputs it could not write are refused before the sampling (they used to fail after it)
        ([*ARGS, "--json", "{TMP}"], "json: {TMP} is a directory"),
        ([*ARGS, "--png", "{TMP}/afile/front.png"], "png:"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(args, field, capsys, tmp_path):
    args = [a.replace("{TMP}", str(tmp_path)) for a in args]
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    field = field.replace("{TMP}", str(tmp_path))
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {field}"), err


def test_batches_sampled_one_at_a_time_for_the_progress_bar_are_the_same_samples(tmp_path):
    """headroom.py samples batch by batch to show progress; the trajectories equal one call's."""
    import torch

    from ddpo_rl.collector import terminal_rewards
    from ddpo_rl.config import parse_cli
    from ddpo_rl.keys import KEYS
    from recipes.ddpo_recipe import DDPORecipe

    recipe = DDPORecipe(parse_cli(["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--progress", "false"]))
    try:
        recipe.setup()
        env = recipe.eval_envs["train"]
        whole = recipe._fixed_seed_rollout(env, 3, 7)
        calls = []
        chunked = recipe._fixed_seed_rollout(env, 3, 7, advance=lambda: calls.append(1))
    finally:
        recipe.cleanup()
    assert len(calls) == 3 and chunked.shape == whole.shape
    assert torch.equal(chunked[KEYS.action], whole[KEYS.action])
    assert torch.equal(terminal_rewards(chunked), terminal_rewards(whole))
