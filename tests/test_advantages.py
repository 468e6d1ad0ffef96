import pytest
import torch

from ddpo_rl.advantages import PerPromptStatTracker, batch_advantages, compute_advantages


def test_falls_back_to_batch_statistics_below_min_count():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=16)
    r = torch.tensor([1.0, 2.0, 3.0, 10.0])
    adv = tracker.update(["a", "a", "b", "b"], r)
    expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(adv, expected)


def test_per_prompt_statistics_once_enough_samples():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    r = torch.tensor([1.0, 3.0, 100.0, 102.0])
    adv = tracker.update(["a", "a", "b", "b"], r)
    # each prompt standardised on its own: -1, +1 for both
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_buffer_keeps_only_the_latest_rewards():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=2)
    tracker.update(["a", "a"], torch.tensor([0.0, 0.0]))
    tracker.update(["a", "a"], torch.tensor([4.0, 6.0]))
    assert list(tracker.buffers["a"]) == [4.0, 6.0]


def test_state_dict_round_trip_gives_same_advantages():
    t1 = PerPromptStatTracker(buffer_size=8, min_count=2)
    t1.update(["a", "b", "a", "b"], torch.tensor([1.0, 2.0, 3.0, 5.0]))
    t2 = PerPromptStatTracker()
    t2.load_state_dict(t1.state_dict())
    nxt = torch.tensor([2.0, 2.0, 4.0, 0.0])
    torch.testing.assert_close(t1.update(["a", "b", "a", "b"], nxt), t2.update(["a", "b", "a", "b"], nxt))


def test_clipping_and_nan_rewards():
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0, float("nan")])
    adv = compute_advantages(r, clip=1.5)
    assert adv.max().item() == pytest.approx(1.5)
    assert adv[-1].item() == 0.0
    assert torch.isfinite(adv).all()


def test_nan_rewards_are_left_out_of_statistics():
    r = torch.tensor([1.0, 3.0, float("nan")])
    torch.testing.assert_close(batch_advantages(r)[:2], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)


def test_errors():
    with pytest.raises(ValueError):
        PerPromptStatTracker(buffer_size=0)
    with pytest.raises(ValueError, match="prompt"):
        compute_advantages(torch.zeros(2), tracker=PerPromptStatTracker())
    with pytest.raises(ValueError):
        PerPromptStatTracker().update(["a"], torch.zeros(2))
