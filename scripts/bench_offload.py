#!/usr/bin/env python
"""retina-gs out of core (issue 18's benchmark): the largest Gaussian count one GPU trains with
every Gaussian in GPU memory, with ``--pipeline.model.offload host`` and with ``offload stream``,
and their throughput at a count all train, under the same GPU memory cap.  Every mode renders in
``--render-mode`` (default auto: clip with the csrc/ kernel, as retina-gs trains by default).

The phases run as their own processes through scripts/bench_retina_dist.py's machinery (its
generated 1080p city, its ``Bench`` training context and its train phase: images/s over timed
steps at ``--gaussians``, then 2 steps at each ``--probe-per-gpu`` count, ascending, until one
runs out of memory):

  gen             the synthetic city (cameras, ground truth rendered on the GPU, JPEG)
  train-memory    visible Adam (the optimiser offload needs, so both modes step the same rows),
                  every Gaussian on the GPU; probes --memory-probes
  train-offload   the same with offload host: the Gaussians are made in host memory and each
                  batch stages the leaves its cameras can draw (--offload-budget-gb of leaves kept
                  on the GPU, locality camera order in every mode); probes --offload-probes
  train-stream    offload stream: one subtree of --stream-depth on the GPU at a time, each frame
                  composited from the subtrees' partials, backward re-rendering each; probes
                  --stream-probes

Every phase caps the GPU with ``torch.cuda.set_per_process_memory_fraction`` at --gpu-cap-gb
(0: the whole GPU, for the run that trains as many Gaussians as host memory holds).  A probe that
runs out of GPU memory ends that mode's probes; one that runs out of host memory ends the phase
(the phase record keeps every probe before it).  Printed last: the largest count per mode and
their ratio (target >= 4), images/s per mode at --gaussians and their ratio (target >= 0.6), the
fraction of rows staged per batch and the host memory.  JSON, phase records and a PNG of peak GPU
memory against the count go to --out.

    python -P scripts/bench_offload.py --out OUT                     # device: 24 GiB cap, 1080p city
    python -P scripts/bench_offload.py --gpu-cap-gb 0 --num-images 2000 --modes offload \\
        --offload-probes 150e6 --gaussians 150e6 --out OUT           # the uncapped >= 150M run
    python scripts/bench_offload.py --smoke --launcher spawn --out OUT   # CPU, tiny, seconds
    python scripts/bench_offload.py --visible-fractions --cities 4 8 12     # CPU: what offload can gain

``--visible-fractions`` needs no GPU and trains nothing: for the city of each ``--cities`` size (and
``--tree-depth``), the fraction of the Gaussians (surface samples, split by the kd-tree) in the
leaves each camera can draw (``core.frustum.leaves_in_view``, the test offload stages by) and in
the union over each batch of ``--batch`` cameras in the locality order.  A batch must hold its
union on the GPU, so the largest count offload can train is about the in-memory one divided by
the largest batch fraction.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_retina_dist as brd  # noqa: E402

from landmark_plugin.bench_phases import GB, PhaseDriver, Record, plot_memory_curves, run_phase_rank  # noqa: E402

SCRIPT = Path(__file__).resolve()
MODES = ("memory", "offload", "stream")
OFFLOAD = {"memory": "none", "offload": "host", "stream": "stream"}
TARGETS = {"max_count": 4.0, "images_per_s": 0.6}
MIN_PHASE_S = {"gen": 20, "train": 40}
PHASE_CAP_S = {"gen": 300, "train": 240}


def parse(argv=None):
    p = brd.parser(__doc__)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which modes to run")
    p.add_argument("--gpu-cap-gb", type=float, default=24.0,
                   help="GPU memory cap per process in GiB (torch.cuda.set_per_process_memory_fraction); 0: none")
    p.add_argument("--memory-probes", type=float, nargs="+", default=[5e6, 7.5e6, 10e6, 12.5e6, 15e6, 20e6],
                   help="counts probed in memory, ascending")
    p.add_argument("--offload-probes", type=float, nargs="+", default=[20e6, 30e6, 40e6, 50e6, 60e6, 80e6],
                   help="counts probed with offload host, ascending")
    p.add_argument("--stream-probes", type=float, nargs="+", default=[20e6, 40e6, 60e6, 80e6, 100e6],
                   help="counts probed with offload stream, ascending")
    p.add_argument("--stream-depth", type=int, default=4, help="--pipeline.model.offload-stream-depth")
    p.add_argument("--render-mode", choices=("auto", "clip", "plain"), default="auto", help="--pipeline.model.mode of every mode")
    p.add_argument("--offload-budget-gb", type=float, default=2.0, help="--pipeline.model.offload-budget-gb")
    p.add_argument("--visible-fractions", action="store_true",
                   help="CPU only: per camera and batch, the fraction of rows offload would stage (see above)")
    p.add_argument("--cities", type=int, nargs="+", default=[4, 8, 12],
                   help="with --visible-fractions: city sizes (blocks along x and y) to measure")
    p.add_argument("--mode", choices=MODES, default="memory", help=argparse.SUPPRESS)
    # Offload gains only where a batch draws a fraction of the leaves: the cameras of a 4 x 4-block
    # city see nearly all of it (aerial views span ~2.5 blocks, street views look down whole
    # streets), so the city is larger and the leaves finer (BENCHMARKS.md: visible fractions).
    p.set_defaults(gpus=1, num_images=400, blocks=12, tree_depth=8, batch=2, gaussians=5e6, warmup=2, steps=10)
    args = brd.smoke_sizes(p.parse_args(argv))
    args.gpus = 1  # one GPU: offload is the single-GPU answer to a model larger than it
    if args.smoke:
        args.memory_probes, args.offload_probes, args.gaussians, args.tree_depth = [300, 600], [600, 1200], 300, 4
        args.stream_probes, args.stream_depth = [600, 1200], 2
    args.probe_per_gpu = {"memory": args.memory_probes, "offload": args.offload_probes, "stream": args.stream_probes}[args.mode]
    if args.gpu_cap_gb > 0 and not args.smoke:
        args.capacity_mb = args.gpu_cap_gb * 1024
    return args


class OffloadBench(brd.Bench):
    """bench_retina_dist's training context with visible Adam, a GPU memory cap and, in offload
    mode, the Gaussians made in host memory and staged by leaf."""

    def __init__(self, args, rank: int, world: int, local_rank: int, say):
        if torch.cuda.is_available() and not args.smoke and args.gpu_cap_gb > 0:
            device = torch.device("cuda", local_rank)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_cap_gb * GB / total), device)
        super().__init__(args, rank, world, local_rank, say)

    def configure(self, config) -> None:
        model = config.pipeline.model
        model.visible_adam = True
        model.mode = self.args.render_mode
        model.offload = OFFLOAD[self.args.mode]
        model.offload_budget_gb = self.args.offload_budget_gb
        model.offload_stream_depth = self.args.stream_depth
        config.pipeline.camera_order = "locality"  # the same batches in both modes

    def gaussian_device(self) -> torch.device:
        return torch.device("cpu") if self.args.mode != "memory" else self.device

    def install(self, count: int) -> None:
        from landmark_plugin.gaussians.visible_adam import bind_visibility

        self.pipeline.model.offload_store = None  # the store belongs to the Gaussians it replaced
        super().install(count)
        bind_visibility(self.pipeline.model, self.optimizers.optimizers)

    def release(self) -> None:
        self.pipeline.model.offload_store = None
        super().release()

    def measure(self, step, warmup: int, steps: int, deadline: Optional[float]) -> Dict:
        """bench_retina_dist's measure plus host memory and, with offload, the rows staged."""
        import psutil

        store = self.pipeline.model.offload_store
        before = len(store.staged_rows) if store is not None else 0
        result = super().measure(step, warmup, steps, deadline)
        result["host_rss"] = psutil.Process().memory_info().rss
        store = self.pipeline.model.offload_store
        if store is not None and store.stream is not None:
            result["stream_groups"] = len(store.stream.groups)
            result["streamed_batches"] = store.stream.streamed_batches
            if store.rows is not None:
                result["host_store_bytes"] = store.rows.numel() * store.rows.element_size()
        elif store is not None and len(store.staged_rows) > before:
            staged = store.staged_rows[before:]
            result["held_fraction"] = sum(h / max(t, 1) for h, t in staged) / len(staged)
            result["uploaded_rows_per_step"] = sum(store.uploaded_rows[before:]) / len(staged)
            if store.rows is not None:
                result["host_store_bytes"] = store.rows.numel() * store.rows.element_size()
        return result


