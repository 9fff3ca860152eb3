#!/usr/bin/env python
"""Box-clipped rasteriser micro-benchmark: forward + backward against gsplat's
``rasterize_to_pixels`` on the same projected Gaussians.

Methods (all render the same Gaussians of one camera; projection is done once, untimed):
  gsplat     isect_tiles (sorted by tile, depth) + gsplat rasterize_to_pixels
  one-pass   isect_tiles re-keyed by (tile, leaf position, depth) + gsplat rasterize_to_pixels
             (``plain`` mode: all leaves in one launch)
  clip       the csrc/ op from projection to the copies' sorted entries (boundary sharing,
             gsplat's tile binning of each copy, one radix sort by (tile, leaf position,
             depth)) + the box-clipped kernel of csrc/ (``clip`` mode, one pass)
  unclipped  our kernel on gsplat's own intersections with no box (kernel overhead alone)
Columns: ``prep`` (intersections, sort, sharing), ``raster`` (rasteriser forward + backward),
``total`` and ``total / gsplat``.  Targets (issue 11): one-pass <= 1.1x, clip <= 1.25x.

    python scripts/bench_clip.py --json bench_clip.json      # 2M Gaussians, 1920x1080, depth 0 2 4
    python scripts/bench_clip.py --smoke                     # CPU: torch twins, tiny, seconds
    compute-sanitizer --tool memcheck python scripts/bench_clip.py --memcheck   # tiny GPU case
    python scripts/bench_clip.py --profile 4                 # per-kernel GPU times, depth 4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

def make_scene(n: int, width: int, height: int, device: str, seed: int = 0):
    """Random Gaussians in an aerial slab [-1, 1]^2 x [-0.3, 0.3], seen obliquely from above."""
    from landmark_plugin.core.render import Gaussians

    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([1.0, 1.0, 0.3])
    quats = torch.randn(n, 4, generator=g)
    scale = 3.0 / math.sqrt(n) * 2.0  # keeps the per-pixel overlap similar across n
    scales = scale * torch.exp(torch.rand(n, 3, generator=g) * 1.5 - 0.75)
    opacities = 0.05 + 0.9 * torch.rand(n, generator=g)
    colors = torch.rand(n, 1, 3, generator=g)
    gaussians = Gaussians(*(t.to(device) for t in (means, quats, scales, opacities, colors)))
    eye, target = torch.tensor([0.0, -2.2, 1.2]), torch.tensor([0.0, 0.0, -0.1])
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0])), dim=0)
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])
    viewmat = torch.eye(4)
    viewmat[:3, :3], viewmat[:3, 3] = rot, -rot @ eye
    f = 0.5 * width / math.tan(math.radians(60.0) / 2)
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    return gaussians, viewmat.to(device), K.to(device)


def leaves_for(gaussians, viewmat, depth: int):
    """(per-Gaussian leaf position, ClipLeaves) of a kd-tree of ``depth`` over the means."""
    from landmark_plugin.core.clip import unbounded_leaf_boxes
    from landmark_plugin.core.order import camera_leaf_order, order_positions
    from landmark_plugin.core.partition import assign_leaves, build_kdtree
    from landmark_plugin.core.render_clip import ClipLeaves
    from landmark_plugin.core.sh import camera_center

    device = gaussians.means.device
    tree = build_kdtree(gaussians.means.detach(), depth)
    position = order_positions(camera_leaf_order(tree, camera_center(viewmat)))
    leaf = assign_leaves(tree, gaussians.means.detach())
    return position[leaf].to(device), ClipLeaves(unbounded_leaf_boxes(tree).to(device), position.to(device))


class Projected:
    """One projection of the scene; ``leaves()`` gives fresh differentiable rasteriser inputs."""

    def __init__(self, gaussians, viewmat, K, width, height, settings):
        from landmark_plugin.core.clip import clip_camera
        from landmark_plugin.core.projection import project_gaussians

        self.width, self.height, self.settings = width, height, settings
        self.camera = clip_camera(viewmat, K).to(gaussians.means.device)
        self.opacities, self.colors = gaussians.opacities, gaussians.sh[:, 0, :]
        if gaussians.means.is_cuda:
            from gsplat.cuda._wrapper import fully_fused_projection

            out = fully_fused_projection(gaussians.means, None, gaussians.quats, gaussians.scales, viewmat[None],
                                         K[None], width, height, eps2d=settings.eps2d, packed=False)
            self.radii, self.means2d, self.depths, self.conics = (t[0].detach() for t in out[:4])
        else:
            proj = project_gaussians(gaussians.means, gaussians.quats, gaussians.scales, viewmat, K, width, height,
                                     settings)
            self.radii, self.means2d, self.depths, self.conics = proj.radii, proj.means2d, proj.depths, proj.conics

    def leaves(self):
        return [t.detach().clone().requires_grad_(True) for t in (self.means2d, self.conics, self.colors, self.opacities)]

    def proj(self, means2d=None, conics=None):
        from landmark_plugin.core.projection import Projection

        return Projection(self.means2d if means2d is None else means2d, self.conics if conics is None else conics,
                          self.depths, self.radii)


def methods_cuda(P: Projected, position, clip_leaves):
    """name -> (prep() -> state, raster(state, inputs) -> (colour, T))."""
    from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles, rasterize_to_pixels

    from landmark_plugin import cuda
    from landmark_plugin.core.render import _sort_by_tile_leaf_depth
    from landmark_plugin.core.render_clip import clip_intersections

    W, H, ts = P.width, P.height, P.settings.tile_size
    tx, ty = math.ceil(W / ts), math.ceil(H / ts)
    m2, r, d = P.means2d[None], P.radii[None], P.depths[None]

    def gsplat_prep():
        _, ids, flat = isect_tiles(m2, r, d, ts, tx, ty, sort=True)
        return isect_offset_encode(ids, 1, tx, ty), flat

    def one_pass_prep():
        _, ids, flat = isect_tiles(m2, r, d, ts, tx, ty, sort=False)
        offsets, flat = _sort_by_tile_leaf_depth(ids, flat, position, int(clip_leaves.leaf_position.shape[0]), tx * ty)
        return offsets.view(1, ty, tx), flat

    def gsplat_raster(state, x):
        c, a = rasterize_to_pixels(x[0][None], x[1][None], x[2][None], x[3][None], W, H, ts, *state)
        return c[0], 1.0 - a[0]

    def clip_prep():
        return clip_intersections(P.proj(), P.opacities, P.camera, clip_leaves, W, H, P.settings)

    def clip_raster(state, x):
        return cuda.rasterize_clipped(*x, P.depths, clip_leaves.boxes, P.camera, W, H, *state, P.settings)

    def unclipped_prep():
        offsets, flat = gsplat_prep()
        return offsets[0], flat, torch.full_like(flat, -1)

    return {
        "gsplat": (gsplat_prep, gsplat_raster),
        "one-pass": (one_pass_prep, gsplat_raster),
        "clip": (clip_prep, clip_raster),
        "unclipped": (unclipped_prep, clip_raster),
    }


def methods_cpu(P: Projected, position, clip_leaves):
    """The same methods with the torch twins (``--smoke``: exercises the code, not speed)."""
    from landmark_plugin.core.clip import rasterize_clipped, sharing_copies
    from landmark_plugin.core.raster_ref import rasterize

    W, H, s = P.width, P.height, P.settings

    def plain(group):
        return lambda state, x: rasterize(P.proj(x[0], x[1]), x[2], x[3], W, H, s, group=group)

    def clip_prep():
        return sharing_copies(P.proj(), P.opacities, P.camera, clip_leaves.boxes, W, H, s)

    def clip_raster(copies, x):
        return rasterize_clipped(P.proj(x[0], x[1]), x[2], x[3], copies, clip_leaves.boxes, P.camera, W, H, s,
                                 leaf_position=clip_leaves.leaf_position)

    return {
        "gsplat": (lambda: None, plain(None)),
        "one-pass": (lambda: None, plain(position)),
        "clip": (clip_prep, clip_raster),
    }


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_method(prep, raster, P: Projected, device: str, repeats: int, warmup: int) -> dict:
    """Median prep and raster (forward + backward) times in ms, and the image it rendered."""
    g = torch.Generator(device=device).manual_seed(0)
    cot = torch.randn(P.height, P.width, 4, device=device, generator=g, dtype=P.means2d.dtype)
    prep_ms, raster_ms = [], []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        state = prep()
        _sync(device)
        t1 = time.perf_counter()
        x = P.leaves()
        _sync(device)
        t2 = time.perf_counter()
        color, trans = raster(state, x)
        loss = (color * cot[..., :3]).sum() + (trans * cot[..., 3:]).sum()
        loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            prep_ms.append(1e3 * (t1 - t0))
            raster_ms.append(1e3 * (t3 - t2))
    entries = state[1].shape[0] if isinstance(state, tuple) else (state.gaussian.shape[0] if state is not None else 0)
    return dict(prep_ms=statistics.median(prep_ms), raster_ms=statistics.median(raster_ms), entries=int(entries),
                image=color.detach(), trans=trans.detach())


def run(args) -> list[dict]:
    from landmark_plugin.core.projection import RasterSettings

    device = "cpu" if args.smoke else "cuda"
    settings = RasterSettings()
    gaussians, viewmat, K = make_scene(args.num_gaussians, args.width, args.height, device, args.seed)
    P = Projected(gaussians, viewmat, K, args.width, args.height, settings)
    rows = []
    for depth in args.depths:
        position, clip_leaves = leaves_for(gaussians, viewmat, depth)
        methods = (methods_cpu if args.smoke else methods_cuda)(P, position, clip_leaves)
        base = None
        for name, (prep, raster) in methods.items():
            r = time_method(prep, raster, P, device, args.repeats, args.warmup)
            total = r["prep_ms"] + r["raster_ms"]
            if name == "gsplat":
                base = r
            diff = float((r["image"] - base["image"]).abs().max())
            rows.append(dict(depth=depth, method=name, prep_ms=r["prep_ms"], raster_ms=r["raster_ms"], total_ms=total,
                             ratio=total / (base["prep_ms"] + base["raster_ms"]),
                             raster_ratio=r["raster_ms"] / base["raster_ms"], entries=r["entries"],
                             max_abs_diff_vs_gsplat=diff))
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    return (f"{r['depth']:>5} {r['method']:>10} {r['prep_ms']:>9.2f} {r['raster_ms']:>10.2f} {r['total_ms']:>9.2f} "
            f"{r['ratio']:>8.3f} {r['raster_ratio']:>8.3f} {r['entries']:>11} {r['max_abs_diff_vs_gsplat']:>10.2e}")


HEADER = f"{'depth':>5} {'method':>10} {'prep ms':>9} {'raster ms':>10} {'total ms':>9} {'x gsplat':>8} {'x raster':>8} {'entries':>11} {'|diff|':>10}"


def memcheck(args) -> None:
    """A tiny clipped forward + backward for compute-sanitizer (the kernel path only)."""
    from landmark_plugin.core.render_clip import render_partial_clipped

    gaussians, viewmat, K = make_scene(2000, 128, 96, "cuda", args.seed)
    gaussians = type(gaussians)(*(t.requires_grad_(True) for t in gaussians.fields()))
    _, clip_leaves = leaves_for(gaussians, viewmat, 2)
    part = render_partial_clipped(gaussians, clip_leaves, viewmat, K, 128, 96, None, with_depth=True, backend="gsplat",
                                  absgrad=True)
    (part.color.sum() + part.transmittance.sum()).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(part.color).all() and torch.isfinite(gaussians.means.grad).all()
    print("memcheck case done: 2000 Gaussians, 128x96, depth 2, forward + backward")


def profile(args) -> None:
    """Per-kernel GPU time of each method's prep and raster at one tree depth (torch.profiler)."""
    from landmark_plugin.core.projection import RasterSettings

    settings = RasterSettings()
    gaussians, viewmat, K = make_scene(args.num_gaussians, args.width, args.height, "cuda", args.seed)
    P = Projected(gaussians, viewmat, K, args.width, args.height, settings)
    position, clip_leaves = leaves_for(gaussians, viewmat, args.profile)
    for name, (prep, raster) in methods_cuda(P, position, clip_leaves).items():
        time_method(prep, raster, P, "cuda", repeats=1, warmup=2)
        print_kernel_times(lambda: time_method(prep, raster, P, "cuda", repeats=args.repeats, warmup=0),
                           f"{name}, depth {args.profile}: GPU time over {args.repeats} forward + backward")


