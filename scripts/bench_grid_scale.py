#!/usr/bin/env python
"""landmark-grid at scale on 1 vs N GPUs (issues 6 and 10): throughput, memory, the largest grid, 4K renders.

One driver runs every phase as its own process (``python`` for one rank, ``torchrun`` for N, or
ranks forked from a fork server with ``--launcher spawn``) under one time budget, records each
phase and prints the side-by-side table of ratios last:

  gen          a synthetic city (data/city.py: --city-blocks^2 blocks of 3x3 lots) of --num-images
               images at --width x --height, every 8th held out, ray cast on the CPU's cores; the
               scene box the grid tiles (grid/datamanager.py's scene_bounds of its points and
               cameras).  Reused when its settings match.  csrc/ is built meanwhile.
  train-w1     landmark-grid on one GPU (the whole model) at --grid-params grid parameters: rays/s
               over --steps steps after --warmup, peak memory and grid memory (planes and lines,
               their gradients and Adam state); PSNR on --eval-views held-out views; then the
               memory curve: one step at each of --probe-fractions of the GPU's memory.
  train-wN-S   the same on N ranks with --pipeline.model.parallel S (a model-parallel group of all
               N ranks) at the same total grid, for each S of --strategies; the curve for
               --curve-strategy.
  verify-wN    one training step at --verify-fraction of the largest grid the curve predicts
               (N = 1, and N = --gpus with --curve-strategy), then frames/s of rendering
               --render-width x --render-height frames from that model through
               ``model.get_outputs_for_camera`` (what ns-render calls), training state dropped as
               ns-render holds none; on N ranks every rank renders the same camera in lockstep
               (the model-parallel forward is collective).

The model is the landmark-grid method config, with --grid-blocks^2 blocks, shared z lines (plane
parallel needs them; every run has them, so all runs train the same model), no upsampling
schedule, the scene box from gen, and ``--rays`` rays per step.  A grid of a given size is made as
landmark-grid training makes it: built at 1 / 2^--doublings of its cells, sharded over the ranks,
then grown --doublings times (``model.upsample_grids``) on the device, so no rank ever holds the
whole grid at full size.  The cells are the largest whose grid has at most the requested number
of parameters (counted exactly on a shape-only copy of the field, grown the same way; on one rank
the model's own count is checked against it).  Steps are numbered from 10 000 (the proposal
sampler's steady state).  A phase that fails (out of memory included) is recorded with its error
and the driver goes on; a phase that does not fit the remaining budget is skipped.  Results:
--out/bench_grid_scale.json, --out/memory_vs_grid.png, --out/phases/*.json.

    python -P scripts/bench_grid_scale.py --out OUT --gpus 2                   # the device run
    python scripts/bench_grid_scale.py --smoke --launcher spawn --out OUT      # CPU, gloo, tiny, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landmark_plugin.bench_phases import (
    GB,
    PhaseDriver,
    Record,
    build_kernels_in_background,
    cuda_peak,
    fit_to_capacity,
    joined,
    plot_memory_curves,
    run_phase_rank,
    timed_steps,
)

SCRIPT = Path(__file__).resolve()
BASE_STEP = 10_000
NEVER = 10**9
PRELOAD = ("landmark_plugin.grid.distributed_pipeline", "landmark_plugin.method_configs.landmark_grid")
TARGETS = {"rays_per_s": 1.6, "grid_memory": 0.55, "max_grid": 1.8, "max_grid_params": 1e9}
"""Issue 6: plane / branch rays/s on N GPUs >= 1.6x one GPU's; channel grid memory per GPU <=
0.55x; largest trainable grid >= 1.8x.  Issue 10: >= 1e9 grid parameters on N GPUs."""
THROUGHPUT_TARGETS = ("plane", "branch")
"""The strategies the rays/s target is set for (channel is the memory strategy)."""
MIN_PHASE_S = {"gen": 20, "train": 30, "verify": 30}
"""Below this much budget left a phase is skipped (it could not finish)."""
PHASE_CAP_S = {"gen": 150, "train": 100, "verify": 110}
"""The most one phase may take, so that a slow one leaves time to the next."""


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-grid-scale"), help="JSON, PNG and phase records")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-grid-scale"), help="the generated city, run folders")
    p.add_argument("--gpus", type=int, default=2, help="ranks of the multi-GPU runs (1: the single-GPU side only)")
    p.add_argument("--launcher", choices=("torchrun", "spawn"), default="torchrun",
                   help="torchrun / python subprocesses, or forked ranks of this process (CPU smoke runs)")
    p.add_argument("--budget-s", type=float, default=540.0, help="every phase ends within this")
    # the scene
    p.add_argument("--num-images", type=int, default=2000, help="posed images, every 8th held out")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--city-blocks", type=int, default=4, help="city blocks along x and y (3x3 lots each)")
    p.add_argument("--seed-points", type=int, default=20_000, help="sparse_pc.ply: the scene box is derived from it")
    # the model and its steps
    p.add_argument("--strategies", nargs="+", default=["plane", "branch", "channel"],
                   choices=("none", "branch", "plane", "channel"), help="model parallelism of the N-rank runs")
    p.add_argument("--curve-strategy", default="channel", choices=("branch", "plane", "channel"),
                   help="the N-rank memory curve's and largest grid's strategy")
    p.add_argument("--grid-blocks", type=int, default=8, help="grid blocks along x and y")
    p.add_argument("--grid-params", type=float, default=1e9, help="grid parameters (all ranks) of the throughput runs")
    p.add_argument("--doublings", type=int, default=3, help="times a grid is grown to its size on the device")
    p.add_argument("--rays", type=int, default=4096, help="rays per step (per data-parallel group)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="timed steps (a multiple of 5: proposal updates)")
    p.add_argument("--eval-views", type=int, default=16, help="held-out views of the PSNR")
    p.add_argument("--probe-fractions", type=float, nargs="+", default=[0.25, 0.45, 0.65],
                   help="the memory curve's points: fractions of a GPU's memory, at the bytes per grid "
                        "parameter of the throughput run")
    p.add_argument("--verify-fraction", type=float, default=0.9)
    p.add_argument("--capacity-mb", type=float, default=None,
                   help="memory per rank to extrapolate to (default: the GPU's free memory; CPU: required)")
    p.add_argument("--render-width", type=int, default=3840)
    p.add_argument("--render-height", type=int, default=2160)
    p.add_argument("--render-frames", type=int, default=2, help="timed frames (after a small warm-up frame)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny scene, grids, steps and frames")
    # internal: what the driver passes to a phase
    p.add_argument("--phase", choices=("gen", "train", "verify"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="none", help=argparse.SUPPRESS)
    p.add_argument("--probes", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--count", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-csrc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        # sizes at which a CPU step takes a fraction of a second
        args.num_images, args.width, args.height, args.city_blocks, args.seed_points = 24, 32, 24, 2, 300
        args.grid_blocks, args.grid_params, args.doublings, args.rays = 2, 8e4, 1, 64
        args.warmup, args.steps, args.eval_views = 1, 2, 2
        args.render_width, args.render_height, args.render_frames = 64, 48, 1
        args.probe_fractions, args.capacity_mb = [0.3, 0.6], args.capacity_mb or 16.0
    return args


def tag_of(args, world: int) -> str:
    """The phase's name in the records: gen, train-w1, train-w2-plane, verify-w2-channel, ..."""
    if args.phase == "gen":
        return "gen"
    return f"{args.phase}-w{world}" + (f"-{args.strategy}" if world > 1 else "")


