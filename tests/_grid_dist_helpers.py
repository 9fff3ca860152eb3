"""Shared pieces of the distributed landmark-grid tests: a tiny float64 model identical on every
process, ray batches per (step, data-parallel rank), one training step, and the workers that
spawned processes run (importable by module path)."""

from __future__ import annotations

from typing import Dict, List

import torch

AABB = torch.tensor([[-1.0, -1.0, -0.25], [1.0, 1.0, 0.25]])
NUM_IMAGES = 4
RAYS = 12
STEPS = 5
LRS = {"grids": 2e-2, "decoder": 1e-2, "proposal_networks": 2e-2}


def make_model(parallel: str = "none", model_parallel_size=None, seed: int = 0, sampler: str = "proposal"):
    """A float64 landmark-grid model: 2x2 blocks of 4 cells (2 levels), 4 components per factor
    set (so 2 and 4 ranks divide blocks, channels and cells), proposal grids of 2 and 4 cells;
    ``sampler occupancy``: an 8-cell occupancy grid updated every step (half its cells empty);
    ``proposal-linf``: the proposal sampler with the field contracted (``field.contraction linf``)."""
    from nerfstudio.data.scene_box import SceneBox

    from landmark_plugin.grid.field import MultiBranchGridFieldConfig
    from landmark_plugin.grid.model import LandmarkGridModelConfig
    from landmark_plugin.grid.occupancy import OccupancyConfig

    contraction = "linf" if sampler.endswith("-linf") else "none"
    sampler = sampler.removesuffix("-linf")
    config = LandmarkGridModelConfig(
        field=MultiBranchGridFieldConfig(
            blocks=(2, 2), cells=4, level_divisors=(1, 2), density_components=4, appearance_components=4,
            appearance_dim=6, appearance_embed_dim=3, mlp_layer_width=16, feature_backend="torch",
            contraction=contraction,  # type: ignore[arg-type]
        ),
        proposal_cells=(2, 4),
        proposal_components=4,
        num_proposal_samples_per_ray=(10, 8),
        num_nerf_samples_per_ray=6,
        parallel=parallel,
        model_parallel_size=model_parallel_size,
        sampler=sampler,  # type: ignore[arg-type]
        # occ_thre 1: cells below the grid's mean are empty, so a fresh (near-uniform) field skips some
        occupancy=OccupancyConfig(cells=8, march_samples=40, update_every=1, warmup_steps=2, occ_thre=1.0),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = config.setup(scene_box=SceneBox(aabb=AABB.clone()), num_train_data=NUM_IMAGES)
    model = model.to(torch.float64)
    model.train()
    return model


def rays(step: int, stream: int, count: int = RAYS):
    """Rays from above into the box (float64), different per (step, stream)."""
    from nerfstudio.cameras.rays import RayBundle

    gen = torch.Generator().manual_seed(1000 * step + stream)
    origins = torch.tensor([0.0, 0.0, 1.2]) + torch.tensor([0.8, 0.8, 0.1]) * torch.randn(count, 3, generator=gen)
    down = torch.tensor([0.0, 0.0, -1.0]) + 0.5 * torch.randn(count, 3, generator=gen)
    return RayBundle(
        origins=origins.double(),
        directions=torch.nn.functional.normalize(down, dim=-1).double(),
        pixel_area=torch.full((count, 1), 1e-4, dtype=torch.float64),
        camera_indices=torch.randint(0, NUM_IMAGES, (count, 1), generator=gen),
    )


def target(step: int, stream: int, count: int = RAYS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5000 + 1000 * step + stream)
    return torch.rand(count, 3, generator=gen, dtype=torch.float64)


def losses_of(model, step: int, stream: int):
    """nerfstudio's training losses of one ray batch, its randomness seeded by (step, stream)."""
    from landmark_plugin.grid.parallel import same_randomness, step_seed

    if model.occupancy is not None:  # the trainer's callback: collective under model parallelism
        model.occupancy.update(step, model.field.density_fn)
    with same_randomness(step_seed(0, step, stream)):
        outputs = model(rays(step, stream))
        batch = {"image": target(step, stream)}
        metrics = model.get_metrics_dict(outputs, batch)
        losses = model.get_loss_dict(outputs, batch, metrics)
    return outputs, losses, metrics


def make_optimizers(model) -> List[torch.optim.Adam]:
    groups = model.get_param_groups()
    return [torch.optim.Adam(groups[name], lr=lr, eps=1e-15) for name, lr in LRS.items()]


def step_optimizers(optimizers) -> None:
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def eval_rgb(model) -> torch.Tensor:
    """Rendered colours of fixed eval rays (eval mode: mean appearance code, no jitter)."""
    model.eval()
    with torch.no_grad():
        out = model(rays(99, 0, count=16))["rgb"].clone()
    model.train()
    return out


def named(model, grads: bool = False) -> Dict[str, torch.Tensor]:
    """Parameters (or their gradients) by pipeline-state key."""
    return {
        "_model." + n: (p.grad if grads else p).detach().clone()
        for n, p in model.named_parameters()
        if not grads or p.grad is not None
    }


# ---- workers ------------------------------------------------------------------------------
def distributed_worker(comm, parallel: str, model_parallel_size: int, steps: int = STEPS, sampler: str = "proposal"):
    """One rank: the sharded model trained ``steps`` steps on its data-parallel group's rays."""
    from landmark_plugin.grid.model import SHARDED_LOSSES
    from landmark_plugin.grid.parallel import GridPlan
    from landmark_plugin.distributed.collectives import all_gather_objects
    from landmark_plugin.grid.sharded_state import merge_grid_shards, shard_grid_state, sharded_keys

    torch.set_default_dtype(torch.float64)
    model = make_model(parallel, model_parallel_size, sampler=sampler)
    plan = GridPlan.create(comm, model)
    plan.shard_model_(model)
    optimizers = make_optimizers(model)
    records = []
    for step in range(steps):
        outputs, losses, metrics = losses_of(model, step, plan.dp.rank)
        losses, metrics = plan.report(losses, metrics, SHARDED_LOSSES)
        total = sum(losses.values())
        total.backward()
        plan.sync_gradients_(model)
        record = {"loss": float(total), "rgb": outputs["rgb"].detach().clone(), "psnr": float(metrics["psnr"])}
        if step == 0:
            record["grads"] = named(model, grads=True)
        records.append(record)
        step_optimizers(optimizers)
    result = {
        "mp_rank": plan.mp.rank, "dp_rank": plan.dp.rank, "layout": plan.layout.to_dict(),
        "keys": sharded_keys(plan, model), "records": records, "params": named(model), "eval_rgb": eval_rgb(model),
    }
    # the merged checkpoint of the first data-parallel group's shards, rendered by a fresh
    # one-process model on rank 0 (a shard here is what GridTrainer saves, minus optimisers)
    shard = {"pipeline": {"_model." + k: v for k, v in model.state_dict().items()}, "optimizers": {},
             "param_names": {}, "grid_layout": result["layout"], "grid_sharded_keys": result["keys"]}
    shards = all_gather_objects(comm, shard)[: plan.layout.parts]
    merged = merge_grid_shards(shards)
    if comm.is_main:
        result["merged_eval_rgb"] = merged_render(parallel, merged["pipeline"], sampler)
    # ... and cut again for this rank (a one-process checkpoint loaded on these ranks): its own state
    recut = shard_grid_state(merged, plan.layout, plan.mp.rank, result["keys"], {})["pipeline"]
    result["recut_differs"] = [k for k, v in shard["pipeline"].items() if not torch.equal(recut[k], v)]
    return result


def reference_worker(comm, parallel: str, data_parallel: int, steps: int = STEPS, sampler: str = "proposal"):
    """One process, the whole model: the mean loss over the ``data_parallel`` batches of each step."""
    torch.set_default_dtype(torch.float64)
    model = make_model(parallel, sampler=sampler)
    optimizers = make_optimizers(model)
    records = []
    for step in range(steps):
        total, rgbs, psnrs = 0.0, [], []
        for stream in range(data_parallel):
            outputs, losses, metrics = losses_of(model, step, stream)
            total = total + sum(losses.values()) / data_parallel
            rgbs.append(outputs["rgb"].detach().clone())
            psnrs.append(float(metrics["psnr"]))
        total.backward()
        record = {"loss": float(total), "rgb": rgbs, "psnr": sum(psnrs) / data_parallel}
        if step == 0:
            record["grads"] = named(model, grads=True)
        records.append(record)
        step_optimizers(optimizers)
    return {"records": records, "params": named(model), "eval_rgb": eval_rgb(model)}


def merged_render(parallel: str, state: Dict[str, torch.Tensor], sampler: str = "proposal") -> torch.Tensor:
    """A fresh one-process model loading a merged checkpoint's pipeline state: its eval render."""
    model = make_model(parallel, sampler=sampler)
    model.load_state_dict({k[len("_model.") :]: v for k, v in state.items()})
    return eval_rgb(model)
