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


def test_group_advantages_by_hand():
    from ddpo_rl.advantages import group_advantages

    # groups of 3: [1, 2, 6] (mean 3, population std sqrt(14/3)) and [5, 5, 5] (std 0 -> 0)
    r = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    s = (14 / 3) ** 0.5
    expected = torch.tensor([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(r, 3), expected, atol=1e-5, rtol=0)
    # the same through compute_advantages (which ignores the tracker then), clipped
    tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
    got = compute_advantages(r, ["p"] * 6, tracker, clip=1.0, group_size=3)
    torch.testing.assert_close(got, expected.clamp(-1, 1), atol=1e-5, rtol=0)
    assert not tracker.buffers  # GRPO groups replace the per-prompt statistics
    # group_size None / 1: the previous behaviour (batch statistics)
    torch.testing.assert_close(compute_advantages(r, clip=None, group_size=1), batch_advantages(r))


def test_group_advantages_skip_nan_and_name_the_field():
    from ddpo_rl.advantages import group_advantages

    r = torch.tensor([0.0, 2.0, float("nan"), 7.0, float("nan"), 3.0])
    # groups of 2: [0, 2] -> -1, 1; [nan, 7] -> 0, 0 (one finite reward); [nan, 3] -> 0, 0
    torch.testing.assert_close(
        group_advantages(r, 2), torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match=r"^group_size: 6 rewards do not split into groups of 4"):
        group_advantages(r, 4)