# ---- gen: the scene --------------------------------------------------------------------------
def city_config(args):
    from landmark_plugin.data.city import CityConfig

    return CityConfig(seed=0, blocks=(args.city_blocks, args.city_blocks), lots_per_block=(3, 3),
                      num_images=args.num_images, width=args.width, height=args.height,
                      num_points=args.seed_points, test_every=8)


def scene_marker(args) -> Path:
    return args.work / "city" / "bench.json"


def city_settings(args) -> dict[str, Any]:
    """The city's settings as its JSON record holds them."""
    return json.loads(json.dumps(dataclasses.asdict(city_config(args))))


def scene(args) -> dict[str, Any] | None:
    """The generated scene's record (its city settings and box), if it matches the arguments."""
    marker = scene_marker(args)
    if not marker.exists():
        return None
    recorded = json.loads(marker.read_text())
    return recorded if recorded["city"] == city_settings(args) else None


def scene_box(city: Path) -> list[float]:
    """The box landmark-grid derives from the scene's points and training cameras (xmin ymin zmin
    xmax ymax zmax), in the world frame (the benchmark's dataparser keeps the generated world as it is)."""
    from landmark_plugin.data.ply import read_points_ply
    from landmark_plugin.grid.datamanager import scene_bounds

    xyz, _ = read_points_ply(city / "sparse_pc.ply")
    transforms = json.loads((city / "transforms.json").read_text())
    train = set(transforms["train_filenames"])
    poses = [f["transform_matrix"] for f in transforms["frames"] if f["file_path"] in train]
    centers = torch.tensor(poses, dtype=torch.float32)[:, :3, 3]
    box = scene_bounds(torch.zeros(2, 3), points=torch.from_numpy(xyz), camera_centers=centers)
    return box.reshape(-1).tolist()


def phase_gen(args, say: Callable[[str], None]) -> dict[str, Any]:
    """The city under ``--work/city`` and its record (settings and scene box)."""
    from landmark_plugin.data.city import write_city

    build = build_kernels_in_background() if torch.cuda.is_available() and not args.smoke else None
    ready = scene(args)
    if ready is not None:
        say(f"reusing {args.work / 'city'}")
        return {"reused": True, "csrc": joined(build, say), **ready}
    city = args.work / "city"
    if city.exists():  # another scene: write_city would mix its files with this one's
        import shutil

        shutil.rmtree(city)
    config = city_config(args)
    began = time.time()
    workers = min(16, os.cpu_count() or 1)
    write_city(city, config, workers=workers)
    say(f"wrote {config.num_images} images of {config.width}x{config.height} in {time.time() - began:.1f} s "
        f"({workers} processes)")
    record = {"city": city_settings(args), "box": scene_box(city),
              "seconds": round(time.time() - began, 1)}
    scene_marker(args).write_text(json.dumps(record))
    return {"reused": False, "csrc": joined(build, say), **record}


