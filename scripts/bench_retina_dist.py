#!/usr/bin/env python
"""retina-gs on 1 vs 2 GPUs (issue 4's benchmark), with gsplat's distributed rasteriser as the peer.

One driver runs every phase as its own process (``python`` for one rank, ``torchrun`` for two),
under one time budget, and prints the side-by-side table of ratios last:

  gen        a synthetic city (data/city.py cameras; 4x4 blocks of 3x3 lots) of --num-images
             images at --width x --height; ground truth rendered on the GPU (render_partial:
             gsplat's kernels) from --gt-points Gaussians on the city's surfaces; JPEG files in
             nerfstudio-data layout under --work.  Reused when its settings match.
  train-wN   the retina-gs pipeline (DistributedRetinaPipeline, each rank loading only its own
             images) on N ranks with --gaussians Gaussians made on each rank's GPU (only its
             region's rows): images/s over --steps batches of --batch cameras after --warmup,
             peak memory per rank; then peak memory at --probe-per-gpu Gaussians per GPU.
  gsplat-w2  gsplat's rasterization(..., distributed=True) on the same Gaussians (each rank its
             shard), the same camera batches (each rank its own cameras, all-gathered by gsplat),
             the same loss and optimiser: images/s and peak memory per rank.
  verify-wN  one training step at --verify-fraction of the largest count the memory curve
             predicts for N GPUs.

Both runs take the same camera batches (the queue of a --gpus-rank run).  The model's step is
BASE_STEP: full resolution, SH degree --sh-degree, densification statistics collected, with
refinement off so the count stays fixed.  A phase that fails (out of memory included) is
recorded with its error and the driver goes on; a phase that does not fit the remaining
budget is skipped.  Results: --out/bench_retina_dist.json, --out/memory_vs_count.png,
--out/phases/*.json.

    python -P scripts/bench_retina_dist.py --out OUT                       # the device run (2 GPUs)
    python scripts/bench_retina_dist.py --smoke --launcher spawn --out OUT # CPU, gloo, tiny, seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

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
PRELOAD = ("landmark_plugin.gaussians.distributed_pipeline", "landmark_plugin.method_configs.retina_gs")
TARGETS = {"images_per_s": 1.7, "peak_memory": 0.6, "max_count": 1.8}
MIN_PHASE_S = {"gen": 20, "train": 40, "gsplat": 30, "verify": 30}
"""Below this much budget left a phase is skipped (it could not finish)."""
PHASE_CAP_S = {"gen": 300, "train": 130, "gsplat": 90, "verify": 80}
"""The most one phase may take, so that a slow one leaves time to the next: it plans its steps
and probes to end by then and is ended 15 s later."""


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The options (scripts/bench_offload.py adds its own to them)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-retina-dist"), help="JSON, PNG and phase records")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-retina-dist"), help="the generated city")
    p.add_argument("--gpus", type=int, default=2, help="ranks of the multi-GPU runs")
    p.add_argument("--launcher", choices=("torchrun", "spawn"), default="torchrun",
                   help="torchrun / python subprocesses, or forked ranks of this process (CPU smoke runs)")
    p.add_argument("--budget-s", type=float, default=450.0, help="every phase ends within this")
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--blocks", type=int, default=4, help="city blocks along x and y (3x3 lots each)")
    p.add_argument("--gt-points", type=int, default=1_000_000, help="Gaussians of the ground truth")
    p.add_argument("--seed-points", type=int, default=20_000, help="sparse_pc.ply: the tree is built on these")
    p.add_argument("--gaussians", type=float, default=20e6, help="Gaussians of the throughput runs (all ranks)")
    p.add_argument("--batch", type=int, default=4, help="cameras per step (max_batch_size = max_load)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--sh-degree", type=int, default=3)
    p.add_argument("--tree-depth", type=int, default=2)
    p.add_argument("--cache-images", default="cpu", choices=("auto", "device", "cpu", "disk"))
    p.add_argument("--probe-per-gpu", type=float, nargs="+", default=[10e6, 20e6, 30e6],
                   help="Gaussians per GPU of the memory curve's points")
    p.add_argument("--verify-fraction", type=float, default=0.9)
    p.add_argument("--capacity-mb", type=float, default=None,
                   help="memory per rank to extrapolate to (default: the GPU's free memory; CPU: required)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny scene and counts, torch rasteriser")
    # internal: what the driver passes to a phase
    p.add_argument("--phase", choices=("gen", "train", "gsplat", "verify"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--count", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-csrc", action="store_true", help=argparse.SUPPRESS)
    return p


def parse(argv=None) -> argparse.Namespace:
    return smoke_sizes(parser().parse_args(argv))


def smoke_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """With --smoke: the sizes at which the CPU runs every phase in seconds."""
    if args.smoke:
        # sizes at which the torch rasteriser takes a fraction of a second per step
        args.num_images, args.width, args.height, args.blocks = 16, 32, 24, 2
        args.gt_points, args.seed_points, args.gaussians = 1000, 200, 600
        args.batch, args.warmup, args.steps, args.sh_degree = 2, 1, 2, 1
        args.probe_per_gpu, args.cache_images = [300, 600], "disk"
        args.capacity_mb = args.capacity_mb or 0.5
    return args


# ---- gen: the scene --------------------------------------------------------------------------
def city_config(args):
    from landmark_plugin.data.city import CityConfig

    return CityConfig(seed=0, blocks=(args.blocks, args.blocks), lots_per_block=(3, 3), num_images=args.num_images,
                      width=args.width, height=args.height, num_points=args.seed_points, test_every=8)


def scene_settings(args) -> Dict[str, Any]:
    """What the generated scene depends on (gen reuses a scene with the same settings)."""
    from dataclasses import asdict

    return json.loads(json.dumps({"city": asdict(city_config(args)), "gt_points": args.gt_points}))


def scene_ready(args) -> bool:
    marker = args.work / "city" / "bench.json"
    return marker.exists() and json.loads(marker.read_text()) == scene_settings(args)


def phase_gen(args, say: Callable[[str], None]) -> Dict[str, Any]:
    """Cameras, ground-truth images (JPEG) and anchors.npz under ``--work/city``."""
    import cv2
    from nerfstudio.models.splatfacto import get_viewmat

    from landmark_plugin.core.composite import composite
    from landmark_plugin.core.render import render_partial
    from landmark_plugin.data.city import make_cameras, make_layout, transforms_json
    from landmark_plugin.data.city_gaussians import anchor_gaussians, surface_samples
    from landmark_plugin.data.city_render import SKY_HORIZON, surface_area
    from landmark_plugin.data.ply import write_points_ply

    city = args.work / "city"
    config = city_config(args)
    settings = scene_settings(args)
    build = build_kernels_in_background() if torch.cuda.is_available() and not args.smoke else None
    marker = city / "bench.json"
    if scene_ready(args):
        say(f"reusing {city}")
        return {"reused": True, "csrc": joined(build, say), **settings}
    (city / "images").mkdir(parents=True, exist_ok=True)
    layout = make_layout(config)
    cameras = make_cameras(config, layout)
    workers = min(16, os.cpu_count() or 1)
    xyz, rgb = surface_samples(layout, args.gt_points, seed=1, workers=workers)
    area = surface_area(layout)
    spacing = math.sqrt(area / max(1, len(xyz)))
    np.savez(city / "anchors.npz", xyz=xyz, rgb=rgb, area=area)
    write_points_ply(city / "sparse_pc.ply", xyz[: args.seed_points], rgb[: args.seed_points])
    say(f"{len(xyz)} surface samples (spacing {spacing:.4f}), {config.num_images} cameras")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    anchors = anchor_gaussians(torch.from_numpy(xyz).to(device), torch.from_numpy(rgb).to(device).float() / 255, spacing)
    c2w = torch.from_numpy(cameras.camera_to_worlds[:, :3, :4]).float().to(device)
    K = torch.tensor(cameras.intrinsics, dtype=torch.float32, device=device)
    sky = torch.tensor(SKY_HORIZON, dtype=torch.float32, device=device)
    names = [f"images/frame_{i:05d}.jpg" for i in range(config.num_images)]

    def write(name: str, image: np.ndarray) -> None:
        if not cv2.imwrite(str(city / name), np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"could not write {city / name}")

    with ThreadPoolExecutor(max_workers=workers) as pool, torch.no_grad():
        pending = []
        for i, name in enumerate(names):
            viewmat = get_viewmat(c2w[i : i + 1])[0]
            zero = torch.zeros(anchors.means.shape[0], dtype=torch.int64, device=device)
            part = render_partial(anchors, zero, viewmat, K, config.width, config.height, None, num_leaf_positions=1)
            image, _ = composite([part.color], [part.transmittance], sky)
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            pending.append(pool.submit(write, name, pixels))
            if len(pending) > 4 * workers:  # bound the images waiting for the encoder
                pending.pop(0).result()
        for future in pending:
            future.result()
    (city / "transforms.json").write_text(json.dumps(transforms_json(config, cameras, names), indent=2))
    marker.write_text(json.dumps(settings))
    say(f"wrote {len(names)} images of {config.width}x{config.height}")
    return {"reused": False, "csrc": joined(build, say), **settings}


# ---- the training context shared by train / gsplat / verify ----------------------------------
class Bench:
    """One rank's pipeline over the generated city, and the Gaussians it trains."""

    def __init__(self, args, rank: int, world: int, local_rank: int, say: Callable[[str], None]):
        from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig
        from landmark_plugin.method_configs.retina_gs import retina_gs

        self.args, self.say = args, say
        self.cuda = torch.cuda.is_available() and not args.smoke
        if args.no_csrc:
            from landmark_plugin import cuda

            # The gen phase could not build csrc/ (or was cut short, leaving a lock a build would
            # wait on forever): render with the torch twin of its sort, as the product does then.
            cuda._failure = "not built by the benchmark's gen phase"
        self.device = torch.device("cuda", local_rank) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.cuda.init()
        self.capacity = int(args.capacity_mb * 2**20) if args.capacity_mb else (
            torch.cuda.mem_get_info(self.device)[0] if self.cuda else 0)
        torch.manual_seed(0)
        config = copy.deepcopy(retina_gs.config)
        city = args.work / "city"
        pc = config.pipeline
        pc.max_batch_size = pc.max_load = args.batch
        pc.collective_timeout_s = 180.0  # a rank that died ends its peer well within the budget
        dm = pc.datamanager
        dm.data = city
        # the generated world is the training world: no re-orientation, rescaling or downscaling
        dm.dataparser = SyntheticCityDataParserConfig(data=city, auto_scale_poses=False, downscale_factor=1)
        dm.cache_images, dm.cache_images_type = args.cache_images, "uint8"
        model = pc.model
        model.tree_depth, model.split_axes, model.sh_degree = args.tree_depth, "xy", args.sh_degree
        model.refine_every = 10**9  # statistics are collected, nothing is split or pruned
        model.background_color = "white"
        model.backend = "auto" if self.cuda else "torch"
        self.configure(config)
        self.pipeline = pc.setup(device=str(self.device), test_mode="val")
        self.comm = self.pipeline.comm
        outputs = self.pipeline.datamanager.train_dataparser_outputs
        if not torch.allclose(outputs.dataparser_transform.float(), torch.eye(4)[:3]) or outputs.dataparser_scale != 1.0:
            raise RuntimeError("the dataparser moved the generated world; the Gaussians are made in its frame")
        dm = self.pipeline.datamanager
        if world == 1:  # hold every image, read on the datamanager's thread pool
            dm.load_only(range(len(dm.train_dataset)), range(len(dm.eval_dataset)))
        # The camera sequence of a --gpus-rank run, so 1 and N ranks train on the same batches.
        self.pipeline._next_pool(2 * len(dm.train_dataset), world_size=args.gpus)
        anchors = np.load(city / "anchors.npz")
        self.anchors = torch.from_numpy(anchors["xyz"]).to(self.device)
        self.colors = torch.from_numpy(anchors["rgb"]).to(self.device).float() / 255
        self.area = float(anchors["area"])
        self.optimizers = None
        self.count = 0

    def configure(self, config) -> None:
        """A variant's changes to the method config before the pipeline is made (none here)."""

    def gaussian_device(self) -> torch.device:
        """Where ``install`` makes the Gaussians (the training device here)."""
        return self.device

    def install(self, count: int) -> None:
        """Replace the model's Gaussians with ``count`` of the scene (this rank's region's rows)."""
        from nerfstudio.engine.optimizers import Optimizers

        from landmark_plugin.data.city_gaussians import scatter_gaussians
        from landmark_plugin.gaussians.rows import owner_ranks
        from landmark_plugin.method_configs.retina_gs import gaussian_optimizers

        self.release()
        model, parts, rank = self.pipeline.model, self.pipeline.frame.parts, self.comm.rank
        keep = (lambda means: owner_ranks(model, parts, means) == rank) if self.comm.world_size > 1 else None
        where = self.gaussian_device()
        params = scatter_gaussians(self.anchors.to(where), self.colors.to(where), count, math.sqrt(self.area / count), self.args.sh_degree,
                                   keep=keep, seed=7)
        model.gauss_params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()})
        model.refresh_ownership()
        model.strategy_state = model.strategy.initialize_state(scene_scale=1.0)
        self.optimizers = Optimizers(gaussian_optimizers(10**6), self.pipeline.get_param_groups())
        model.optimizers = self.optimizers.optimizers  # what the trainer's callback hands the strategy
        self.count = count

    def release(self) -> None:
        model = self.pipeline.model
        self.optimizers = None
        model.gauss_params = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v.new_empty((0,) + tuple(v.shape[1:]))) for k, v in model.gauss_params.items()})
        model.strategy_state = model.strategy.initialize_state(scene_scale=1.0)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ---- steps: return the number of cameras trained ----------------------------------------
    def retina_step(self, step: int) -> int:
        pipeline, model = self.pipeline, self.pipeline.model
        model.step = BASE_STEP + step
        self.optimizers.zero_grad_all()
        _, losses, _ = pipeline.get_batch_loss_dict(step)
        sum(losses.values()).backward()
        pipeline.sync_gradients_()
        self.optimizers.optimizer_step_all()
        pipeline.step_post_backward(model.step)  # densification statistics
        return len(pipeline.last_batch)

    def gsplat_step(self, step: int) -> int:
        """gsplat's distributed rasterisation: this rank's Gaussians, its own cameras of the batch."""
        from gsplat.rendering import rasterization
        from nerfstudio.models.splatfacto import get_viewmat

        from landmark_plugin.core.schedule import image_owner

        pipeline, model, comm = self.pipeline, self.pipeline.model, self.comm
        model.step = BASE_STEP + step
        batch = pipeline._next_pool(self.args.batch)
        pipeline._queue = pipeline._queue[len(batch):]
        mine = [i for i in batch if image_owner(i, comm.world_size) == comm.rank]
        if len(mine) * comm.world_size != len(batch):
            raise RuntimeError(f"gsplat needs as many cameras on every rank; batch {batch} gives this rank {mine}")
        dm = pipeline.datamanager
        cameras = dm.train_dataset.cameras[torch.tensor(mine)].to(self.device)
        self.optimizers.zero_grad_all()
        g = model.activated_gaussians()
        background = model._get_background_color()
        colors, _, _ = rasterization(
            g.means, g.quats, g.scales, g.opacities, g.sh, get_viewmat(cameras.camera_to_worlds),
            cameras.get_intrinsics_matrices().to(self.device), int(cameras.width[0]), int(cameras.height[0]),
            sh_degree=pipeline.frame.sh_degree(), backgrounds=background.expand(len(mine), 3).contiguous(),
            distributed=True,
        )
        loss = 0.0
        for c, index in enumerate(mine):
            data = {"image": dm.cached_train[index]["image"].to(self.device)}
            out = {"rgb": colors[c].clamp(0.0, 1.0), "background": background}
            loss = loss + model.get_loss_dict(out, data)["main_loss"] / len(batch)  # as ours: mean over the batch
        loss.backward()
        pipeline.sync_gradients_()
        self.optimizers.optimizer_step_all()
        return len(batch)

    # ---- measuring --------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> Dict[str, float]:
        """This rank's peak since ``reset_peak`` (CPU: bytes of parameters, gradients and
        optimiser state, a proxy that grows with the count as device memory does)."""
        if self.cuda:
            return cuda_peak(self.device)
        params = list(self.pipeline.model.gauss_params.values())
        size = sum(p.numel() * p.element_size() for p in params)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        states = sum(t.numel() * t.element_size() for opt in self.optimizers.optimizers.values()
                     for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
        return {"allocated": size + grads + states, "reserved": size + grads + states, "kind": "cpu tensor bytes"}

    def measure(self, step: Callable[[int], int], warmup: int, steps: int, deadline: Optional[float]) -> Dict:
        """Images/s over ``steps`` timed steps after ``warmup``, and every rank's peak memory."""
        from landmark_plugin.distributed.collectives import all_gather_objects

        steps, images, seconds = timed_steps(step, warmup, steps, deadline, self.comm, self.sync, self.reset_peak)
        peaks = all_gather_objects(self.comm, self.peak(), "peak memory")
        return {"count": self.count, "steps": steps, "images": images, "seconds": seconds,
                "images_per_s": images / seconds, "peak_per_rank": peaks,
                "gaussians_per_rank": all_gather_objects(self.comm, self.pipeline.model.num_points, "counts")}


# ---- phases (one process per rank) -----------------------------------------------------------
def run_phase(args, record: Record, bench_of: Callable[[], Bench], world: int, say) -> None:
    if args.phase == "gen":
        record.put("result", phase_gen(args, say))
        return
    bench = bench_of()
    record.put("setup", {"capacity_bytes": all_gather_objects_of(bench, bench.capacity),
                         "device": torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu",
                         "train_images_held": len(bench.pipeline.datamanager.owned["train"] or [])})
    say(f"pipeline ready; this rank holds {record.data['setup']['train_images_held']} training images")
    if args.phase == "verify":
        bench.install(int(args.count))
        say(f"verifying {bench.count:,} Gaussians ({bench.pipeline.model.num_points:,} on this rank)")
        record.put("verify", bench.measure(bench.retina_step, 0, 2, None))
        say(f"trained 2 steps at {bench.count:,} Gaussians")
        return
    bench.install(int(args.gaussians))
    say(f"{bench.count:,} Gaussians made ({bench.pipeline.model.num_points:,} on this rank)")
    step = bench.gsplat_step if args.phase == "gsplat" else bench.retina_step
    result = bench.measure(step, args.warmup, args.steps, args.deadline)
    record.put("throughput", result)
    say(f"{result['images_per_s']:.2f} images/s, peak {max(p['allocated'] for p in result['peak_per_rank']) / GB:.2f} GB")
    if args.phase != "train":
        return
    probes: List[Dict] = []
    for per_gpu in args.probe_per_gpu:
        if args.deadline is not None and bool(broadcast_of(bench, time.time() > args.deadline - 25.0)):
            probes.append({"count": int(per_gpu * world), "skipped": "time budget"})
            break
        try:
            bench.install(int(per_gpu * world))
            probes.append(bench.measure(bench.retina_step, 0, 2, None))
        except torch.OutOfMemoryError as error:
            if world > 1:
                raise  # the peer waits in a collective: end the phase (the driver records it)
            probes.append({"count": int(per_gpu * world), "oom": str(error).splitlines()[0]})
            bench.release()
            break
        finally:
            record.put("probes", probes)
        say(f"probe {per_gpu * world:,.0f} Gaussians: peak {max(p['reserved'] for p in probes[-1]['peak_per_rank']) / GB:.2f} GB reserved")


def all_gather_objects_of(bench: Bench, value: Any) -> List[Any]:
    from landmark_plugin.distributed.collectives import all_gather_objects

    return all_gather_objects(bench.comm, value, "phase setup")


def broadcast_of(bench: Bench, value: Any) -> Any:
    from landmark_plugin.distributed.collectives import broadcast_object

    return broadcast_object(bench.comm, value, what="phase deadline")


def phase_entry(comm, argv: List[str]) -> None:
    """One rank of a phase.  ``comm``: given by ``launch.spawn``; None under torchrun / python."""
    args = parse(argv)

    def body(record: Record, say, rank: int, world: int, local_rank: int) -> None:
        run_phase(args, record, lambda: Bench(args, rank, world, local_rank, say), world, say)

    run_phase_rank(comm, args.out, args.world, lambda world: "gen" if args.phase == "gen" else f"{args.phase}-w{world}",
                   body)


# ---- the driver ------------------------------------------------------------------------------
class Driver(PhaseDriver):
    """Runs the phases in order under the budget, then fits, plots and prints the table."""

    def __init__(self, args, argv: List[str]):
        super().__init__(args, argv, SCRIPT, phase_entry, PRELOAD, MIN_PHASE_S, PHASE_CAP_S)

    # ---- after the runs ---------------------------------------------------------------------
    def curve(self, world: int) -> Dict:
        """Peak memory (max over ranks, reserved) against the total count, its linear fit and
        the count at which it reaches the smallest rank's capacity."""
        result = self.phases.get(f"train-w{world}", {}).get("result", {})
        rows = [result.get("throughput")] + list(result.get("probes", []))
        points = [(r["count"], max(p["reserved"] for p in r["peak_per_rank"])) for r in rows if r and "peak_per_rank" in r]
        out: Dict[str, Any] = {"points": points}
        capacities = result.get("setup", {}).get("capacity_bytes") or [0]
        out["capacity_bytes"] = min(capacities)
        fit = fit_to_capacity(points, out["capacity_bytes"])
        if fit is not None:
            out.update(zip(("bytes_per_gaussian", "fixed_bytes", "predicted_max"), fit))
        return out

    def summary(self, curves: Dict[int, Dict]) -> Dict:
        g = self.args.gpus
        one = self.phases.get("train-w1", {}).get("result", {}).get("throughput")
        many = self.phases.get(f"train-w{g}", {}).get("result", {}).get("throughput")
        peer = self.phases.get(f"gsplat-w{g}", {}).get("result", {}).get("throughput")
        peak = lambda r: max(p["allocated"] for p in r["peak_per_rank"])  # noqa: E731
        out: Dict[str, Any] = {}
        if one:
            out["images_per_s"], out["peak_memory"] = {"1": one["images_per_s"]}, {"1": peak(one)}
        if one and many and g > 1:  # with --gpus 1 there is no ratio to take
            out["images_per_s"].update({str(g): many["images_per_s"], "ratio": many["images_per_s"] / one["images_per_s"]})
            out["peak_memory"].update({str(g): peak(many), "ratio": peak(many) / peak(one)})
        counts = {}
        for w in (1, g):
            verify = self.phases.get(f"verify-w{w}", {})
            ok = verify.get("status") == "ok"
            counts[w] = {"predicted": curves[w].get("predicted_max"), "tried": verify.get("count"),
                         "verified": verify.get("count") if ok else None, "verify_status": verify.get("status")}
        out["max_count"] = {str(w): c for w, c in counts.items()}
        verified = [counts[w]["verified"] for w in (1, g)]
        predicted = [counts[w]["predicted"] for w in (1, g)]
        if g > 1 and all(verified):
            out["max_count"]["ratio"], out["max_count"]["basis"] = verified[1] / verified[0], "verified"
        elif g > 1 and all(predicted):
            out["max_count"]["ratio"], out["max_count"]["basis"] = predicted[1] / predicted[0], "predicted only"
        if peer:
            out["gsplat"] = {"images_per_s": peer["images_per_s"], "peak_per_rank": [p["allocated"] for p in peer["peak_per_rank"]]}
            if many:
                out["gsplat"]["ours_over_gsplat_images_per_s"] = many["images_per_s"] / peer["images_per_s"]
                out["gsplat"]["ours_over_gsplat_peak"] = peak(many) / max(out["gsplat"]["peak_per_rank"])
        for key, target in TARGETS.items():
            if "ratio" in out.get(key, {}):
                ratio = out[key]["ratio"]
                out[key]["target"] = target
                out[key]["met"] = bool(ratio <= target) if key == "peak_memory" else bool(ratio >= target)
        return out

    def plot(self, curves: Dict[int, Dict], path: Path) -> None:
        drawn = []
        for w, c in curves.items():
            curve = {"name": f"{w} GPU(s)", "points": c["points"]}
            if "predicted_max" in c:
                curve.update(fit=(c["bytes_per_gaussian"], c["fixed_bytes"], c["predicted_max"]),
                             capacity=c["capacity_bytes"])
            verify = self.phases.get(f"verify-w{w}", {})
            if verify.get("count"):  # its measured peak, or the capacity it ran out of
                ok = verify.get("status") == "ok"
                peaks = verify.get("result", {}).get("verify", {}).get("peak_per_rank")
                y = max(p["reserved"] for p in peaks) if ok and peaks else c["capacity_bytes"]
                curve["verify"] = (verify["count"], y, verify.get("status"))
            drawn.append(curve)
        unit = "GB" if not self.args.smoke else "MB (CPU proxy)"
        plot_memory_curves(path, drawn, "Gaussians (millions, all ranks)", f"peak memory per rank ({unit}, reserved)",
                           "retina-gs training step: memory against Gaussian count", 1e6,
                           GB if not self.args.smoke else 2**20, "M")

    def table(self, summary: Dict) -> str:
        g, unit = self.args.gpus, ("GB" if not self.args.smoke else "MB*")
        scale = GB if not self.args.smoke else 2**20
        lines = [f"\n{'metric':34} {'1 GPU':>12} {f'{g} GPUs':>12} {'ratio':>8} {'target':>8} {'met':>5}"]

        def row(name, key, fmt, divide=1.0, target_op=">="):
            item = summary.get(key)
            item = item or {}
            a, b = item.get("1"), item.get(str(g))
            a = a if not isinstance(a, dict) else (a.get("verified") or a.get("predicted"))
            b = b if not isinstance(b, dict) else (b.get("verified") or b.get("predicted"))
            if "ratio" not in item:  # one side only (--gpus 1, or a failed phase)
                one_side = format(a / divide, fmt) if a is not None else "n/a"
                lines.append(f"{name:34} {one_side:>12} {'n/a':>12}")
                return
            lines.append(f"{name:34} {format(a / divide, fmt):>12} {format(b / divide, fmt):>12} {item['ratio']:>7.3f}x "
                         f"{target_op + str(item['target']):>8} {'yes' if item['met'] else 'NO':>5}")

        row("training images/s", "images_per_s", ".2f")
        row(f"peak memory per rank ({unit})", "peak_memory", ".2f", scale, "<=")
        basis = summary.get("max_count", {}).get("basis", "")
        if self.args.smoke:
            row(f"largest trainable count {basis[:9]}", "max_count", ".0f")
        else:
            row(f"largest trainable count (M) {basis[:9]}", "max_count", ".2f", 1e6)
        peer = summary.get("gsplat")
        if peer:
            lines.append(f"gsplat rasterization(distributed=True), {g} GPUs: {peer['images_per_s']:.2f} images/s, peak "
                         f"{max(peer['peak_per_rank']) / scale:.2f} {unit} per rank; retina-gs / gsplat: images/s "
                         f"{peer.get('ours_over_gsplat_images_per_s', math.nan):.3f}x, memory "
                         f"{peer.get('ours_over_gsplat_peak', math.nan):.3f}x")
        else:
            state = self.phases.get(f"gsplat-w{g}", {})
            lines.append(f"gsplat rasterization(distributed=True): {state.get('status', 'not run')} "
                         f"{state.get('reason', '')}".rstrip())
        for tag, state in self.phases.items():
            if state["status"] != "ok":
                lines.append(f"phase {tag}: {state['status']} {state.get('reason', '')}".rstrip())
        if self.args.smoke:
            lines.append("* smoke run on CPU: memory is the bytes of parameters, gradients and optimiser state")
        return "\n".join(lines)

    def main(self) -> int:
        args, g = self.args, self.args.gpus
        self.say(f"budget {args.budget_s:.0f} s, {self.gpus} GPU(s) visible, launcher {args.launcher}")
        gen = self.run("gen", 1)
        csrc = (gen.get("result", {}).get("result") or {}).get("csrc") or {}
        if not args.smoke and not csrc.get("available"):
            self.argv.append("--no-csrc")
            self.say("csrc/ kernels not built: the phases sort with their torch twin")
        if not scene_ready(args):
            self.say("no scene: nothing else can run")
        else:
            self.run("train", 1)
            if g > 1:
                self.run("train", g)
            if args.smoke or self.gpus == 0:
                reason = "gsplat's distributed rasterisation needs CUDA (its kernels and NCCL); CPU smoke run"
                self.phases[f"gsplat-w{g}"] = {"status": "skipped", "reason": reason}
            elif g == 1:
                reason = "gsplat's distributed rasterisation is the multi-GPU peer: --gpus 1 has no peer to run"
                self.phases[f"gsplat-w{g}"] = {"status": "skipped", "reason": reason}
            else:
                self.run("gsplat", g)
        worlds = sorted({1, g})  # --gpus 1 measures the single-GPU side only, once
        curves = {w: self.curve(w) for w in worlds}
        for w in worlds:
            if curves[w].get("predicted_max"):
                count = int(args.verify_fraction * curves[w]["predicted_max"])
                state = self.run("verify", w, ["--count", str(count)])
                state["count"] = count
            else:
                self.phases[f"verify-w{w}"] = {"status": "skipped", "reason": "no memory curve to extrapolate"}
        summary = self.summary(curves)
        self.write_report("bench_retina_dist", summary, lambda path: self.plot(curves, path), "memory_vs_count.png",
                          curves={str(w): c for w, c in curves.items()})
        self.say(f"wrote {args.out / 'bench_retina_dist.json'} and memory_vs_count.png")
        print(self.table(summary), flush=True)
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.phase is not None:
        phase_entry(None, argv)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench_retina_dist.py needs CUDA GPUs (use --smoke for the CPU code path)", file=sys.stderr)
        return 2
    return Driver(args, argv).main()


if __name__ == "__main__":
    raise SystemExit(main())