def print_kernel_times(run_once, title: str, rows: int = 14) -> None:
    """Run ``run_once`` under torch.profiler and print its CUDA kernels by total time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_once()
        torch.cuda.synchronize()
    print(f"\n== {title} ==")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-gaussians", type=int, default=2_000_000)
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--depths", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the rows (and the settings) here")
    p.add_argument("--smoke", action="store_true", help="CPU, torch twins, 300 Gaussians at 40x30")
    p.add_argument("--memcheck", action="store_true", help="one tiny clipped forward + backward on the GPU")
    p.add_argument("--profile", type=int, default=None, metavar="DEPTH",
                   help="per-kernel GPU times of every method at this tree depth (torch.profiler)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_gaussians, args.width, args.height = 300, 40, 30
        args.depths, args.repeats, args.warmup = [0, 2], 1, 0
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.memcheck:
        memcheck(args)
        return 0
    if args.profile is not None:
        profile(args)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench_clip.py needs a CUDA device (use --smoke for the CPU twins)", file=sys.stderr)
        return 2
    print(f"{args.num_gaussians} Gaussians, {args.width}x{args.height}, "
          f"{'CPU twins (smoke)' if args.smoke else torch.cuda.get_device_name()}")
    print(HEADER)
    rows = run(args)
    if args.json is not None:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