def visible_fractions(args) -> List[Dict[str, Any]]:
    """Per city size: the mean and largest fraction of rows a camera, and a batch, can draw."""
    import numpy as np
    from nerfstudio.models.splatfacto import get_viewmat

    from landmark_plugin.core.frustum import LeafBounds, leaves_in_view
    from landmark_plugin.core.partition import build_kdtree_with_leaves
    from landmark_plugin.core.schedule import locality_order, look_points
    from landmark_plugin.data.city import make_cameras, make_layout
    from landmark_plugin.data.city_gaussians import surface_samples
    from landmark_plugin.data.city_render import surface_area

    rows = []
    for blocks in args.cities:
        config = brd.city_config(argparse.Namespace(**{**vars(args), "blocks": blocks}))
        layout = make_layout(config)
        cameras = make_cameras(config, layout)
        xyz, _ = surface_samples(layout, 200_000, seed=1)
        points = torch.from_numpy(xyz).float()
        # Gaussians of the benchmark's size: scatter_gaussians' spacing at --gaussians, 3 sigma
        spacing = math.sqrt(surface_area(layout) / args.gaussians)
        tree, leaf_ids = build_kdtree_with_leaves(points, args.tree_depth)
        bounds = LeafBounds.of(points, torch.full_like(points, spacing), leaf_ids, 2**args.tree_depth)
        per_leaf = torch.bincount(leaf_ids, minlength=2**args.tree_depth).double()
        c2w = torch.from_numpy(cameras.camera_to_worlds[:, :3, :4]).float()
        K = torch.tensor(cameras.intrinsics, dtype=torch.float32)
        viewmats = get_viewmat(c2w)
        seen = torch.stack([leaves_in_view(bounds, viewmats[i], K, config.width, config.height)
                            for i in range(len(c2w))])  # [C, L]
        camera = (seen.double() @ per_leaf / per_leaf.sum()).numpy()
        order = locality_order(look_points(c2w.double(), tree.bounds[0].double(), tree.bounds[1].double()),
                               tree.bounds[0], tree.bounds[1], 16, torch.Generator().manual_seed(0))
        batches = [seen[order[i : i + args.batch]].any(dim=0) for i in range(0, len(order), args.batch)]
        batch = np.array([float(b.double() @ per_leaf / per_leaf.sum()) for b in batches])
        rows.append({"blocks": blocks, "tree_depth": args.tree_depth, "cameras": len(c2w), "batch": args.batch,
                     "camera_mean": float(camera.mean()), "camera_max": float(camera.max()),
                     "batch_mean": float(batch.mean()), "batch_max": float(batch.max()),
                     "gain_bound": float(1.0 / batch.max())})
        r = rows[-1]
        print(f"city {blocks}x{blocks} blocks, {2**args.tree_depth} leaves, {len(c2w)} cameras: rows a camera draws "
              f"mean {r['camera_mean']:.3f} max {r['camera_max']:.3f}; a batch of {args.batch}: mean {r['batch_mean']:.3f} "
              f"max {r['batch_max']:.3f} -> largest count at most {r['gain_bound']:.2f}x in-memory", flush=True)
    return rows


