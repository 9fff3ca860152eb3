"""Distributed retina-gs on 2 and 4 gloo CPU processes equals the single-process model.

Each rank holds only the Gaussians of its subtrees.  Compared with one process holding all
of them (float64, torch reference rasteriser, densification off): the composited images,
the loss and every Gaussian's gradient at step 0, and every parameter after 5 Adam steps of
2-camera batches.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from _retina_dist_helpers import (
    NUM_CAMERAS,
    make_cameras,
    make_model,
    make_optimizers,
    reference_step,
    step_optimizers,
    target_image,
)
from conftest import gloo_world_sizes

from landmark_plugin.distributed.launch import run_ranks

# Ranks fork from a server that imported nerfstudio once (spawning re-imports it per rank).
FAST_START = dict(start_method="forkserver", preload=("landmark_plugin.gaussians.frame", "_retina_dist_helpers"))

TOL = dict(rtol=0.0, atol=1e-5)  # the bound; float64 keeps the real error near 1e-12
STEPS, BATCH = 5, 2


def tree_depth_for(world_size: int) -> int:
    """The tiny scene's tree: depth 2 (4 leaves), deeper when there are more ranks than leaves."""
    return max(2, math.ceil(math.log2(world_size)))


def _train_worker(comm, steps: int, batch_size: int, depth: int = 2):
    from landmark_plugin.core.schedule import Parts
    from landmark_plugin.gaussians.rows import owner_ranks, shard_
    from landmark_plugin.gaussians.frame import RetinaFrame

    torch.set_default_dtype(torch.float64)
    model, cameras = make_model(depth=depth), make_cameras()
    parts = Parts.of(model.config.tree_depth, comm.world_size)
    ids = torch.nonzero(owner_ranks(model, parts) == comm.rank).flatten()
    shard_(comm, model, parts)
    sharded = RetinaFrame(comm, model)
    optimizers = make_optimizers(model)
    model.optimizers = optimizers
    queue = list(range(NUM_CAMERAS)) * 2
    records = []
    for step in range(steps):
        model.step = step
        pool = queue[:batch_size]
        size, visible, owners = sharded.plan_batch(cameras[torch.tensor(pool)], batch_size, max_load=16)
        batch, queue = pool[:size], queue[size:]
        losses, _, outputs = sharded.batch_loss(
            cameras[torch.tensor(batch)], visible, owners, lambda b: {"image": target_image(batch[b])}
        )
        losses["main_loss"].backward()
        record = {"loss": float(losses["main_loss"]), "batch": batch}
        record["images"] = {batch[b]: out["rgb"].detach() for b, out in outputs.items()}
        if step == 0:
            record["grads"] = {n: p.grad.clone() for n, p in model.gauss_params.items()}
        records.append(record)
        step_optimizers(model, optimizers)
    params = {n: p.detach().clone() for n, p in model.gauss_params.items()}
    return {"ids": ids, "records": records, "params": params}


def _reference_worker(comm, depth: int = 2):
    torch.set_default_dtype(torch.float64)
    try:
        model, cameras = make_model(depth=depth), make_cameras()
        optimizers = make_optimizers(model)
        model.optimizers = optimizers
        records = []
        for step in range(STEPS):
            model.step = step
            batch = [(step * BATCH + k) % NUM_CAMERAS for k in range(BATCH)]
            loss, images = reference_step(model, cameras, batch)
            record = {"loss": loss, "images": dict(zip(batch, images)), "batch": batch}
            if step == 0:
                record["grads"] = {n: p.grad.clone() for n, p in model.gauss_params.items()}
            records.append(record)
            step_optimizers(model, optimizers)
        return records, {n: p.detach().clone() for n, p in model.gauss_params.items()}
    finally:
        torch.set_default_dtype(torch.float32)


@functools.lru_cache(maxsize=None)
def _reference(tmp_dir, depth: int = 2):
    """The single-process run, in a child process (the test process stays free of autograd)."""
    return run_ranks(_reference_worker, 1, tmp_dir / f"reference-depth{depth}", args=(depth,), timeout_s=120,
                     **FAST_START)[0]


@pytest.mark.parametrize("world_size", gloo_world_sizes())
def test_sharded_training_equals_single_process(tmp_path, world_size):
    depth = tree_depth_for(world_size)
    results = run_ranks(_train_worker, world_size, tmp_path, args=(STEPS, BATCH, depth),
                        timeout_s=60 * max(2, world_size), **FAST_START)
    ref_records, ref_params = _reference(tmp_path.parent, depth)
    ids = torch.cat([r["ids"] for r in results])
    assert torch.equal(torch.sort(ids).values, torch.arange(ids.numel())), "every Gaussian on exactly one rank"
    assert all(r["ids"].numel() > 0 for r in results), "the tiny scene should give every rank Gaussians"
    for step, ref in enumerate(ref_records):
        for rank_result in results:
            got = rank_result["records"][step]
            assert got["batch"] == ref["batch"]
            assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        images = {i: img for r in results for i, img in r["records"][step]["images"].items()}
        assert sorted(images) == sorted(ref["images"]), "every camera composited by exactly one owner"
        for i, image in images.items():
            torch.testing.assert_close(image, ref["images"][i], **TOL)
    for name in ref_params:
        grads = torch.cat([r["records"][0]["grads"][name] for r in results])
        torch.testing.assert_close(grads, ref_records[0]["grads"][name][ids], **TOL)
        params = torch.cat([r["params"][name] for r in results])
        torch.testing.assert_close(params, ref_params[name][ids], **TOL)