# ---- the grid's size -------------------------------------------------------------------------
def twin_factors(blocks, mode: str, cells: int, level_divisors, channels: int, aabb: torch.Tensor):
    """Shape-only (meta device) grid factors as a landmark-grid field makes them: a density field
    of the given blocks, levels and cells with ``channels`` components."""
    from landmark_plugin.grid.field import GridDensityFieldConfig

    config = GridDensityFieldConfig(blocks=tuple(blocks), mode=mode, cells=cells, level_divisors=tuple(level_divisors),
                                    density_components=channels, shared_line=True)
    with torch.device("meta"):
        return config.setup(aabb=aabb).density


def grown(shape: torch.Size, doublings: int) -> tuple[int, ...]:
    """A plane's or line's shape after ``doublings`` of BlockFactors.upsample (texels: (s - 1) * 2 + 1)."""
    return (shape[0], *((s - 1) * 2**doublings + 1 for s in shape[1:-1]), shape[-1])


def field_grid(field_config, aabb: torch.Tensor, cells: int, doublings: int) -> tuple[int, list[tuple[int, int]]]:
    """(grid parameters once grown ``doublings`` times, x-y cells of every plane as built) of the
    field at ``cells``.  The density and appearance factors share their shapes but for the
    channels, so one twin with both components counts them exactly."""
    channels = field_config.density_components + field_config.appearance_components
    twin = twin_factors(field_config.blocks, field_config.mode, cells, field_config.level_divisors, channels, aabb)
    total = sum(int(np.prod(grown(p.shape, doublings))) for p in twin.parameters())
    return total, plane_cells(twin)


def plane_cells(factors) -> list[tuple[int, int]]:
    """x-y cells of every plane of a BlockFactors (what plane parallelism cuts)."""
    return [(p.shape[2] - 1, p.shape[1] - 1) for p in factors.planes]


def grid_count(field) -> int:
    """Grid parameters of a field (its share on a model-parallel rank): its planes and lines."""
    return sum(p.numel() for p in field.grid_parameters())


def splits(parts: int, cells: list[tuple[int, int]]) -> bool:
    """Whether plane parallelism over ``parts`` ranks can cut every x-y plane of these cells into
    ``parts`` equal sub-planes (every rank then holds the same share, so the strategies compare
    on equal terms; uneven cuts train too, but would bias the comparison)."""
    from landmark_plugin.core.grid_parallel import equal_splits

    return bool(equal_splits(parts, cells))


def proposal_planes(model_config, aabb: torch.Tensor, cells: tuple[int, ...]) -> list[tuple[int, int]]:
    """x-y cells of the proposal grids' planes at ``cells`` (one grid per entry, one level each)."""
    field = model_config.field
    return [xy for c in cells for xy in plane_cells(twin_factors(field.blocks, field.mode, c, (1,), 1, aabb))]


def proposal_cells_for(model_config, aabb: torch.Tensor, parts: int) -> tuple[int, ...]:
    """The proposal grids' cells, raised together by the least that lets plane parallelism over
    ``parts`` ranks cut their planes alike (rounding of a block's cells can make them odd)."""
    for bump in range(64):
        cells = tuple(c + bump for c in model_config.proposal_cells)
        if parts == 1 or splits(parts, proposal_planes(model_config, aabb, cells)):
            return cells
    raise ValueError(f"no proposal cells near {model_config.proposal_cells} split into {parts} sub-planes per block")


def cells_for(target: float, model_config, aabb: torch.Tensor, doublings: int, parts: int) -> tuple[int, int]:
    """(starting cells, grid parameters): the largest field grid of at most ``target`` parameters
    (else the smallest above) whose planes, as built, ``parts`` ranks can cut alike with the
    proposal grids' (the plan is made before the grid grows; growing keeps the cut), so that
    every strategy trains the same grid."""
    field = model_config.field
    proposals = proposal_planes(model_config, aabb, model_config.proposal_cells)

    def count(cells: int) -> int:
        return field_grid(field, aabb, cells, doublings)[0]

    low, high = 4, 8  # four cells at least: the coarse level divides them by 4
    while count(high) <= target:
        low, high = high, high * 2
    while high - low > 1:  # the count grows with the cells: the last cells within the target
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) <= target else (low, middle)
    for cells in [*range(low, 3, -1), *range(low + 1, 4 * low + 64)]:
        total, planes = field_grid(field, aabb, cells, doublings)
        if parts == 1 or splits(parts, planes + proposals):
            return cells, total
    raise ValueError(f"no grid near {target:.3g} parameters splits into {parts} sub-planes per block")


