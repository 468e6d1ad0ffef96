import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import subprocess
import sys
import textwrap

import pytest
import torch

from ddpo_rl.rewards import registry
from ddpo_rl.rewards.registry import available_rewards, make_reward, register_lazy_reward, register_reward


@pytest.fixture
def clean_registry(monkeypatch):
    """Let a test register names without leaking them into the others."""
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    monkeypatch.setattr(registry, "_LAZY_MODULES", dict(registry._LAZY_MODULES))


@pytest.mark.parametrize(
    "name, cls_name, sign",
    [
        ("jpeg_compressibility", "JpegCompressibility", -1),
        ("compressibility", "JpegCompressibility", -1),
        ("jpeg_incompressibility", "JpegIncompressibility", 1),
        ("incompressibility", "JpegIncompressibility", 1),
        ("JPEG-Compressibility", "JpegCompressibility", -1),
    ],
)
def test_jpeg_names(name, cls_name, sign):
    r = make_reward(name, resize=32)
    assert type(r).__name__ == cls_name
    assert r.resize == (32, 32)
    out = r(torch.rand(3, 3, 8, 8), [""] * 3)
    assert out.shape == (3,) and (torch.sign(out) == sign).all()


@pytest.mark.parametrize("name", ["digit_alignment", "alignment"])
def test_alignment_names(name):
    r = make_reward(name)
    assert type(r).__name__ == "DigitAlignment"
    assert r(torch.rand(2, 3, 8, 8), ["a handwritten digit 1", "a handwritten digit 2"]).shape == (2,)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        make_reward("no_such_reward")
    msg = str(e.value)
    for n in ("jpeg_compressibility", "jpeg_incompressibility", "digit_alignment", "compressibility", "alignment"):
        assert n in msg
    with pytest.raises(ValueError):
        make_reward("")


def test_available_rewards_without_importing():
    names = available_rewards()
    assert {"jpeg_compressibility", "jpeg_incompressibility", "digit_alignment"} <= set(names)
    assert {"compressibility", "incompressibility", "alignment"} <= set(names)


def test_registry_does_not_import_reward_modules():
    code = textwrap.dedent(
        """
        import sys
        import ddpo_rl
        from ddpo_rl.rewards.registry import available_rewards, make_reward
        available_rewards()
        assert "ddpo_rl.rewards.jpeg" not in sys.modules
        assert "ddpo_rl.rewards.digits" not in sys.modules
        make_reward("compressibility")
        assert "ddpo_rl.rewards.jpeg" in sys.modules
        assert "ddpo_rl.rewards.digits" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_decorator(clean_registry):
    @register_reward("constant_test", "const_alias")
    class Constant:
        def __init__(self, value=1.0):
            self.value = value

        def __call__(self, images, prompts):
            return torch.full((images.shape[0],), self.value)

    r = make_reward("const_alias", value=2.5)
    assert isinstance(r, Constant)
    torch.testing.assert_close(r(torch.rand(2, 3, 4, 4), ["", ""]), torch.full((2,), 2.5))
    assert "constant_test" in available_rewards() and "const_alias" in available_rewards()

    with pytest.raises(ValueError, match="already registered"):

        @register_reward("constant_test")
        def other(**kw):
            return None

    with pytest.raises(ValueError, match="already points"):

        @register_reward("another_test", "const_alias")
        def another(**kw):
            return None


def test_lazy_registration_by_module(clean_registry, tmp_path, monkeypatch):
    (tmp_path / "my_lazy_reward_mod.py").write_text(
        textwrap.dedent(
            """
            import torch
            from ddpo_rl.rewards.registry import register_reward

            @register_reward("my_lazy_reward")
            def make(scale=1.0):
                return lambda images, prompts: scale * images.mean(dim=(1, 2, 3))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    register_lazy_reward("my_lazy_reward_mod", "my_lazy_reward")
    assert "my_lazy_reward_mod" not in sys.modules
    fn = make_reward("my_lazy_reward", scale=2.0)
    assert "my_lazy_reward_mod" in sys.modules
    x = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(fn(x, [""] * 3), 2 * x.mean(dim=(1, 2, 3)))
    monkeypatch.delitem(sys.modules, "my_lazy_reward_mod")

    # a lazily declared module that forgets to register is reported clearly
    (tmp_path / "my_broken_reward_mod.py").write_text("x = 1\n")
    register_lazy_reward("my_broken_reward_mod", "broken_reward")
    with pytest.raises(ValueError, match="did not register"):
        make_reward("broken_reward")
    monkeypatch.delitem(sys.modules, "my_broken_reward_mod")


def test_module_colon_factory_syntax():
    r = make_reward("ddpo_rl.rewards.jpeg:JpegIncompressibility", resize=16)
    assert type(r).__name__ == "JpegIncompressibility" and r.resize == (16, 16)
    with pytest.raises(ValueError, match="cannot import"):
        make_reward("ddpo_rl.rewards.jpeg:Nope")


@pytest.mark.parametrize(
    "name, factory",
    [
        ("aesthetic", "make_aesthetic_reward"),
        ("laion_aesthetic", "make_aesthetic_reward"),
        ("LAION-aesthetic", "make_aesthetic_reward"),
        ("vlm_alignment", "make_vlm_alignment_reward"),
        ("blip_alignment", "make_vlm_alignment_reward"),
    ],
)
def test_stable_diffusion_reward_names(name, factory):
    from ddpo_rl.rewards.registry import get_reward_factory

    assert get_reward_factory(name).__name__ == factory
    assert name.lower().replace("-", "_") in available_rewards()


def test_presets_reward_kwargs_fit_their_factories():
    """Every preset's reward exists and takes its reward_kwargs (e.g. the SD jpeg presets' resize=512)."""
    import inspect

    from ddpo_rl.config import preset_config, PRESETS
    from ddpo_rl.rewards.registry import get_reward_factory

    for preset in PRESETS:
        cfg = preset_config(preset)
        inspect.signature(get_reward_factory(cfg.reward)).bind(**cfg.reward_kwargs)
    r = make_reward(preset_config("sd15-compressibility").reward, **preset_config("sd15-compressibility").reward_kwargs)
    assert r.resize == (512, 512)
    img = torch.rand(1, 3, 512, 512)
    assert r(img, [""]).item() == pytest.approx(make_reward("jpeg_compressibility")(img, [""]).item())  # 512: no-op


def test_wrong_reward_kwargs_name_the_accepted_ones():
    with pytest.raises(ValueError, match="resize") as e:
        make_reward("jpeg_compressibility", size=512)
    assert "size" in str(e.value)
    with pytest.raises(ValueError, match="weights"):
        make_reward("aesthetic", weight="/x.pth")  # a typo fails before anything is loaded
