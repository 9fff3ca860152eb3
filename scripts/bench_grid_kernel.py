#!/usr/bin/env python
"""Fused plane x line feature kernel micro-benchmark: forward + backward against the torch paths.

Paths (same planes, lines and points; the loss is the features times a fixed random cotangent):
  fused        landmark_plugin.cuda_grid.sample_block_features: csrc/, all blocks and factors in one
               launch (forward), one launch for every gradient (backward)
  twin         core.grid_features.sample_block_features: index_select of channels-last rows over
               all blocks at once (the kernel's torch twin and the reference for the errors)
  grid_sample  F.grid_sample per factor with the blocks stacked as the batch: planes stored
               channels first [B, C, Rv, Ru], lines [B, C, Rl, 1]; points grouped by block (sort
               and pad, timed: a training step has to do it for every batch of samples) and
               gathered back to point order
Points are samples along rays in ray order (as nerfstudio hands them to the field), bunched
around a surface the way proposal sampling leaves them; ``--order random`` shuffles them.
Columns: forward, backward and total ms (median), ``x grid_sample`` (grid_sample total / total),
max |features - twin|, max |gradient - twin| / max |twin gradient| over all planes and lines,
peak extra GPU memory.  Target (issue 6): fused >= 2x grid_sample, errors <= 1e-4.

    python scripts/bench_grid_kernel.py --out bench_grid_kernel.json    # 8x8 blocks, 3 levels, 512^2
    python scripts/bench_grid_kernel.py --smoke --out /tmp/b.json       # CPU, tiny: fused unavailable
    compute-sanitizer --tool memcheck python scripts/bench_grid_kernel.py --memcheck
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from landmark_plugin.core.grid_features import MODES, route_points, sample_block_features

PATHS = ("fused", "twin", "grid_sample")


def make_factors(args, channels: int, device: str):
    """Planes [B, R, R, C] and lines [B or 1, Rl, C] per (level, mode pair); level l halves the texels."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    num_blocks = args.blocks[0] * args.blocks[1]
    planes, lines, axes = [], [], []
    for level in range(args.levels):
        res, line_res = max(2, args.plane_res >> level), max(2, args.line_res >> level)
        for factor_axes in MODES[args.mode]:
            planes.append(0.1 * torch.randn(num_blocks, res, res, channels, device=device, generator=gen))
            line_blocks = 1 if args.shared_line else num_blocks
            lines.append(0.1 * torch.randn(line_blocks, line_res, channels, device=device, generator=gen))
            axes.append(factor_axes)
    return planes, lines, axes


def ray_points(n: int, blocks, samples: int, order: str, seed: int, device: str):
    """(block_index, local) of n samples on rays of ``samples`` each, ray after ray, sorted along
    the ray inside the box: half spread over the ray's chord, half within ~2% of the box around a
    surface point (as proposal sampling leaves them)."""
    gen = torch.Generator().manual_seed(seed)
    rays = -(-n // samples)
    surface = torch.rand(rays, 1, 3, generator=gen)
    direction = torch.randn(rays, 1, 3, generator=gen)
    direction[..., 2] = -direction[..., 2].abs() - 1.0  # looking down, as aerial captures do
    direction = F.normalize(direction, dim=-1)
    # the chord of the unit box through the surface point: t in [t_near, t_far] (t_near <= 0 <= t_far)
    t0, t1 = (0.0 - surface) / direction, (1.0 - surface) / direction
    t_near = torch.minimum(t0, t1).amax(-1, keepdim=True)
    t_far = torch.maximum(t0, t1).amin(-1, keepdim=True)
    near = samples // 2
    spread = t_near + torch.rand(rays, samples - near, 1, generator=gen) * (t_far - t_near)
    bunched = torch.maximum(torch.minimum(0.02 * torch.randn(rays, near, 1, generator=gen), t_far), t_near)
    t = torch.cat([spread, bunched], dim=1).sort(dim=1).values
    unit = (surface + t * direction).reshape(-1, 3)[:n]
    if order == "random":
        unit = unit[torch.randperm(n, generator=gen)]
    block_index, local = route_points(unit, tuple(blocks))
    return block_index.to(device), local.to(device)


# ---------------------------------------------------------------------------------------
# the grid_sample comparison path


def grid_sample_features(planes_cf, lines_cf, points, block_index, axes):
    """Features [N, K*C] with F.grid_sample, blocks as the batch (planes [B, C, Rv, Ru], lines [B|1, C, Rl, 1])."""
    num_blocks, n = planes_cf[0].shape[0], points.shape[0]
    order = torch.argsort(block_index)
    counts = torch.bincount(block_index, minlength=num_blocks)
    width = max(1, int(counts.max()))  # a host sync, as any padded batching needs
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(n, device=points.device) - starts[block_index[order]]
    slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)  # each point's place in its block
    padded = points.new_zeros(num_blocks, width, 3).index_put((block_index, slot), points)
    features = []
    for plane, line, (u, v, w) in zip(planes_cf, lines_cf, axes):
        grid = padded[..., [u, v]][:, :, None, :]  # x = u (columns), y = v (rows)
        plane_features = F.grid_sample(plane, grid, mode="bilinear", padding_mode="border", align_corners=True)
        line_grid = torch.stack([torch.zeros_like(padded[..., w]), padded[..., w]], -1)[:, :, None, :]
        line = line.expand(num_blocks, -1, -1, -1)
        line_features = F.grid_sample(line, line_grid, mode="bilinear", padding_mode="border", align_corners=True)
        features.append(plane_features * line_features)  # [B, C, width, 1]
    stacked = torch.cat(features, dim=1)[..., 0].transpose(1, 2)  # [B, width, K*C]
    return stacked[block_index, slot]


