"""ddpo_rl.distributed helpers in a real 2-process gloo group (torch.multiprocessing, CPU)."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpo_rl import distributed
from tests.helpers import free_port

WORLD = 2


def _check_helpers(rank: int, port: int, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
        info = distributed.init_distributed("cpu")
        assert (info.rank, info.world_size, info.enabled, info.is_main) == (rank, WORLD, True, rank == 0)

        # all_gather_cat: rank order
        got = distributed.all_gather_cat(torch.tensor([10.0 * rank, 10.0 * rank + 1]))
        assert got.tolist() == [0.0, 1.0, 10.0, 11.0], got
        ids = distributed.all_gather_cat(torch.tensor([rank], dtype=torch.int64))
        assert ids.dtype == torch.int64 and ids.tolist() == [0, 1]
        assert distributed.all_gather_objects({"r": rank}) == [{"r": 0}, {"r": 1}]

        # average_gradients: mean over ranks, a missing grad counts as zero, extra is summed
        a = torch.nn.Parameter(torch.zeros(2, 3))
        b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        c = torch.nn.Parameter(torch.zeros(1))
        a.grad = torch.full((2, 3), float(rank + 1))  # 1 and 2 -> 1.5
        b.grad = torch.arange(4, dtype=torch.float64) * (rank + 1)  # -> 1.5 * arange
        if rank == 1:
            c.grad = torch.tensor([4.0])  # rank 0 has none -> 2.0
        extra = distributed.average_gradients([a, b, c], extra=torch.tensor(float(rank + 1)))
        assert torch.equal(a.grad, torch.full((2, 3), 1.5))
        assert b.grad.dtype == torch.float64 and torch.equal(b.grad, 1.5 * torch.arange(4, dtype=torch.float64))
        assert torch.equal(c.grad, torch.tensor([2.0]))
        assert extra.item() == 3.0
        assert distributed.average_gradients([a], extra=None) is None

        # flags and maxima agree on every rank
        assert distributed.any_true(rank == 1) is True
        assert distributed.any_true(False) is False
        assert distributed.max_int(rank * 5) == 5

        # all_gather_ragged: unequal lengths (samples dropped on one rank), rank order, where mine starts
        everyone, start = distributed.all_gather_ragged(torch.arange(3.0) if rank == 0 else torch.tensor([7.0]))
        assert everyone.tolist() == [0.0, 1.0, 2.0, 7.0] and start == (0 if rank == 0 else 3)
        everyone, start = distributed.all_gather_ragged(torch.zeros(0) if rank == 0 else torch.tensor([5.0, 6.0]))
        assert everyone.tolist() == [5.0, 6.0] and start == 0

        # mean_over_ranks: the job's figure; a value missing or not finite on a rank is left out
        mine = {"loss": torch.tensor(1.0 + 2 * rank), "clip_fraction": torch.tensor(float("nan") if rank else 0.5)}
        if rank == 0:
            mine["kl"] = torch.tensor(4.0)
        got = distributed.mean_over_ranks(mine)
        assert {k: v.item() for k, v in got.items()} == {"loss": 2.0, "clip_fraction": 0.5, "kl": 4.0}

        # RWR weights over the whole job's batch, as one process weights the concatenated batch
        from tensordict import TensorDict

        from ddpo_rl.keys import KEYS
        from ddpo_rl.objectives import RWRLoss, rwr_weights
        from ddpo_rl.policy import DiffusionPolicy
        from ddpo_rl.models.tiny import sd_ddim_scheduler

        adv = torch.tensor([0.3, -1.0, 2.0, 0.1, 1.5, -0.2, 0.9])  # rank 0: the first 4, rank 1: 3
        part = adv[:4] if rank == 0 else adv[4:]
        policy = DiffusionPolicy(torch.nn.Identity(), sd_ddim_scheduler(), 5)
        for mode in ("exponential", "sparse"):
            loss = RWRLoss(policy, mode=mode, temperature=0.5, quantile=0.5)
            td = loss.prepare_batch(TensorDict({KEYS.advantage: part.unsqueeze(-1)}, [part.numel()]))
            expected = rwr_weights(adv, mode, temperature=0.5, quantile=0.5)
            expected = expected[:4] if rank == 0 else expected[4:]
            torch.testing.assert_close(td["rwr_weight"].squeeze(-1), expected, rtol=0, atol=1e-6)

        # broadcast_parameters: rank 0's weights everywhere
        p = torch.nn.Parameter(torch.full((3,), float(rank)))
        distributed.broadcast_parameters([p])
        assert torch.equal(p.data, torch.zeros(3))
        distributed.barrier()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise  # a non-zero exit code too, not only the queue
    finally:
        distributed.destroy()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_helpers_in_a_two_process_gloo_group():
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_check_helpers, args=(r, port, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_helpers_are_no_ops_in_one_process():
    assert not distributed.init_distributed("cpu").enabled or os.environ.get("WORLD_SIZE", "1") != "1"
    x = torch.arange(3.0)
    assert distributed.all_gather_cat(x) is x
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    extra = torch.tensor(2.0)
    assert distributed.average_gradients([p], extra=extra) is extra and torch.equal(p.grad, torch.ones(2))
    assert distributed.any_true(True) and not distributed.any_true(False)
    assert distributed.max_int(7) == 7
    assert distributed.all_gather_ragged(x) == (x, 0)
    values = {"loss": torch.tensor(1.0)}
    assert distributed.mean_over_ranks(values) is values