def phase_entry(comm, argv: List[str]) -> None:
    args = parse(argv)

    def body(record: Record, say, rank: int, world: int, local_rank: int) -> None:
        brd.run_phase(args, record, lambda: OffloadBench(args, rank, world, local_rank, say), world, say)

    run_phase_rank(comm, args.out, 1, lambda world: "gen" if args.phase == "gen" else f"train-{args.mode}", body)


def largest(result: Dict) -> Dict[str, Any]:
    """The largest count a phase trained (throughput run or probe), and the smallest it could not."""
    runs = [result.get("throughput")] + list(result.get("probes", []))
    trained = [r["count"] for r in runs if r and "images_per_s" in r]
    failed = [r["count"] for r in runs if r and "oom" in r]
    return {"trained": max(trained) if trained else None, "out_of_memory_at": min(failed) if failed else None}


class Driver(PhaseDriver):
    def __init__(self, args, argv: List[str]):
        super().__init__(args, argv, SCRIPT, phase_entry, brd.PRELOAD, MIN_PHASE_S, PHASE_CAP_S)

    def result(self, mode: str) -> Dict:
        return self.phases.get(f"train-{mode}", {}).get("result", {})

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for mode in self.args.modes:
            state = self.phases.get(f"train-{mode}", {})
            entry = largest(self.result(mode))
            if state.get("status") not in (None, "ok") and entry["out_of_memory_at"] is None:
                entry["ended"] = state.get("status")  # host memory or time ended the probes
            throughput = self.result(mode).get("throughput") or {}
            entry.update({k: throughput.get(k) for k in ("count", "images_per_s", "held_fraction", "host_rss",
                                                          "host_store_bytes", "uploaded_rows_per_step")})
            out[mode] = entry
        for mode in ("offload", "stream"):
            if "memory" not in out or mode not in out:
                continue
            mem, off = out["memory"], out[mode]
            prefix = "" if mode == "offload" else "stream_"
            if mem["trained"] and off["trained"]:
                out[f"{prefix}max_count_ratio"] = off["trained"] / mem["trained"]
                # a mode never refused: its ratio is a lower bound of what it could train
                out[f"{prefix}max_count_ratio_is_lower_bound"] = off["out_of_memory_at"] is None
            if mem.get("images_per_s") and off.get("images_per_s") and mem["count"] == off["count"]:
                out[f"{prefix}images_per_s_ratio"] = off["images_per_s"] / mem["images_per_s"]
        return out

    def plot(self, path: Path) -> None:
        curves = []
        for mode in self.args.modes:
            result = self.result(mode)
            runs = [result.get("throughput")] + list(result.get("probes", []))
            points = sorted((r["count"], max(p["allocated"] for p in r["peak_per_rank"]))
                            for r in runs if r and "peak_per_rank" in r)
            name = {"memory": "in GPU memory", "offload": "offload host", "stream": "offload stream"}[mode]
            curve: Dict[str, Any] = {"name": name, "points": points}
            if self.args.capacity_mb:
                curve["capacity"] = self.args.capacity_mb * 2**20
            curves.append(curve)
        scale = GB if not self.args.smoke else 2**20
        plot_memory_curves(path, curves, "Gaussians (millions)", "peak GPU memory (GB, allocated)" if not self.args.smoke
                           else "tensor bytes (MB, CPU proxy)", "retina-gs: GPU memory against the Gaussian count",
                           1e6, scale, "M")

    def table(self, summary: Dict[str, Any]) -> str:
        lines = [f"\n{'mode':8} {'largest trained':>16} {'refused at':>12} {'images/s':>9} {'at count':>12} "
                 f"{'held rows':>10} {'host RSS GB':>12}"]
        for mode in self.args.modes:
            s = summary.get(mode, {})
            num = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            refused = num(s.get("out_of_memory_at"), ",.0f") if s.get("out_of_memory_at") else s.get("ended", "-")
            held = num(s.get("held_fraction"), ".3f")
            rss = num(s["host_rss"] / GB if s.get("host_rss") else None, ".1f")
            lines.append(f"{mode:8} {num(s.get('trained'), ',.0f'):>16} {refused:>12} {num(s.get('images_per_s'), '.2f'):>9} "
                         f"{num(s.get('count'), ',.0f'):>12} {held:>10} {rss:>12}")
        for mode, prefix in (("offload", ""), ("stream", "stream_")):
            if f"{prefix}max_count_ratio" in summary:
                bound = f" (lower bound: {mode} was never refused)" if summary[f"{prefix}max_count_ratio_is_lower_bound"] else ""
                if not summary.get("memory", {}).get("out_of_memory_at"):
                    bound = " (in memory was never refused either: probe larger counts)"
                lines.append(f"largest count {mode} / memory: {summary[f'{prefix}max_count_ratio']:.2f}x (target >= "
                             f"{TARGETS['max_count']}){bound}")
        for mode, prefix in (("stream", "stream_"), ("offload", "")):  # offload's line last (the tests read it)
            if f"{prefix}images_per_s_ratio" in summary:
                lines.append(f"images/s {mode} / memory at the same count: {summary[f'{prefix}images_per_s_ratio']:.3f}x "
                             f"(target >= {TARGETS['images_per_s']})")
        for tag, state in self.phases.items():
            if state["status"] != "ok":
                lines.append(f"phase {tag}: {state['status']} {state.get('reason', '')}".rstrip())
        return "\n".join(lines)

    def main(self) -> int:
        args = self.args
        cap = f"{args.gpu_cap_gb:g} GiB" if args.gpu_cap_gb > 0 else "none"
        self.say(f"budget {args.budget_s:.0f} s, GPU cap {cap}, modes {' '.join(args.modes)}")
        gen = self.run("gen", 1)
        csrc = (gen.get("result", {}).get("result") or {}).get("csrc") or {}
        if not args.smoke and not csrc.get("available"):
            self.argv.append("--no-csrc")
        if brd.scene_ready(args):
            for mode in args.modes:
                self.run("train", 1, ["--mode", mode], tag=f"train-{mode}")
        summary = self.summary()
        self.write_report("bench_offload", summary, self.plot, "offload_memory_vs_count.png")
        print(self.table(summary), flush=True)
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.phase is not None:
        phase_entry(None, argv)
        return 0
    if args.visible_fractions:
        rows = visible_fractions(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "visible_fractions.json").write_text(json.dumps(rows, indent=2))
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench_offload.py needs a CUDA GPU (use --smoke for the CPU code path)", file=sys.stderr)
        return 2
    return Driver(args, argv).main()


if __name__ == "__main__":
    raise SystemExit(main())
