"""Model-parallel landmark-grid on 2, 3 and 4 gloo CPU processes equals the single-process model.

For every strategy (branch, plane, channel; and data parallel on top), each rank holds its share
of the field and proposal grids.  Compared with one process holding the whole model (float64,
same initial parameters, same rays and jitter): the rendered colours, the loss and every
gradient at step 0 (each rank's shard against the same cut of the single-process gradient, so
every copy of a shared texel is checked), every parameter after 5 Adam steps, an eval render,
the render of the merged checkpoint (merged and rendered by a fresh model on rank 0), and the
merged checkpoint cut again for every rank (a one-process checkpoint loaded on several ranks).
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import gloo_world_sizes

from landmark_plugin.core.grid_parallel import GridLayout, shard_factor
from landmark_plugin.distributed.launch import run_ranks

# Ranks fork from a server that imported nerfstudio's model stack once (spawning re-imports it per
# rank, ~8 s each; the model imports torchmetrics lazily, so that is preloaded too).
PRELOAD = ("landmark_plugin.grid.model", "landmark_plugin.grid.parallel", "torchmetrics.image", "torchmetrics.functional",
           "_grid_dist_helpers")
FAST_START = dict(start_method="forkserver", preload=PRELOAD)
TOL = dict(rtol=0.0, atol=1e-5)  # the bound; float64 keeps the real error near 1e-12

CASES = [  # (strategy, world size, model-parallel size)
    ("branch", 2, 2),
    ("branch", 4, 4),
    ("plane", 2, 2),
    ("plane", 4, 4),
    ("plane", 3, 3),  # 3 does not divide the 4-cell planes: 8 sub-planes, 3, 3 and 2 per rank
    ("branch", 3, 3),  # 4 blocks: 2, 1 and 1 per rank
    ("channel", 3, 3),  # 4 components: 2, 1 and 1 per rank
    ("channel", 2, 2),
    ("channel", 4, 4),
    ("branch", 4, 2),  # 2 model-parallel groups x data parallel 2
    ("channel", 4, 2),
    ("none", 2, 1),  # pure data parallel
]
if 8 in gloo_world_sizes():  # issue 9's 8-process check: 4-way model parallel x 2-way data parallel
    CASES += [("branch", 8, 4), ("plane", 8, 4), ("channel", 8, 4), ("none", 8, 1)]


OCCUPANCY_CASES = [("branch", 2, 2), ("plane", 2, 2), ("channel", 2, 2)]
"""``sampler occupancy`` (grid updates every step, a collective density evaluation), model parallel only:
the reference updates once per batch, so it repeats a data-parallel run only for one batch a step."""


CONTRACTION_CASES = [("branch", 2, 2), ("plane", 2, 2), ("channel", 2, 2)]
"""``field.contraction linf`` (rays to the far plane, every sample routed through the contracted grid)."""


@functools.lru_cache(maxsize=None)
def _reference(tmp_dir, strategy: str, data_parallel: int, sampler: str = "proposal"):
    """The single-process run, in a child process (the test process stays free of nerfstudio)."""
    from _grid_dist_helpers import STEPS, reference_worker

    out = tmp_dir / f"reference-{strategy}-{data_parallel}-{sampler}"
    return run_ranks(reference_worker, 1, out, args=(strategy, data_parallel, STEPS, sampler), timeout_s=300,
                     **FAST_START)[0]  # fmt: skip


def _cut(value: torch.Tensor, key: str, keys, layout: GridLayout, rank: int) -> torch.Tensor:
    kind = keys.get(key)
    return shard_factor(value, kind, layout, rank) if kind else value


@pytest.mark.parametrize("strategy,world_size,model_parallel", CASES)
def test_sharded_training_equals_single_process(tmp_path, strategy, world_size, model_parallel):
    _check_sharded_equals_single(tmp_path, strategy, world_size, model_parallel, "proposal")


@pytest.mark.parametrize("strategy,world_size,model_parallel", OCCUPANCY_CASES)
def test_sharded_occupancy_training_equals_single_process(tmp_path, strategy, world_size, model_parallel):
    _check_sharded_equals_single(tmp_path, strategy, world_size, model_parallel, "occupancy")


@pytest.mark.parametrize("strategy,world_size,model_parallel", CONTRACTION_CASES)
def test_sharded_contracted_training_equals_single_process(tmp_path, strategy, world_size, model_parallel):
    _check_sharded_equals_single(tmp_path, strategy, world_size, model_parallel, "proposal-linf")


def _check_sharded_equals_single(tmp_path, strategy: str, world_size: int, model_parallel: int, sampler: str):
    from _grid_dist_helpers import STEPS, distributed_worker

    results = run_ranks(distributed_worker, world_size, tmp_path, args=(strategy, model_parallel, STEPS, sampler),
                        timeout_s=300, **FAST_START)  # fmt: skip
    data_parallel = world_size // model_parallel
    ref = _reference(tmp_path.parent, strategy, data_parallel, sampler)
    layout = GridLayout.from_dict(results[0]["layout"])
    assert (layout.strategy, layout.parts) == (strategy, model_parallel)
    assert [(r["dp_rank"], r["mp_rank"]) for r in results] == [divmod(i, model_parallel) for i in range(world_size)]
    if model_parallel > 1:  # the model really is split: shards smaller than the whole
        keys = results[0]["keys"]
        assert keys, "no factor tensor is sharded"
        for key in keys:
            assert results[0]["params"][key].numel() < ref["params"][key].numel()
        if layout.shards_blocks:  # each rank holds its block_counts() (uneven where M does not divide them)
            plane_key = next(k for k, kind in keys.items() if kind == "plane")
            assert [r["params"][plane_key].shape[0] for r in results[:model_parallel]] == layout.block_counts()
    assert all(not r["recut_differs"] for r in results), "merged then cut again: each rank's own state"
    for rank_result in results:
        mp_rank, dp_rank, keys = rank_result["mp_rank"], rank_result["dp_rank"], rank_result["keys"]
        for step, (got, want) in enumerate(zip(rank_result["records"], ref["records"])):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), f"loss at step {step}"
            assert got["psnr"] == pytest.approx(want["psnr"], abs=1e-5), f"logged psnr at step {step}"
            torch.testing.assert_close(got["rgb"], want["rgb"][dp_rank], **TOL)
        grads, ref_grads = rank_result["records"][0]["grads"], ref["records"][0]["grads"]
        assert sorted(grads) == sorted(ref_grads), "the same parameters have gradients"
        for key, value in ref_grads.items():
            torch.testing.assert_close(grads[key], _cut(value, key, keys, layout, mp_rank), **TOL, msg=f"gradient {key}")
        for key, value in ref["params"].items():
            got = rank_result["params"][key]
            torch.testing.assert_close(got, _cut(value, key, keys, layout, mp_rank), **TOL, msg=f"parameter {key}")
        torch.testing.assert_close(rank_result["eval_rgb"], ref["eval_rgb"], **TOL)
    # the merged checkpoint renders what the ranks rendered
    torch.testing.assert_close(results[0]["merged_eval_rgb"], results[0]["eval_rgb"], **TOL)
