#!/usr/bin/env python
"""Viewer rendering speed: frames/s of one 1920x1080 camera for 1M, 10M and 50M Gaussians.

What the viewer pays per frame is a forward render of every Gaussian (no gradients).  Methods,
all on the same Gaussians and camera (the aerial slab of ``bench_clip.make_scene``):

  gsplat     gsplat.rasterization (projection, SH, isect + sort, rasteriser): the peer
  one-pass   retina-gs ``plain`` mode: ``core.render.render_partial`` with every Gaussian's
             leaf position in a kd-tree of ``--depth`` (the whole model as one partial)
  clip       retina-gs ``clip`` mode: ``core.render_clip.render_partial_clipped``

``max |diff|`` is against gsplat's image: 0 up to rounding for clip (exact), not for one-pass
(plain mode reorders Gaussians that straddle a leaf boundary; that is what clip mode fixes).
frames/s is 1 / the median wall time of ``--repeats`` synchronised renders after a warm-up;
``peak MiB`` is the render's own peak above the resident Gaussians.  A count that runs out of
memory is reported as such and the run goes on.  The last lines are a table of frames/s and
the ratio to gsplat; ``--json`` writes all rows.

    python scripts/bench_render.py --json bench_render.json          # 1M 10M 50M, 1920x1080
    python scripts/bench_render.py --smoke                           # CPU, torch backend, tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HEADER = f"{'gaussians':>11} {'method':>9} {'fps':>9} {'x gsplat':>9} {'peak MiB':>9} {'max |diff|':>11}"


def _bench_clip():
    """scripts/bench_clip.py as a module: its scene and leaf helpers are the ones used here."""
    path = Path(__file__).resolve().with_name("bench_clip.py")
    spec = importlib.util.spec_from_file_location("bench_clip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def renderers(gaussians, viewmat, K, width, height, depth: int, backend: str):
    """name -> render() returning [H, W, 3] colour (premultiplied, no background)."""
    from landmark_plugin.core.projection import RasterSettings
    from landmark_plugin.core.render import render_partial
    from landmark_plugin.core.render_clip import render_partial_clipped

    settings = RasterSettings()
    position, clip_leaves = _bench_clip().leaves_for(gaussians, viewmat, depth)
    num_positions = int(clip_leaves.leaf_position.shape[0])

    def one_pass():
        return render_partial(gaussians, position, viewmat, K, width, height, None, settings, backend=backend,
                              num_leaf_positions=num_positions).color

    def clip():
        return render_partial_clipped(gaussians, clip_leaves, viewmat, K, width, height, None, settings,
                                      backend=backend).color

    def peer():
        if backend == "torch":  # the CPU smoke: the unpartitioned reference render stands in
            return render_partial(gaussians, torch.zeros_like(position), viewmat, K, width, height, None, settings,
                                  backend="torch").color
        from gsplat import rasterization

        colors, _, _ = rasterization(
            gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.sh[:, 0, :],
            viewmat[None], K[None], width, height, eps2d=settings.eps2d, packed=False,
        )
        return colors[0]

    return {"gsplat": peer, "one-pass": one_pass, "clip": clip}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_render(render, device: torch.device, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(median seconds, peak MiB above the start, last image)."""
    with torch.no_grad():
        image = render()  # warm-up: builds kernels, allocator pools
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            image = render()
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else 0.0
    return statistics.median(times), peak, image


def run(args) -> list[dict]:
    device = torch.device("cpu" if args.smoke else "cuda")
    backend = "torch" if args.smoke else "auto"
    make_scene = _bench_clip().make_scene
    rows = []
    for count in args.counts:
        try:
            gaussians, viewmat, K = make_scene(count, args.width, args.height, str(device), seed=count)
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(gaussians=count, method="all", error="out of memory creating the Gaussians"))
            print(f"{count:>11} out of memory creating the Gaussians")
            continue
        reference = None
        for name, render in renderers(gaussians, viewmat, K, args.width, args.height, args.depth, backend).items():
            if args.profile:
                with torch.no_grad():
                    render()
                    _bench_clip().print_kernel_times(render, f"{name}, {count} Gaussians: one frame")
            try:
                seconds, peak, image = time_render(render, device, args.repeats)
            except torch.cuda.OutOfMemoryError as err:
                rows.append(dict(gaussians=count, method=name, error=f"out of memory: {err}"[:200]))
                print(f"{count:>11} {name:>9} out of memory")
                torch.cuda.empty_cache()
                continue
            if reference is None:
                reference = (seconds, image)
            row = dict(gaussians=count, method=name, fps=1.0 / seconds, ms=seconds * 1e3, peak_mib=peak,
                       ratio_fps_vs_gsplat=reference[0] / seconds,
                       max_abs_diff_vs_gsplat=float((image - reference[1]).abs().max()))
            rows.append(row)
            print(f"{count:>11} {name:>9} {row['fps']:>9.1f} {row['ratio_fps_vs_gsplat']:>9.3f} {peak:>9.0f} "
                  f"{row['max_abs_diff_vs_gsplat']:>11.2e}", flush=True)
        del gaussians
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--depth", type=int, default=4, help="kd-tree depth of the one-pass / clip leaves")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="CPU, torch backend, tiny sizes")
    parser.add_argument("--profile", action="store_true", help="also print each renderer's CUDA kernel times")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.counts, args.width, args.height, args.depth, args.repeats = [300, 600], 48, 32, 2, 1
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_render.py needs a CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    print(f"viewer render speed, {args.width}x{args.height}, tree depth {args.depth}, "
          f"{'CPU torch backend (smoke)' if args.smoke else torch.cuda.get_device_name()}")
    print(HEADER)
    rows = run(args)
    print("\nsummary (frames/s, ratio to gsplat.rasterization)")
    print(HEADER)
    for row in rows:
        if "error" in row:
            print(f"{row['gaussians']:>11} {row['method']:>9} {row['error'][:40]}")
        else:
            print(f"{row['gaussians']:>11} {row['method']:>9} {row['fps']:>9.1f} {row['ratio_fps_vs_gsplat']:>9.3f} "
                  f"{row['peak_mib']:>9.0f} {row['max_abs_diff_vs_gsplat']:>11.2e}")
    if args.json is not None:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