# ---- one rank's trainer ----------------------------------------------------------------------
def trainer_config(args, strategy: str, box: list[float], tag: str):
    """The landmark-grid method config for the benchmark (see the module doc)."""
    from landmark_plugin.method_configs.landmark_grid import landmark_grid_config

    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig

    config = landmark_grid_config()
    config.output_dir, config.experiment_name, config.timestamp = args.work / "runs", tag, "bench"
    config.vis = "tensorboard"
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = NEVER
    config.steps_per_save = NEVER
    config.machine.device_type = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    pipeline = config.pipeline
    pipeline.collective_timeout_s = 180.0  # a rank that died ends its peers well within the budget
    datamanager = pipeline.datamanager
    city = args.work / "city"
    datamanager.data = city
    # the generated world is the training world (the scene box is in it)
    datamanager.dataparser = SyntheticCityDataParserConfig(data=city, city=city_config(args), auto_scale_poses=False)
    datamanager.scene_bounds = tuple(box)
    datamanager.train_num_rays_per_batch = datamanager.eval_num_rays_per_batch = args.rays
    model = pipeline.model
    model.parallel = strategy
    model.upsample_fractions = ()  # the grid keeps its size while it is measured
    model.field.blocks = (args.grid_blocks, args.grid_blocks)
    model.field.shared_line = True
    if args.no_csrc:
        model.field.feature_backend = "torch"
    if args.smoke:  # tiny samplers (tests/_trainers.py's)
        model.proposal_cells = (4, 8)
        model.num_proposal_samples_per_ray = (16, 8)
        model.num_nerf_samples_per_ray = 8
    return config


def frame_camera(cameras, index: int, width: int, height: int):
    """Camera ``index`` as a ``width`` x ``height`` frame with its horizontal field of view."""
    from nerfstudio.cameras.cameras import Cameras

    camera = cameras[index : index + 1]
    scale = width / float(camera.width[0, 0])
    return Cameras(camera_to_worlds=camera.camera_to_worlds, fx=camera.fx * scale, fy=camera.fy * scale,
                   cx=torch.full_like(camera.cx, width / 2), cy=torch.full_like(camera.cy, height / 2),
                   width=width, height=height, camera_type=camera.camera_type)