# ---------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def path_function(name: str, planes, lines, axes) -> Callable:
    """name -> (leaves, features(leaves, points, block_index)); leaves are fresh trainable copies."""
    count = len(planes)
    if name == "grid_sample":
        leaves = [p.permute(0, 3, 1, 2).contiguous() for p in planes] + [x.permute(0, 2, 1)[..., None].contiguous()
                                                                         for x in lines]
    else:
        leaves = [t.clone() for t in (*planes, *lines)]
    leaves = [t.requires_grad_(True) for t in leaves]

    def run(points, block_index):
        if name == "fused":
            from landmark_plugin import cuda_grid

            return cuda_grid.sample_block_features(leaves[:count], leaves[count:], points, block_index, axes)
        if name == "twin":
            return sample_block_features(leaves[:count], leaves[count:], points, block_index, axes)
        return grid_sample_features(leaves[:count], leaves[count:], points, block_index, axes)

    return leaves, run


def _as_channels_last(name: str, grads: List[torch.Tensor], count: int) -> List[torch.Tensor]:
    """Gradients in the twin's layout (grid_sample's are channels first)."""
    if name != "grid_sample":
        return grads
    return [g.permute(0, 2, 3, 1) for g in grads[:count]] + [g[..., 0].permute(0, 2, 1) for g in grads[count:]]


