"""ddpo_rl.headroom: the KL optimum's estimate (tilt) and the best re-weighting (a linear programme)."""

import itertools
import math

import pytest
import torch

from ddpo_rl.headroom import reweighting_bound, tilt


def _data(seed=0, groups=3, per_group=6):
    g = torch.Generator().manual_seed(seed)
    reward = torch.randn(groups * per_group, generator=g)
    monitor = torch.rand(groups * per_group, generator=g)
    ids = torch.arange(groups).repeat_interleave(per_group)
    return reward, monitor, ids


def _group_means(x, ids):
    return torch.stack([x[ids == i].double().mean() for i in ids.unique()]).mean().item()


def test_tilt_without_tilt_is_the_base_means():
    reward, monitor, ids = _data()
    est = tilt(reward, monitor, ids, math.inf)
    assert est.reward == pytest.approx(_group_means(reward, ids))
    assert est.monitor == pytest.approx(_group_means(monitor, ids))
    assert est.min_ess == pytest.approx(6.0)


def test_tilt_equals_the_exponential_weights_written_out():
    reward, monitor, ids = _data(1)
    beta, scale = 0.7, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    r_means, m_means, ess = [], [], []
    for i in range(3):
        r, m = reward[ids == i].double(), monitor[ids == i].double()
        w = torch.exp(r / (beta * scale[i]))
        w = w / w.sum()
        r_means.append((w * r).sum().item())
        m_means.append((w * m).sum().item())
        ess.append(1 / (w**2).sum().item())
    est = tilt(reward, monitor, ids, beta, scale)
    assert est.reward == pytest.approx(sum(r_means) / 3)
    assert est.monitor == pytest.approx(sum(m_means) / 3)
    assert est.min_ess == pytest.approx(min(ess))


def test_a_sharp_tilt_picks_each_groups_best_sample():
    reward, monitor, ids = _data(2)
    est = tilt(reward, monitor, ids, 1e-4)
    best = [int(torch.nonzero(ids == i)[reward[ids == i].argmax()]) for i in range(3)]
    assert est.reward == pytest.approx(reward[best].double().mean().item())
    assert est.monitor == pytest.approx(monitor[best].double().mean().item())
    assert est.min_ess == pytest.approx(1.0)


def test_bound_on_a_case_solved_by_hand():
    reward = torch.tensor([0.0, 1, 2, 3, 0, 1, 2, 3])
    monitor = torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # mean monitor >= 0.75: each group puts at most 1/4 of its weight on the reward-3 sample
    assert reweighting_bound(reward, monitor, ids, 0.75) == pytest.approx((2.25, 0.75))
    assert reweighting_bound(reward, monitor, ids, 0.75, density_bound=1) == pytest.approx((1.5, 0.75))
    assert reweighting_bound(reward, monitor, ids, 1.01) is None  # no re-weighting keeps it
    # density <= 2: at most 2 x 1/4 of each group's weight on one sample -> the two best, half each
    assert reweighting_bound(reward, monitor, ids, 0.0, density_bound=2) == pytest.approx((2.5, 0.5))


def _brute_force(reward, monitor, ids, floor):
    """Unbounded density: an optimal vertex puts its weight on one sample per group, except at most one
    group that mixes two samples so that the monitor constraint is tight."""
    groups = [torch.nonzero(ids == i).flatten().tolist() for i in ids.unique()]
    G, best = len(groups), -math.inf
    r, m = reward.double().tolist(), monitor.double().tolist()
    for picks in itertools.product(*groups):
        if sum(m[i] for i in picks) / G >= floor - 1e-12:
            best = max(best, sum(r[i] for i in picks) / G)
    for k, members in enumerate(groups):
        others = groups[:k] + groups[k + 1:]
        for i, j in itertools.combinations(members, 2):
            for picks in itertools.product(*others):
                rest_r, rest_m = sum(r[q] for q in picks), sum(m[q] for q in picks)
                if m[i] == m[j]:
                    continue
                t = (floor * G - rest_m - m[j]) / (m[i] - m[j])  # weight share of i within the group
                if 0 <= t <= 1:
                    best = max(best, (rest_r + t * r[i] + (1 - t) * r[j]) / G)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_equals_a_brute_force_search_over_vertices(seed):
    reward, monitor, ids = _data(seed, groups=2, per_group=4)
    floor = _group_means(monitor, ids) * 1.1
    got = reweighting_bound(reward, monitor, ids, floor)
    assert got is not None
    assert got[0] == pytest.approx(_brute_force(reward, monitor, ids, floor), abs=1e-9)
    assert got[1] >= floor - 1e-9


def test_bound_grows_with_the_density_ratio_and_dominates_the_tilt():
    reward, monitor, ids = _data(3, groups=3, per_group=20)
    floor = _group_means(monitor, ids) * 0.9
    values = [reweighting_bound(reward, monitor, ids, floor, k)[0] for k in (1, 2, 5, 20, None)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(_group_means(reward, ids))  # K 1: the base weights only
    assert values[-1] <= max(reward[ids == i].max().item() for i in range(3)) + 1e-12
    # the tilt at any beta is one re-weighting: the bound at its monitor and density ratio is >= it
    for beta in (2.0, 0.5, 0.2):
        est = tilt(reward, monitor, ids, beta)
        ratio = max((torch.softmax(reward[ids == i].double() / beta, 0).max() * 20).item() for i in range(3))
        bound = reweighting_bound(reward, monitor, ids, est.monitor - 1e-9, ratio + 1e-9)
        assert bound[0] >= est.reward - 1e-9


def test_bad_input_is_refused_with_the_field_named():
    reward, monitor, ids = _data()
    with pytest.raises(ValueError, match="reward, monitor and groups"):
        tilt(reward, monitor[:-1], ids, 1.0)
    with pytest.raises(ValueError, match="beta"):
        tilt(reward, monitor, ids, 0.0)
    with pytest.raises(ValueError, match="density_bound"):
        reweighting_bound(reward, monitor, ids, 0.5, density_bound=0.5)
    with pytest.raises(ValueError, match="finite"):
        reweighting_bound(reward.clone().fill_(math.nan), monitor, ids, 0.5)
