"""Sample diversity: the mean RMS pixel distance to the other samples of the same prompt."""

import math

import torch

from ddpo_rl.rewards.registry import make_reward


def test_diversity_by_hand_and_grouped_by_prompt():
    fn = make_reward("sample_diversity")
    a, b, c = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    images = torch.cat([a, b, c, a, a])
    prompts = ["p", "p", "p", "q", "q"]
    d = fn(images, prompts)
    # "p": a-b 1.0, a-c 0.5, b-c 0.5 (RMS pixel distances); "q": two identical images, 0
    torch.testing.assert_close(d, torch.tensor([0.75, 0.75, 0.5, 0.0, 0.0]))
    assert math.isnan(fn(images[:1], ["p"])[0])  # no other sample of its prompt


def test_collapsed_samples_score_zero_and_noise_scores_high():
    fn = make_reward("diversity")
    prompts = ["x"] * 8
    assert fn(torch.rand(1, 3, 8, 8).expand(8, -1, -1, -1), prompts).abs().max() < 1e-6
    assert fn(torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), prompts).min() > 0.3
