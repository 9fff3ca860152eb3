"""Collectives on gloo CPU processes: the partial exchange (forward and backward), reductions,
row exchanges, and a dead or hung rank failing its peers within the collective timeout."""

from __future__ import annotations

import os
import time

import pytest
import torch

from landmark_plugin.distributed.collectives import (
    ExchangePlan,
    Task,
    all_gather_rows,
    all_reduce_grads_,
    all_reduce_sum,
    all_to_all_rows,
    exchange_partials,
)
from landmark_plugin.distributed.groups import RankFailure
from landmark_plugin.distributed.launch import run_ranks, spawn

ATOL_F64 = 1e-12  # float64 data only moves through the exchange: it must be bit-exact

H, W, C = 6, 5, 4  # tiny frames: colour (3) + transmittance (1)


def _plan(world_size: int, num_cameras: int = 3) -> ExchangePlan:
    """Every rank renders every camera (one part each); owners round-robin; varied rects."""
    tasks = []
    for b in range(num_cameras):
        for r in range(world_size):
            y0, x0 = (b + r) % 3, (2 * b + r) % 2
            rect = (x0, y0, W - ((b + r) % 3), H - (r % 2))
            tasks.append(Task(camera=b, part=r, source=r, owner=b % world_size, rect=rect, channels=C))
    return ExchangePlan(tuple(tasks), world_size)


def _partial(task_id: int, task: Task) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + task_id)
    return torch.rand(task.shape, generator=g, dtype=torch.float64)


def _loss_weights(task: Task) -> torch.Tensor:
    g = torch.Generator().manual_seed(77 + task.camera * 13 + task.part)
    return torch.randn(task.shape, generator=g, dtype=torch.float64)


def _exchange_worker(comm):
    plan = _plan(comm.world_size)
    local = {
        i: _partial(i, t).requires_grad_(True) for i, t in enumerate(plan.tasks) if t.source == comm.rank
    }
    anchor = torch.zeros((), dtype=torch.float64, requires_grad=True)
    received, anchor_out = exchange_partials(comm, plan, local, anchor)
    loss = 0.0 * anchor_out
    for i, x in received.items():
        loss = loss + (x * _loss_weights(plan.tasks[i])).sum()
    loss.backward()
    return {
        "received": {i: x.detach() for i, x in received.items()},
        "grads": {i: x.grad for i, x in local.items()},
        **_reduce_worker(comm),
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_exchange_partials_and_reductions(tmp_path, world_size):
    """One spawn per world size checks every collective (process start-up dominates the cost)."""
    results = run_ranks(_exchange_worker, world_size, tmp_path, start_method="forkserver")
    _check_reductions(results, world_size)
    plan = _plan(world_size)
    seen = set()
    for rank, res in enumerate(results):
        assert set(res["received"]) == set(plan.recvs(rank))
        for i, x in res["received"].items():
            torch.testing.assert_close(x, _partial(i, plan.tasks[i]), rtol=0, atol=ATOL_F64)
            seen.add(i)
        for i, g in res["grads"].items():
            # d loss / d partial = the owner's weights, wherever the partial went.
            torch.testing.assert_close(g, _loss_weights(plan.tasks[i]), rtol=0, atol=ATOL_F64)
    assert seen == set(range(len(plan.tasks)))


def _reduce_worker(comm):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    if comm.rank != 1:  # rank 1 leaves its grad None: counts as zero
        p.grad = torch.full((3,), float(comm.rank + 1), dtype=torch.float64)
    all_reduce_grads_(comm, [p])
    (total,) = all_reduce_sum(comm, [torch.tensor([comm.rank], dtype=torch.float64)])
    rows = torch.arange(4 * (comm.rank + 1), dtype=torch.float64).view(-1, 2) + 100 * comm.rank
    dest = torch.arange(rows.shape[0]) % comm.world_size
    moved, source = all_to_all_rows(comm, rows, dest)
    gathered = all_gather_rows(comm, rows)
    return {"grad": p.grad, "total": total, "moved": moved, "source": source, "gathered": gathered}


def _check_reductions(results, world_size):
    expected_grad = float(sum(r + 1 for r in range(world_size) if r != 1))
    all_rows = [torch.arange(4 * (r + 1), dtype=torch.float64).view(-1, 2) + 100 * r for r in range(world_size)]
    for rank, res in enumerate(results):
        assert torch.equal(res["grad"], torch.full((3,), expected_grad, dtype=torch.float64))
        assert float(res["total"]) == sum(range(world_size))
        assert torch.equal(res["gathered"], torch.cat(all_rows))
        want = torch.cat([rows[torch.arange(rows.shape[0]) % world_size == rank] for rows in all_rows])
        assert torch.equal(res["moved"], want)
    # Every row arrives exactly once somewhere.
    moved = torch.cat([res["moved"] for res in results])
    assert sorted(map(tuple, moved.tolist())) == sorted(map(tuple, torch.cat(all_rows).tolist()))


def _dying_worker(comm, mode: str, marker_dir: str):
    all_reduce_sum(comm, [torch.ones(2)])  # the group works
    if comm.rank == 1:
        if mode == "dies":
            os._exit(7)
        time.sleep(6)  # hangs twice past the timeout
        return None
    start = time.time()
    try:
        all_reduce_sum(comm, [torch.ones(2)], "after the peer left")
    except RankFailure as error:
        (torch.save({"seconds": time.time() - start, "message": str(error)}, f"{marker_dir}/failure-{comm.rank}.pt"))
        raise
    return None


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_dead_or_hung_rank_fails_peers_within_timeout(tmp_path, mode):
    timeout_s = 3.0
    start = time.time()
    codes = spawn(_dying_worker, 2, args=(mode, str(tmp_path)), timeout_s=timeout_s, join_timeout_s=25, start_method="forkserver")
    elapsed = time.time() - start
    assert codes[0] == 1, f"the surviving rank should exit with an error, got {codes}"
    failure = torch.load(tmp_path / "failure-0.pt")
    assert failure["seconds"] <= timeout_s + 2.0
    assert "collective 'after the peer left' failed" in failure["message"]
    assert "timeout (3 s)" in failure["message"]
    assert elapsed < 40
