"""Digit realism: minus the mean RMS pixel distance to the k nearest real digits of the prompt's digit."""

import math

import pytest
import torch

from ddpo_rl.models.digits_data import load_digits_dataset
from ddpo_rl.rewards.registry import make_reward


@pytest.fixture(scope="module")
def real():
    images, labels = load_digits_dataset()
    return ((images + 1) / 2).expand(-1, 3, -1, -1), labels


def _prompts(labels):
    return [f"a handwritten digit {int(d)}" for d in labels]


def test_by_hand_against_a_loop_over_the_real_digits(real):
    images, labels = real
    fn = make_reward("digit_realism", k=3)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    digits = [7, 0, 7, 3]
    got = fn(x, [f"draw the digit {d}" for d in digits])
    grey, pool = x.mean(1).flatten(1).tolist(), images[:, 0].flatten(1)

    def distance(v, others):  # mean of the 3 smallest RMS distances
        return sum(sorted(math.dist(v, o) for o in others)[:3]) / 3 / 8

    for i, d in enumerate(digits):
        own = pool[labels == d].tolist()
        typical = sum(distance(v, own[:j] + own[j + 1:]) for j, v in enumerate(own)) / len(own)
        assert got[i].item() == pytest.approx(typical / distance(grey[i], own), rel=1e-5)


def test_real_digits_score_above_the_artefacts_the_classifier_misses(real):
    """Real digits are close to other real digits of their class; a blank image, bright edge columns
    (what Flow-GRPO's compressibility run drew) and another digit are far from them."""
    images, labels = real
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:200]
    x, prompts = images[idx], _prompts(labels[idx])
    fn = make_reward("realism")
    pool = torch.ones(len(labels), dtype=torch.bool)
    pool[idx] = False  # compare with the other real digits, as generated images are
    fn.real, fn.labels = fn.real[pool], fn.labels[pool]
    edges = x.clone()
    edges[..., 0] = edges[..., -1] = 1.0
    other = images[(idx + 1) % len(labels)]  # the next image: most are another digit
    scores = {name: fn(imgs, prompts).mean().item()
              for name, imgs in dict(real=x, blank=torch.zeros_like(x), edges=edges, other=other).items()}
    assert 0.9 < scores["real"] < 1.1  # 1: as close as real digits are to one another
    assert scores["real"] > scores["other"] > scores["blank"] and scores["real"] > 2 * scores["edges"]
    from ddpo_rl.rewards.digits import DigitAlignment

    # the classifier keeps most of its answer for the edge columns; realism does not
    p = DigitAlignment()
    assert p(edges, prompts).mean() > 0.7 * p(x, prompts).mean()


def test_image_size_and_device_follow_the_input(real):
    images, labels = real
    fn = make_reward("digit_realism")
    x, prompts = images[:6], _prompts(labels[:6])
    up = x.repeat_interleave(4, -2).repeat_interleave(4, -1)  # 32x32, as the decoders may return
    torch.testing.assert_close(fn(up, prompts), fn(x, prompts))
    assert fn(x, prompts).device == x.device and fn(x, prompts).shape == (6,)


def test_bad_input():
    with pytest.raises(ValueError, match="k must be a positive int"):
        make_reward("digit_realism", k=0)
    with pytest.raises(ValueError, match="rarest class"):
        make_reward("digit_realism", k=10_000)
    fn = make_reward("digit_realism")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        fn(torch.zeros(2, 3, 8, 8), ["a handwritten digit 1"])
    with pytest.raises(ValueError, match="cannot find a digit"):
        fn(torch.zeros(1, 3, 8, 8), ["a cat"])
    fn.check_prompts(["a handwritten digit 0", "a handwritten digit 9"])
    with pytest.raises(ValueError, match="cannot find a digit 0-9 in prompt 'a dog'"):
        fn.check_prompts(["a handwritten digit 0", "a dog"])  # the same, before any image