class Bench:
    """One rank: a landmark-grid trainer over the generated city, remade for every grid size."""

    def __init__(self, args, rank: int, world: int, local_rank: int, say: Callable[[str], None]):
        self.args, self.world, self.local_rank, self.say = args, world, local_rank, say
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.device = torch.device("cuda", local_rank) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.cuda.init()
        self.capacity = int(args.capacity_mb * 2**20) if args.capacity_mb else (
            torch.cuda.mem_get_info(self.device)[0] if self.cuda else 0)
        self.box = json.loads(scene_marker(args).read_text())["box"]
        self.strategy = args.strategy if world > 1 else "none"
        self.tag = tag_of(args, world)
        self.trainer = None
        self.cells = self.count = 0

    # ---- the model ----------------------------------------------------------------------------
    def install(self, target: float) -> None:
        """A fresh trainer whose grid has at most ``target`` parameters (all ranks)."""
        self.release()
        config = trainer_config(self.args, self.strategy, self.box, self.tag)
        model_config = config.pipeline.model
        parts = max(1, self.args.gpus)  # every run's grid splits for plane parallelism: the same grid everywhere
        aabb = torch.tensor(self.box, dtype=torch.float32).view(2, 3)
        model_config.proposal_cells = proposal_cells_for(model_config, aabb, parts)
        self.cells, self.count = cells_for(target, model_config, aabb, self.args.doublings, parts)
        model_config.field.cells = self.cells
        torch.manual_seed(0)
        trainer = config.setup(local_rank=self.local_rank, world_size=self.world)
        trainer.setup()
        model = trainer.pipeline.model
        for _ in range(self.args.doublings):  # grown on the device, each rank its share
            model.upsample_grids(trainer.optimizers)
        if self.world == 1 and grid_count(model.field) != self.count:
            raise RuntimeError(f"the model has {grid_count(model.field)} grid parameters, its twin {self.count}")
        self.trainer = trainer
        if self.cuda:  # the grids' smaller predecessors: out of the reserved memory the curve reads
            torch.cuda.empty_cache()

    def release(self) -> None:
        """Free the trainer (its pipeline and callbacks reference each other: a collection)."""
        if self.trainer is not None:
            self.trainer = None
            self._collect()

    def _collect(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @property
    def comm(self):
        return self.trainer.pipeline.comm

    @property
    def rays_per_step(self) -> int:
        """Rays of one step over all ranks: each data-parallel group draws its own batch."""
        plan = self.trainer.pipeline.plan
        return self.args.rays * (plan.dp.world_size if plan is not None else 1)

    # ---- measuring ----------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _state_bytes(self, params) -> int:
        """Bytes of ``params``, their gradients and their optimiser state."""
        ids = {id(p) for p in params}
        total = sum(p.numel() * p.element_size() for p in params)
        total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        for optimizer in self.trainer.optimizers.optimizers.values():
            for param, state in optimizer.state.items():
                if id(param) in ids:
                    total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        return total

    def peak(self) -> dict[str, Any]:
        """This rank's peak since ``reset_peak`` (CPU: bytes of the model's parameters, gradients
        and optimiser state, a proxy that grows with the grid as device memory does)."""
        if self.cuda:
            return cuda_peak(self.device)
        size = self._state_bytes(list(self.trainer.pipeline.model.parameters()))
        return {"allocated": size, "reserved": size, "kind": "cpu tensor bytes"}

    def gathered(self, value: Any, what: str) -> list[Any]:
        from landmark_plugin.distributed.collectives import all_gather_objects

        return all_gather_objects(self.comm, value, what)

    def measure(self, warmup: int, steps: int, deadline: float | None) -> dict[str, Any]:
        """Rays/s over ``steps`` training steps after ``warmup``, every rank's peak memory and
        grid memory (its share of the planes and lines, their gradients and Adam state)."""
        trainer = self.trainer

        def step(i: int) -> int:
            trainer.run_steps(BASE_STEP + i, 1)
            return self.rays_per_step

        steps, rays, seconds = timed_steps(step, warmup, steps, deadline, self.comm, self.sync, self.reset_peak)
        field = trainer.pipeline.model.field
        return {"grid_params": self.count, "cells": self.cells, "steps": steps, "rays": rays, "seconds": seconds,
                "rays_per_s": rays / seconds, "peak_per_rank": self.gathered(self.peak(), "peak memory"),
                "grid_bytes_per_rank": self.gathered(self._state_bytes(field.grid_parameters()), "grid bytes"),
                "grid_params_per_rank": self.gathered(grid_count(field), "grid parameters")}

    def evaluate(self, views: int) -> dict[str, Any]:
        """PSNR over ``views`` held-out views spread over the eval set (ns-eval's metric: torchmetrics'
        PSNR of the full render; every rank renders the same views)."""
        from landmark_plugin.grid.parallel import same_randomness

        model = self.trainer.pipeline.model
        dataset = self.trainer.pipeline.datamanager.eval_dataset
        picks = sorted(set(np.linspace(0, len(dataset) - 1, min(views, len(dataset))).round().astype(int).tolist()))
        model.eval()
        values = []
        with torch.no_grad(), same_randomness(0, self.device):
            for index in picks:
                rgb = model.get_outputs_for_camera(dataset.cameras[index : index + 1].to(self.device))["rgb"]
                truth = dataset[index]["image"][..., :3].to(rgb)
                values.append(float(model.psnr(truth.permute(2, 0, 1)[None], rgb.permute(2, 0, 1)[None])))
        model.train()
        return {"views": len(picks), "psnr": float(np.mean(values)), "psnr_per_view": values}

    def render(self, width: int, height: int, frames: int, deadline: float | None) -> dict[str, Any]:
        """Frames/s of ``width`` x ``height`` renders of the first held-out camera through
        ``get_outputs_for_camera``, after a warm-up frame of a sixteenth of the pixels (which also
        says how many frames fit the deadline); the training state (gradients, Adam) is dropped
        first, as ns-render holds the model alone."""
        trainer = self.trainer
        model = trainer.pipeline.model
        for optimizer in trainer.optimizers.optimizers.values():
            optimizer.state.clear()
        model.zero_grad(set_to_none=True)
        self._collect()
        cameras = trainer.pipeline.datamanager.eval_dataset.cameras
        camera = frame_camera(cameras, 0, width, height).to(self.device)
        small = frame_camera(cameras, 0, max(8, width // 4), max(8, height // 4)).to(self.device)
        model.eval()

        def frame(i: int, of=camera) -> int:
            with torch.no_grad():
                model.get_outputs_for_camera(of)
            return 1

        frames, done, seconds = timed_steps(frame, 1, frames, deadline, self.comm, self.sync, self.reset_peak,
                                            warm=lambda i: frame(i, small), warm_cost=16.0)
        model.train()
        return {"width": width, "height": height, "frames": done, "seconds": seconds, "frames_per_s": done / seconds,
                "grid_params": self.count, "peak_per_rank": self.gathered(self.peak(), "render peak")}


# ---- phases (one process per rank) -----------------------------------------------------------
def probe_counts(throughput: dict[str, Any], capacities: list[int], fractions: list[float], world: int) -> list[int]:
    """Grid parameters (all ranks) of the memory curve's points: ``fractions`` of the smallest
    rank's capacity at the throughput run's bytes per grid parameter (its peak over its grid, an
    overestimate that keeps the points below the capacity)."""
    peak = max(p["reserved"] for p in throughput["peak_per_rank"])
    per_param = peak / (throughput["grid_params"] / world)
    return [int(f * min(capacities) / per_param) * world for f in fractions]


def run_probes(args, bench: Bench, record: Record, throughput: dict[str, Any], world: int, say) -> None:
    """One step at each point of the memory curve; one rank stops at its first out-of-memory,
    several end the phase (a peer would wait in a collective)."""
    from landmark_plugin.distributed.collectives import broadcast_object

    probes: list[dict[str, Any]] = []
    for count in probe_counts(throughput, record.data["setup"]["capacity_bytes"], args.probe_fractions, world):
        late = args.deadline is not None and time.time() > args.deadline - 25.0
        if broadcast_object(bench.comm, late, what="phase deadline"):
            probes.append({"grid_params": count, "skipped": "time budget"})
            record.put("probes", probes)
            break
        try:
            bench.install(count)
            probes.append(bench.measure(0, 2, None))
        except torch.OutOfMemoryError as error:
            if world > 1:
                raise
            probes.append({"grid_params": count, "oom": str(error).splitlines()[0]})
            bench.release()
            break
        finally:
            record.put("probes", probes)
        say(f"probe {bench.count:,} grid parameters: peak "
            f"{max(p['reserved'] for p in probes[-1]['peak_per_rank']) / GB:.2f} GB reserved")


def run_phase(args, record: Record, say, rank: int, world: int, local_rank: int) -> None:
    if args.phase == "gen":
        record.put("result", phase_gen(args, say))
        return
    gc.freeze()  # what the imports made: each trainer's release then collects only the phase's objects
    bench = Bench(args, rank, world, local_rank, say)
    target = args.count if args.phase == "verify" else args.grid_params
    bench.install(target)
    model = bench.trainer.pipeline.model
    record.put("setup", {"capacity_bytes": bench.gathered(bench.capacity, "capacity"),
                         "device": torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu",
                         "strategy": bench.strategy, "cells": bench.cells, "grid_params": bench.count,
                         "proposal_cells": list(model.config.proposal_cells),
                         "plan": bench.trainer.pipeline.plan.describe() if bench.trainer.pipeline.plan else None,
                         "train_images": len(bench.trainer.pipeline.datamanager.train_dataset),
                         "eval_images": len(bench.trainer.pipeline.datamanager.eval_dataset),
                         "field_plane_shape": list(model.field.appearance.planes[0].shape)})
    say(f"{bench.count:,} grid parameters (cells {bench.cells} x 2^{args.doublings}), {bench.strategy}")
    if args.phase == "verify":
        record.put("verify", bench.measure(0, 2, None))
        say(f"trained 2 steps at {bench.count:,} grid parameters")
        result = bench.render(args.render_width, args.render_height, args.render_frames, args.deadline)
        record.put("render", result)
        say(f"{result['frames_per_s']:.3f} frames/s at {result['width']}x{result['height']}")
        return
    result = bench.measure(args.warmup, args.steps, args.deadline)
    record.put("throughput", result)
    say(f"{result['rays_per_s']:,.0f} rays/s, peak {max(p['allocated'] for p in result['peak_per_rank']) / GB:.2f} GB")
    record.put("eval", {"steps_trained": args.warmup + result["steps"], **bench.evaluate(args.eval_views)})
    say(f"PSNR {record.data['eval']['psnr']:.2f} dB after {record.data['eval']['steps_trained']} steps")
    if args.probes:
        run_probes(args, bench, record, result, world, say)


def phase_entry(comm, argv: list[str]) -> None:
    """One rank of a phase.  ``comm``: given by ``launch.spawn``; None under torchrun / python."""
    args = parse(argv)
    run_phase_rank(comm, args.out, args.world, lambda world: tag_of(args, world),
                   lambda record, say, rank, world, local_rank: run_phase(args, record, say, rank, world, local_rank))


# ---- the driver ------------------------------------------------------------------------------
class Driver(PhaseDriver):
    """Runs the phases in order under the budget, then fits, plots and prints the table."""

    def __init__(self, args, argv: list[str]):
        super().__init__(args, argv, SCRIPT, phase_entry, PRELOAD, MIN_PHASE_S, PHASE_CAP_S)
        self.worlds = sorted({1, args.gpus})  # --gpus 1 measures the single-GPU side only, once

    def train_tag(self, world: int, strategy: str) -> str:
        return "train-w1" if world == 1 else f"train-w{world}-{strategy}"

    def verify_tag(self, world: int) -> str:
        return "verify-w1" if world == 1 else f"verify-w{world}-{self.args.curve_strategy}"

    def result(self, tag: str, key: str) -> Any:
        return self.phases.get(tag, {}).get("result", {}).get(key)

    def curve(self, world: int) -> dict[str, Any]:
        """Peak memory (max over ranks, reserved) against the grid parameters, its linear fit and
        the count at which it reaches the smallest rank's capacity."""
        tag = self.train_tag(world, self.args.curve_strategy)
        rows = [self.result(tag, "throughput")] + list(self.result(tag, "probes") or [])
        points = [(r["grid_params"], max(p["reserved"] for p in r["peak_per_rank"]))
                  for r in rows if r and "peak_per_rank" in r]
        out: dict[str, Any] = {"points": points, "capacity_bytes": min((self.result(tag, "setup") or {}).get(
            "capacity_bytes") or [0])}
        fit = fit_to_capacity(points, out["capacity_bytes"])
        if fit is not None:
            out.update(zip(("bytes_per_grid_param", "fixed_bytes", "predicted_max"), fit))
        return out

    def summary(self, curves: dict[int, dict]) -> dict[str, Any]:
        args, n = self.args, str(self.args.gpus)
        one = self.result("train-w1", "throughput")
        out: dict[str, Any] = {"rays_per_s": {}, "peak_memory": {}}
        for strategy in args.strategies if args.gpus > 1 else ():
            many = self.result(self.train_tag(args.gpus, strategy), "throughput")
            if not (one and many):
                continue
            out["rays_per_s"][strategy] = ratio_of(one["rays_per_s"], many["rays_per_s"], n)
            if strategy in THROUGHPUT_TARGETS:
                judge(out["rays_per_s"][strategy], TARGETS["rays_per_s"], at_least=True)
            peaks = [max(p["allocated"] for p in r["peak_per_rank"]) for r in (one, many)]
            out["peak_memory"][strategy] = ratio_of(*peaks, n)
            if strategy == "channel":
                grid = [max(r["grid_bytes_per_rank"]) for r in (one, many)]
                out["grid_memory"] = judge(ratio_of(*grid, n), TARGETS["grid_memory"], at_least=False)
        out["max_grid"] = self.max_grid(curves)
        out["psnr"] = {tag: p["result"]["eval"]["psnr"] for tag, p in self.phases.items()
                       if "eval" in p.get("result", {})}
        out["render"] = {str(w): self.result(self.verify_tag(w), "render") for w in self.worlds
                         if self.result(self.verify_tag(w), "render")}
        return out

    def max_grid(self, curves: dict[int, dict]) -> dict[str, Any]:
        """The largest trainable grid per world size: predicted by the curve, and verified by a
        training step at --verify-fraction of it; their ratio and the 1e9 target on N GPUs."""
        n = str(self.args.gpus)
        out: dict[str, Any] = {}
        for w in self.worlds:
            verify = self.phases.get(self.verify_tag(w), {})
            tried = (verify.get("result", {}).get("setup") or {}).get("grid_params")
            trained = "verify" in verify.get("result", {})  # its steps ran (a render may still have failed after)
            out[str(w)] = {"predicted": curves[w].get("predicted_max"), "tried": tried,
                           "verified": tried if trained else None, "verify_status": verify.get("status")}
        if self.args.gpus == 1:
            return out
        for basis in ("verified", "predicted"):
            a, b = out["1"][basis], out[n][basis]
            if a and b:
                out.update(ratio=b / a, basis=basis)
                judge(out, TARGETS["max_grid"], at_least=True)
                break
        largest = out[n]["verified"]
        out["params_target"] = TARGETS["max_grid_params"]
        out["params_met"] = bool(largest and largest >= TARGETS["max_grid_params"])
        return out

    def plot(self, curves: dict[int, dict], path: Path) -> None:
        drawn = []
        for w, c in curves.items():
            strategy = "" if w == 1 else f", {self.args.curve_strategy}"
            curve: dict[str, Any] = {"name": f"{w} GPU(s){strategy}", "points": c["points"]}
            if "predicted_max" in c:
                curve.update(fit=(c["bytes_per_grid_param"], c["fixed_bytes"], c["predicted_max"]),
                             capacity=c["capacity_bytes"])
            verify = self.phases.get(self.verify_tag(w), {})
            tried = (verify.get("result", {}).get("setup") or {}).get("grid_params")
            if tried:  # its measured peak, or the capacity it ran out of
                peaks = (verify["result"].get("verify") or {}).get("peak_per_rank")
                peak = max(p["reserved"] for p in peaks) if peaks else c["capacity_bytes"]
                curve["verify"] = (tried, peak, "ok" if peaks else verify.get("status"))
            drawn.append(curve)
        unit, scale = ("MB (CPU proxy)", 2**20) if self.args.smoke else ("GB", GB)
        count_unit, count_scale = ("millions", 1e6) if self.args.smoke else ("billions", 1e9)
        plot_memory_curves(path, drawn, f"grid parameters ({count_unit}, all ranks)",
                           f"peak memory per rank ({unit}, reserved)",
                           "landmark-grid training step: memory against grid parameters", count_scale, scale,
                           count_unit[0].upper())

    def table(self, summary: dict[str, Any]) -> str:
        n = str(self.args.gpus)
        unit, scale = ("MB*", 2**20) if self.args.smoke else ("GB", GB)
        lines = [f"\n{'metric':40} {'1 GPU':>12} {f'{n} GPUs':>12} {'ratio':>8} {'target':>8} {'met':>5}"]

        def row(name: str, item: dict[str, Any] | None, fmt: str, divide: float = 1.0, op: str = ">=") -> None:
            if not item or "ratio" not in item:
                lines.append(f"{name:40} {'n/a':>12} {'n/a':>12}")
                return
            a, b = item["1"], item[n]
            target = f"{op}{item['target']}" if "target" in item else ""
            met = ("yes" if item["met"] else "NO") if "met" in item else ""
            lines.append(f"{name:40} {format(a / divide, fmt):>12} {format(b / divide, fmt):>12} "
                         f"{item['ratio']:>7.3f}x {target:>8} {met:>5}")

        for strategy in self.args.strategies if self.args.gpus > 1 else ():
            row(f"training rays/s, {strategy}", summary["rays_per_s"].get(strategy), ",.0f")
        if self.args.gpus > 1:
            row(f"grid memory per GPU ({unit}), channel", summary.get("grid_memory"), ".3f", scale, "<=")
            for strategy, item in summary["peak_memory"].items():
                row(f"peak memory per GPU ({unit}), {strategy}", item, ".3f", scale, "")
        largest = summary["max_grid"]
        basis = largest.get("basis")
        on_basis = {**largest, "1": largest["1"][basis], n: largest[n][basis]} if basis else None
        row(f"largest trainable grid (M params) {basis or ''}", on_basis, ",.1f", 1e6)
        if self.args.gpus > 1:
            verified = largest[n]["verified"]
            lines.append(f"grid parameters trained on {n} GPUs: {verified or 0:,} (target >= "
                         f"{largest['params_target']:.0e}: {'yes' if largest['params_met'] else 'NO'})")
        if summary["psnr"]:
            lines.append("held-out PSNR after the timed steps: " + ", ".join(
                f"{tag} {value:.2f} dB" for tag, value in summary["psnr"].items()))
        for w, render in summary["render"].items():
            lines.append(f"render {render['width']}x{render['height']} on {w} GPU(s): {render['frames_per_s']:.3f} "
                         f"frames/s ({render['frames']} frames, grid of {render['grid_params'] / 1e6:,.1f} M parameters)")
        for tag, state in self.phases.items():
            if state["status"] != "ok":
                lines.append(f"phase {tag}: {state['status']} {state.get('reason', '')}".rstrip())
        if self.args.smoke:
            lines.append("* smoke run on CPU: memory is the bytes of parameters, gradients and optimiser state")
        return "\n".join(lines)

    def main(self) -> int:
        args = self.args
        self.say(f"budget {args.budget_s:.0f} s, {self.gpus} GPU(s) visible, launcher {args.launcher}")
        gen = self.run("gen", 1)
        csrc = (gen.get("result", {}).get("result") or {}).get("csrc") or {}
        if not args.smoke and not csrc.get("available"):
            self.argv.append("--no-csrc")
            self.say("csrc/ kernels not built: the grids are sampled by their torch twin")
        if scene(args) is None:
            self.say("no scene: nothing else can run")
        else:
            self.run("train", 1, ["--probes"], tag=self.train_tag(1, "none"))
            if args.gpus > 1:
                for strategy in dict.fromkeys([*args.strategies, args.curve_strategy]):
                    probes = ["--probes"] if strategy == args.curve_strategy else []
                    self.run("train", args.gpus, ["--strategy", strategy, *probes],
                             tag=self.train_tag(args.gpus, strategy))
        curves = {w: self.curve(w) for w in self.worlds}
        for w in self.worlds:
            if curves[w].get("predicted_max"):
                count = int(args.verify_fraction * curves[w]["predicted_max"])
                self.run("verify", w, ["--count", str(count), "--strategy", args.curve_strategy], tag=self.verify_tag(w))
            else:
                self.skip(self.verify_tag(w), "no memory curve to extrapolate")
        summary = self.summary(curves)
        self.write_report("bench_grid_scale", summary, lambda path: self.plot(curves, path), "memory_vs_grid.png",
                          targets=TARGETS, curves={str(w): c for w, c in curves.items()})
        self.say(f"wrote {args.out / 'bench_grid_scale.json'} and memory_vs_grid.png")
        print(self.table(summary), flush=True)
        return 0


def ratio_of(one: float, many: float, n: str) -> dict[str, float]:
    return {"1": one, n: many, "ratio": many / one}


def judge(item: dict[str, Any], target: float, at_least: bool) -> dict[str, Any]:
    """``item`` with its target and whether its ratio meets it."""
    item["target"] = target
    item["met"] = bool(item["ratio"] >= target) if at_least else bool(item["ratio"] <= target)
    return item


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.phase is not None:
        phase_entry(None, argv)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench_grid_scale.py needs CUDA GPUs (use --smoke for the CPU code path)", file=sys.stderr)
        return 2
    return Driver(args, argv).main()


if __name__ == "__main__":
    raise SystemExit(main())