def time_path(name: str, planes, lines, axes, points, block_index, cotangent, args, device: str,
              reference: Optional[dict]) -> dict:
    """Median forward and backward ms, peak extra memory, and the errors against ``reference``."""
    leaves, run = path_function(name, planes, lines, axes)
    forward_ms, backward_ms = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    for i in range(args.warmup + args.repeats):
        for t in leaves:
            t.grad = None
        _sync(device)
        t0 = time.perf_counter()
        features = run(points, block_index)
        _sync(device)
        t1 = time.perf_counter()
        (features * cotangent).sum().backward()
        _sync(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            forward_ms.append(1e3 * (t1 - t0))
            backward_ms.append(1e3 * (t2 - t1))
    row = dict(path=name, available=True, forward_ms=statistics.median(forward_ms),
               backward_ms=statistics.median(backward_ms))
    row["total_ms"] = row["forward_ms"] + row["backward_ms"]
    row["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    grads = _as_channels_last(name, [t.grad for t in leaves], len(planes))
    if reference is None:
        return row, dict(features=features.detach(), grads=[g.detach() for g in grads])
    row["max_abs_err_vs_twin"] = float((features.detach() - reference["features"]).abs().max())
    row["max_grad_rel_err_vs_twin"] = max(
        float((g - r).abs().max() / r.abs().max().clamp_min(1e-12)) for g, r in zip(grads, reference["grads"]))
    return row, None


def fused_unavailable(device: str) -> Optional[str]:
    if device != "cuda":
        return "CPU run: the fused kernel needs CUDA"
    from landmark_plugin import cuda

    try:
        cuda.load()
        return None
    except cuda.CudaUnavailable as err:
        return str(err)


def run(args) -> List[dict]:
    device = "cpu" if args.smoke else "cuda"
    unavailable = fused_unavailable(device)
    if args.points_per_thread is not None:
        from landmark_plugin import cuda_grid

        cuda_grid.GRID_POINTS_PER_THREAD = args.points_per_thread
    rows = []
    for channels in args.channels:
        planes, lines, axes = make_factors(args, channels, device)
        for n in args.points:
            block_index, points = ray_points(n, args.blocks, args.samples_per_ray, args.order, args.seed, device)
            gen = torch.Generator(device=device).manual_seed(args.seed + 1)
            cotangent = torch.randn(n, len(axes) * channels, device=device, generator=gen)
            common = dict(channels=channels, points=n, factors=len(axes))
            twin_row, reference = time_path("twin", planes, lines, axes, points, block_index, cotangent, args, device,
                                            None)
            twin_row.update(max_abs_err_vs_twin=0.0, max_grad_rel_err_vs_twin=0.0)
            found: Dict[str, dict] = {"twin": twin_row}
            for name in ("fused", "grid_sample"):
                if name == "fused" and unavailable is not None:
                    found[name] = dict(path=name, available=False, reason=unavailable)
                    continue
                found[name], _ = time_path(name, planes, lines, axes, points, block_index, cotangent, args, device,
                                           reference)
            del reference
            base = found["grid_sample"]["total_ms"]
            for name in PATHS:
                row = {**common, **found[name]}
                if row["available"]:
                    row["speedup_vs_grid_sample"] = base / row["total_ms"]
                rows.append(row)
                print(_row(row), flush=True)
    return rows


HEADER = (f"{'C':>3} {'points':>9} {'path':>12} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} {'x grid_sample':>13} "
          f"{'|fwd err|':>9} {'grad rel':>9} {'peak GB':>8}")


def _row(r: dict) -> str:
    head = f"{r['channels']:>3} {r['points']:>9} {r['path']:>12}"
    if not r["available"]:
        return f"{head}   unavailable: {r['reason']}"
    peak = f"{r['peak_extra_gb']:>8.2f}" if r["peak_extra_gb"] is not None else f"{'-':>8}"
    return (f"{head} {r['forward_ms']:>9.2f} {r['backward_ms']:>9.2f} {r['total_ms']:>9.2f} "
            f"{r['speedup_vs_grid_sample']:>13.2f} {r['max_abs_err_vs_twin']:>9.1e} "
            f"{r['max_grad_rel_err_vs_twin']:>9.1e} {peak}")


def memcheck(args) -> None:
    """A small fused forward + backward (point gradients too) for compute-sanitizer."""
    from landmark_plugin import cuda_grid

    args.blocks, args.plane_res, args.line_res, args.levels, args.mode = [3, 2], 9, 5, 2, "vm"
    for channels in (3, 6, 16):  # the 1-, 2- and 4-wide paths
        planes, lines, axes = make_factors(args, channels, "cuda")
        block_index, points = ray_points(3000, args.blocks, 48, "rays", args.seed, "cuda")
        leaves = [t.requires_grad_(True) for t in (*planes, *lines, points.clone())]
        features = cuda_grid.sample_block_features(leaves[:6], leaves[6:12], leaves[12], block_index, axes, poison=True)
        features.square().sum().backward()
        torch.cuda.synchronize()
        assert torch.isfinite(features).all() and all(torch.isfinite(t.grad).all() for t in leaves)
    print("memcheck case done: 3000 points, 3x2 blocks, 6 factors, C = 3, 6, 16, forward + backward")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs=2, default=[8, 8])
    p.add_argument("--levels", type=int, default=3, help="levels; level l has plane_res >> l texels per side")
    p.add_argument("--plane-res", type=int, default=512, help="plane texels per side at the finest level")
    p.add_argument("--line-res", type=int, default=128, help="line texels at the finest level")
    p.add_argument("--mode", choices=sorted(MODES), default="xy-z")
    p.add_argument("--shared-line", action="store_true", help="one line for all blocks")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 48], help="16 density / 48 appearance")
    p.add_argument("--points", type=int, nargs="+", default=[1_000_000, 4_000_000])
    p.add_argument("--samples-per-ray", type=int, default=48)
    p.add_argument("--order", choices=["rays", "random"], default="rays")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--points-per-thread", type=int, choices=[1, 4, 8], default=None,
                   help="fused backward: consecutive points per thread (default: cuda_grid.GRID_POINTS_PER_THREAD)")
    p.add_argument("--out", "--json", dest="out", type=Path, default=None, help="write settings and rows here")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (exercises the code, not speed)")
    p.add_argument("--memcheck", action="store_true", help="a small fused forward + backward on the GPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.blocks, args.levels, args.plane_res, args.line_res = [2, 2], 2, 9, 5
        args.channels, args.points, args.repeats, args.warmup = [4], [500], 1, 0
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.memcheck:
        memcheck(args)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench_grid_kernel.py needs a CUDA device (use --smoke for a CPU run of the torch paths)",
              file=sys.stderr)
        return 2
    device_name = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"{args.blocks[0]}x{args.blocks[1]} blocks, {args.levels} levels x {args.mode}, planes {args.plane_res}^2, "
          f"lines {args.line_res}{' shared' if args.shared_line else ''}, points in {args.order} order; {device_name}")
    rows = run(args)
    if args.out is not None:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(json.dumps({"device": device_name, "settings": settings, "rows": rows}, indent=2,
                                       default=str))
        print(f"wrote {args.out}")
    print()
    print(HEADER)
    for row in rows:
        print(_row(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
