import ddpo_rl  # noqa: F401  (first: CPU torchvision shim)

import pytest
import torch
from sklearn.datasets import load_digits

from ddpo_rl.rewards.digits import DigitAlignment, DigitClassifier, _fit_logistic_regression, parse_digit


@pytest.fixture(scope="module")
def real_digits():
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    return images.expand(-1, 3, -1, -1), torch.as_tensor(data.target)


@pytest.fixture(scope="module")
def reward():
    return DigitAlignment()


def _prompts(labels):
    return [f"a handwritten digit {int(d)}" for d in labels]


def test_parse_digit():
    assert parse_digit("a handwritten digit 7") == 7
    assert parse_digit("a handwritten digit 0") == 0
    assert parse_digit("digit 3, drawn neatly: 5") == 5
    with pytest.raises(ValueError, match="digit"):
        parse_digit("a handwritten digit")
    with pytest.raises(ValueError):
        parse_digit("a handwritten digit 12")


def test_high_probability_for_the_prompts_digit(reward, real_digits):
    images, labels = real_digits
    r = reward(images, _prompts(labels))
    assert r.shape == (len(labels),) and r.dtype == torch.float32
    assert ((r >= 0) & (r <= 1)).all()
    for d in range(10):
        assert r[labels == d].mean() > 0.5, d
    # the classifier is right on nearly all real digits
    pred = reward.classifier(images).argmax(-1)
    assert (pred == labels).float().mean() > 0.9


def test_low_probability_for_other_digits(reward, real_digits):
    images, labels = real_digits
    right = reward(images, _prompts(labels))
    for shift in (1, 5):
        wrong = reward(images, _prompts((labels + shift) % 10))
        assert wrong.mean() < 0.1
        assert (right > wrong).float().mean() > 0.95


def test_probabilities_sum_to_one_over_the_ten_prompts(reward, real_digits):
    images, _ = real_digits
    x = images[:16]
    total = sum(reward(x, [f"a handwritten digit {d}"] * 16) for d in range(10))
    torch.testing.assert_close(total, torch.ones(16))


def test_robust_to_size_and_channels(reward, real_digits):
    images, labels = real_digits
    x, p = images[:32], _prompts(labels[:32])
    base = reward(x, p)
    up = x.repeat_interleave(4, -1).repeat_interleave(4, -2)  # 32x32 nearest upscale
    torch.testing.assert_close(reward(up, p), base)
    torch.testing.assert_close(reward(x[:, :1], p), base)
    # a non-multiple size still works and stays close
    odd = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    assert reward(odd, p).shape == (32,)


def test_deterministic_fit():
    w1, b1 = _fit_logistic_regression.__wrapped__(0.1, 1000)
    w2, b2 = _fit_logistic_regression.__wrapped__(0.1, 1000)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert w1.shape == (10, 64) and b1.shape == (10,)


def test_less_regularised_classifier_is_more_confident(real_digits):
    images, labels = real_digits
    soft = DigitAlignment(C=0.1)(images, _prompts(labels)).mean()
    sharp = DigitAlignment(classifier=DigitClassifier(C=1.0))(images, _prompts(labels)).mean()
    assert sharp > soft


def test_errors(reward):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.rand(2, 3, 8, 8), ["a handwritten digit 1"])
    with pytest.raises(ValueError):
        DigitClassifier(C=0)


def test_prompts_without_a_digit_are_refused_before_any_image(reward):
    from ddpo_rl.rewards.base import check_prompts

    check_prompts(reward, ["a handwritten digit 3", "the digit 7 in ink"])
    with pytest.raises(ValueError, match="cannot find a digit 0-9 in prompt 'a cat'"):
        check_prompts(reward, ["a handwritten digit 3", "a cat"])
    check_prompts(lambda images, prompts: images.mean((1, 2, 3)), ["a cat"])  # no hook: every prompt
