"""Migration, sharded checkpoints, merge and resume on a different number of ranks (gloo CPU)."""

from __future__ import annotations

import pytest
import torch

from _retina_dist_helpers import make_cameras, make_model, make_optimizers, step_optimizers, target_image
from landmark_plugin.distributed.launch import run_ranks

FAST_START = dict(start_method="forkserver", preload=("landmark_plugin.gaussians.frame", "_retina_dist_helpers"))
TOL = dict(rtol=0.0, atol=1e-5)
RESUME_BATCH = [2, 3]


def _sharded(comm):
    from landmark_plugin.core.schedule import Parts
    from landmark_plugin.gaussians.rows import shard_
    from landmark_plugin.gaussians.frame import RetinaFrame

    torch.set_default_dtype(torch.float64)
    model = make_model()
    shard_(comm, model, Parts.of(model.config.tree_depth, comm.world_size))
    optimizers = make_optimizers(model)
    model.optimizers = optimizers
    return model, optimizers, RetinaFrame(comm, model)


def _batch_loss(sharded, batch, backward: bool) -> float:
    cameras = make_cameras()[torch.tensor(batch)]
    _, visible, owners = sharded.plan_batch(cameras, len(batch), max_load=16)
    losses, _, _ = sharded.batch_loss(cameras, visible, owners, lambda b: {"image": target_image(batch[b])})
    if backward:
        losses["main_loss"].backward()
    return float(losses["main_loss"])


def _state(model, optimizers, step):
    return {
        "step": step,
        "pipeline": {"_model." + k: v for k, v in model.state_dict().items()},
        "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
        "strategy_state": model.strategy_state,
    }


def _train_save_migrate(comm, base_dir: str):
    """One step, save shards, loss of the next batch, then a forced migration."""
    from landmark_plugin.distributed.checkpoint import save_shard
    from landmark_plugin.distributed.collectives import all_gather_rows
    from landmark_plugin.gaussians.rows import gaussian_rows, migrate_, owner_ranks

    model, optimizers, sharded = _sharded(comm)
    model.step = 0
    _batch_loss(sharded, [0, 1], backward=True)
    step_optimizers(model, optimizers)
    save_shard(comm, base_dir, 1, _state(model, optimizers, 1), model.tree)
    model.step = 1
    with torch.no_grad():
        next_loss = _batch_loss(sharded, RESUME_BATCH, backward=False)
        g = torch.Generator().manual_seed(comm.rank)
        model.gauss_params["means"] += 0.4 * torch.randn(model.num_points, 3, generator=g)
    before = all_gather_rows(comm, gaussian_rows(model, optimizers, model.strategy_state)[0])
    leaving = migrate_(comm, model, optimizers, model.strategy_state, sharded.parts, rebuild=True)
    after = all_gather_rows(comm, gaussian_rows(model, optimizers, model.strategy_state)[0])
    owned = bool((owner_ranks(model, sharded.parts) == comm.rank).all())
    return {"next_loss": next_loss, "before": before, "after": after, "leaving": leaving, "owned": owned,
            "tree": model.tree.to_dict(), "counts": model.num_points}


def _resume(comm, base_dir: str):
    """Load the newest complete step of ``base_dir`` on this world size; loss of the next batch."""
    from landmark_plugin.distributed.checkpoint import latest_complete_step, load_shards, merge_shards, shard_for_rank

    model, _, sharded = _sharded(comm)
    step = latest_complete_step(base_dir)
    merged = merge_shards(load_shards(base_dir, step))
    from landmark_plugin.core.partition import KDTree

    mine = shard_for_rank(merged, KDTree.from_dict(merged["tree"]), comm.rank, comm.world_size)
    model.load_state_dict({k[len("_model.") :]: v for k, v in mine["pipeline"].items()})
    model.step = step
    optimizers = make_optimizers(model)
    for name, opt in optimizers.items():
        opt.load_state_dict(mine["optimizers"][name])
    model.optimizers = optimizers
    with torch.no_grad():
        return {"loss": _batch_loss(sharded, RESUME_BATCH, backward=False), "merged": merged}


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    order = torch.tensor(sorted(range(rows.shape[0]), key=lambda i: rows[i].tolist()))
    return rows[order]


def test_migration_merge_and_resume(tmp_path):
    two = run_ranks(_train_save_migrate, 2, tmp_path / "out2", args=(str(tmp_path / "run2"),), timeout_s=120, **FAST_START)
    one = run_ranks(_train_save_migrate, 1, tmp_path / "out1", args=(str(tmp_path / "run1"),), timeout_s=120, **FAST_START)

    # Migration keeps every Gaussian (parameters and Adam moments) exactly once.
    for res in two:
        assert res["owned"], "after migration a rank holds only Gaussians of its own parts"
        assert res["tree"] == two[0]["tree"], "every rank rebuilt the same tree"
        assert torch.equal(_sorted_rows(res["after"]), _sorted_rows(res["before"]))
    assert sum(r["leaving"] for r in two) > 0, "the shift should have moved Gaussians across ranks"
    assert two[0]["next_loss"] == pytest.approx(one[0]["next_loss"], abs=1e-5)

    # Resume 2 -> 1 and 1 -> 2 ranks: the same loss at the resume step.
    on_one = run_ranks(_resume, 1, tmp_path / "res1", args=(str(tmp_path / "run2"),), timeout_s=120, **FAST_START)
    on_two = run_ranks(_resume, 2, tmp_path / "res2", args=(str(tmp_path / "run1"),), timeout_s=120, **FAST_START)
    assert on_one[0]["loss"] == pytest.approx(two[0]["next_loss"], abs=1e-5)
    for res in on_two:
        assert res["loss"] == pytest.approx(one[0]["next_loss"], abs=1e-5)

    # The merge of the 2 shards equals the single-process state (rows compared as sets).
    merged2, merged1 = on_one[0]["merged"], on_two[0]["merged"]
    for key, value in merged1["pipeline"].items():
        if key.startswith("_model.gauss_params."):
            got = merged2["pipeline"][key]
            assert got.shape == value.shape
            torch.testing.assert_close(_sorted_rows(got.reshape(got.shape[0], -1)), _sorted_rows(value.reshape(value.shape[0], -1)), **TOL)
