"""Densification in clip mode is the same on 2 ranks as on one process (issue 17).

50 training steps of the stress scene with gsplat's DefaultStrategy growing (duplicate and
split) and pruning every 10 steps: the ranks together end with the same Gaussians as one
process -- the same count, every parameter within 1e-5 (float64).  What makes it hold: the
copies' screen gradients and radii return to their owner (``exchange_rows``), splits draw
their offsets per Gaussian in an order every partition agrees on
(``partition_invariant_normals``), and children that land in another rank's region migrate.
"""

from __future__ import annotations

import functools

import pytest
import torch

from _retina_dist_helpers import batch_losses, make_optimizers, no_termination, step_optimizers, stress_cameras, stress_model

from landmark_plugin.distributed.launch import run_ranks

FAST_START = dict(start_method="forkserver", preload=("landmark_plugin.gaussians.frame", "_retina_dist_helpers"))
TOL = dict(rtol=0.0, atol=1e-5)
STEPS, BATCH, CAMERAS, REFINE_EVERY = 50, 2, 6, 10


def _densifying(model):
    """The stress model with growth from step 10 to 40 and pruning, every 10 steps."""
    model.config.refine_every = REFINE_EVERY
    s = model.strategy
    s.refine_start_iter, s.refine_stop_iter, s.refine_every = REFINE_EVERY, 41, REFINE_EVERY
    s.reset_every, s.pause_refine_after_reset = 10**6, 0
    s.absgrad, s.grow_grad2d = False, 2e-5
    s.grow_scale3d, s.grow_scale2d, s.refine_scale2d_stop_iter = 0.1, 0.2, 41
    s.prune_opa, s.prune_scale3d, s.prune_scale2d = 0.08, 10.0, 10.0
    s.verbose = False
    return model


def _worker(comm, depth: int, max_gaussians: int = 0):
    from landmark_plugin.core.schedule import Parts
    from landmark_plugin.gaussians.frame import RetinaFrame
    from landmark_plugin.gaussians.rows import shard_

    torch.set_default_dtype(torch.float64)
    model, cameras = _densifying(stress_model(depth)), stress_cameras()
    model.strategy.max_gaussians = max_gaussians
    shard_(comm, model, Parts.of(depth, comm.world_size))
    frame = RetinaFrame(comm, model, no_termination())
    model.frame = frame
    # One process draws its one part ordinarily; the ranks draw clipped copies: equal up to float64
    # rounding, which splatfacto's eps (1e-15) would turn into whole Adam steps on near-zero gradients
    # (1e-3 apart after 50 steps); 1e-12 keeps Adam's steps for every gradient above the rounding.
    model.optimizers = make_optimizers(model, eps=1e-12)
    events, counts = {"_grow_gs": [], "_prune_gs": []}, []
    for name, seen in events.items():  # what gsplat's strategy did at each refinement

        def recorded(*args, _original=getattr(model.strategy, name), _seen=seen, **kwargs):
            _seen.append(_original(*args, **kwargs))
            return _seen[-1]

        setattr(model.strategy, name, recorded)
    for step in range(STEPS):
        model.step = step
        losses = batch_losses(frame, cameras, step, BATCH, CAMERAS)
        losses["main_loss"].backward()
        step_optimizers(model, model.optimizers)
        model.step_post_backward(step)
        counts.append(model.num_points)
    params = {n: p.detach().clone() for n, p in model.gauss_params.items()}
    return {"params": params, "grown": events["_grow_gs"], "pruned": events["_prune_gs"], "counts": counts}


def _rows(results):
    """Every rank's Gaussians as one [N, D] matrix, ordered by mean (x, then y, then z)."""
    rows = torch.cat([torch.cat([p.reshape(p.shape[0], -1) for p in r["params"].values()], dim=1) for r in results])
    order = torch.arange(rows.shape[0])
    for axis in (2, 1, 0):
        order = order[torch.sort(rows[order, axis], stable=True).indices]
    return rows[order]


@functools.lru_cache(maxsize=None)
def _one_process(tmp_dir, max_gaussians: int = 0):
    return run_ranks(_worker, 1, tmp_dir / f"one-process-{max_gaussians}", args=(2, max_gaussians), timeout_s=180,
                     **FAST_START)


@pytest.mark.slow
def test_densification_on_two_ranks_adds_and_prunes_as_one_process(tmp_path):
    (single,) = _one_process(tmp_path)
    dupli = sum(d for d, _ in single["grown"])
    splits = sum(s for _, s in single["grown"])
    pruned = sum(single["pruned"])
    assert dupli > 0 and splits > 0 and pruned > 0, f"the check needs duplicates, splits and prunes ({dupli}, {splits}, {pruned})"
    results = run_ranks(_worker, 2, tmp_path / "two-ranks", args=(2,), timeout_s=240, **FAST_START)
    assert all(len(r["grown"]) == len(single["grown"]) for r in results), "every rank grows at the same steps"
    assert sum(sum(d for d, _ in r["grown"]) for r in results) == dupli
    assert sum(sum(s for _, s in r["grown"]) for r in results) == splits
    assert sum(sum(r["pruned"]) for r in results) == pruned
    for step in range(STEPS):
        assert sum(r["counts"][step] for r in results) == single["counts"][step], f"count after step {step}"
    torch.testing.assert_close(_rows(results), _rows([single]), **TOL)


@pytest.mark.slow
def test_a_gaussian_budget_holds_and_grows_the_same_gaussians_on_two_ranks(tmp_path):
    """max_gaussians: the growth steps keep the whole model within the budget by growing the
    candidates with the largest screen gradients, ranked over every rank's candidates."""
    (free,) = _one_process(tmp_path)
    start, grown = free["counts"][0], sum(d + s for d, s in free["grown"])
    budget = start + grown // 2
    (single,) = _one_process(tmp_path, budget)
    assert max(single["counts"]) <= budget < max(free["counts"]), "the budget must bind, and hold"
    assert sum(d + s for d, s in single["grown"]) > 0
    results = run_ranks(_worker, 2, tmp_path / "two-ranks-budget", args=(2, budget), timeout_s=240, **FAST_START)
    for step in range(STEPS):
        assert sum(r["counts"][step] for r in results) == single["counts"][step], f"count after step {step}"
    torch.testing.assert_close(_rows(results), _rows([single]), **TOL)
