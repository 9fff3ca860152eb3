#!/usr/bin/env python
"""retina-gs against splatfacto on the same data, side by side in one process.

For each scene and method: train ``--steps`` steps with nerfstudio's Trainer (same data,
same seed, same schedule), time the steps after a warm-up (CUDA synchronised), record peak GPU
memory, then evaluate PSNR / SSIM / LPIPS on the held-out images.  Prints a table of ratios
(retina-gs / splatfacto) last and writes everything as JSON.

    python scripts/bench_gaussians.py --scenes cup city --steps 5000 --json bench.json
    python scripts/bench_gaussians.py --smoke          # CPU: a few steps of retina-gs only
    python scripts/bench_gaussians.py --scenes city-appearance --methods splatfacto splatfacto-bilateral retina-gs retina-gs-bilateral
    python scripts/bench_gaussians.py --scenes city --methods splatfacto splatfacto-mcmc retina-gs-mcmc retina-gs-capped --cap 100000

Methods: ``splatfacto``, ``retina-gs`` and the variants in ``VARIANTS`` (a base method plus one
config change): ``*-bilateral`` (per-image bilateral grids), ``retina-gs-mcmc`` (our MCMC
strategy capped at ``--cap``), ``retina-gs-capped`` (default strategy with a ``--cap`` Gaussian
budget), ``splatfacto-mcmc`` (splatfacto with gsplat's MCMCStrategy through a bench-only adapter,
``splatfacto_mcmc_model_config``), ``retina-gs-affine`` (per-image affine colour), ``retina-gs-appearance``
(per-Gaussian appearance: features, image embeddings, an MLP; ``-lr5``: its two optimiser groups at 5x
their learning rates), ``retina-gs-visible``
(visible Adam), ``retina-gs-offload`` (visible Adam, leaves streamed from host memory, locality order),
``retina-gs-stream`` (visible Adam, ``offload stream``: subtrees streamed through each frame),
``retina-gs-torch`` (the torch reference rasteriser, in the bench's mode, densifying on gsplat's absgrad
statistic and threshold: its count and PSNR should agree with retina-gs's).  On ``city-appearance`` every method also reports the
colour-corrected ``cc_psnr`` / ``cc_ssim`` (held-out views have no bilateral grid of their own) and
``ho_psnr``, NeRF-W's protocol (``appearance.held_out_half_psnr``: each held-out view's appearance
fitted on its left half, scored on its right half).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scenes import scene_dataparser  # noqa: E402  (scripts/ is not a package)


VARIANTS = {
    # name: (base method, what changes); see apply_variant
    "retina-gs-bilateral": ("retina-gs", "bilateral"),
    "splatfacto-bilateral": ("splatfacto", "bilateral"),
    "retina-gs-mcmc": ("retina-gs", "mcmc"),
    "retina-gs-capped": ("retina-gs", "capped"),
    "splatfacto-mcmc": ("splatfacto", "mcmc"),
    "retina-gs-affine": ("retina-gs", "affine"),
    "retina-gs-appearance": ("retina-gs", "appearance"),
    "retina-gs-appearance-lr5": ("retina-gs", "appearance-lr5"),
    "retina-gs-visible": ("retina-gs", "visible"),
    "retina-gs-offload": ("retina-gs", "offload"),
    "retina-gs-stream": ("retina-gs", "stream"),
    "retina-gs-torch": ("retina-gs", "torch"),
}


def base_method(method: str) -> str:
    return VARIANTS[method][0] if method in VARIANTS else method


def method_config(method: str, dataparser, steps: int, out: Path, retina_mode: str = "clip", scene: str = "",
                  cap: int = 100_000):
    from nerfstudio.configs.method_configs import all_methods

    config = copy.deepcopy(all_methods[base_method(method)])
    config.method_name = method  # its own output folder
    config.max_num_iterations = steps
    for group in config.optimizers.values():  # the same schedule shape for every method
        if group.get("scheduler") is not None and hasattr(group["scheduler"], "max_steps"):
            group["scheduler"].max_steps = steps
    config.pipeline.datamanager.dataparser = dataparser
    config.pipeline.datamanager.data = dataparser.data
    config.output_dir = out
    config.vis = "tensorboard"
    config.steps_per_eval_image = 10**9
    config.steps_per_eval_batch = 10**9
    config.steps_per_eval_all_images = 10**9
    config.steps_per_save = 10**9
    config.save_only_latest_checkpoint = True
    config.machine.seed = 42
    # The scenes are small (<= 320 px wide): train every method at full resolution from step 0,
    # instead of splatfacto's 1/4-resolution warm-up meant for 30k-step runs on large images.
    config.pipeline.model.num_downscales = 0
    if method.startswith("retina-gs"):
        config.pipeline.model.mode = retina_mode
    if method in VARIANTS:  # after the mode: a variant may set its own
        apply_variant(config, VARIANTS[method][1], cap)
    config.set_timestamp()
    return config


def apply_variant(config, change: str, cap: int) -> None:
    """One variant's config change on a copy of its base method's config."""
    from nerfstudio.engine.optimizers import AdamOptimizerConfig
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

    model = config.pipeline.model
    if change == "bilateral":
        model.use_bilateral_grid = True
        # retina-gs's config has the group; splatfacto's in nerfstudio 1.1.5 too.  Should it be
        # missing, splatfacto's own defaults (nerfstudio/configs/method_configs.py).
        config.optimizers.setdefault("bilateral_grid", {
            "optimizer": AdamOptimizerConfig(lr=2e-3, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=30000, warmup_steps=1000, lr_pre_warmup=0),
        })
    elif change == "mcmc" and config.method_name.startswith("retina-gs"):
        model.strategy.kind = "mcmc"
        model.strategy.cap_max = cap
    elif change == "affine":
        model.affine_appearance = True
    elif change == "appearance":  # per-Gaussian appearance, the mean embedding outside training
        model.appearance_features, model.appearance_embedding, model.eval_appearance = 16, 32, "mean"
    elif change == "appearance-lr5":  # the same, embeddings / MLP and features at 5x their default lr
        apply_variant(config, "appearance", cap)
        for group in ("appearance", "appearance_features"):
            config.optimizers[group]["optimizer"].lr *= 5
            scheduler = config.optimizers[group]["scheduler"]
            if scheduler is not None:
                scheduler.lr_final *= 5
    elif change == "visible":
        model.visible_adam = True
    elif change == "offload":  # streamed from host memory by leaf, locality order, 1 GB of held leaves
        model.visible_adam, model.offload, model.offload_budget_gb = True, "host", 1.0
        config.pipeline.camera_order = "locality"
    elif change == "stream":  # streamed subtree by subtree inside the frame (depth 2 of retina-gs's tree)
        model.visible_adam, model.offload, model.offload_stream_depth = True, "stream", 1
    elif change == "torch":  # the torch reference rasteriser on the GPU (one process: the ordinary render)
        model.backend = "torch"
    elif change == "capped":
        model.strategy.max_gaussians = cap
    elif change == "mcmc":
        from splatfacto_mcmc import splatfacto_mcmc_model_config  # scripts/ is on the path

        config.pipeline.model = splatfacto_mcmc_model_config(model, cap)
    else:
        raise ValueError(change)


def run_one(method: str, dataparser, steps: int, out: Path, device: str, retina_mode: str = "clip",
            profile: int = 0, sync_audit: int = 0, host_profile: int = 0, scene: str = "", cap: int = 100_000,
            ho_steps: int = 200) -> Dict:
    from nerfstudio.utils import writer

    config = method_config(method, dataparser, steps, out, retina_mode, scene, cap)
    config.machine.device_type = "cuda" if device == "cuda" else "cpu"
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    writer.setup_local_writer(config.logging, max_iter=steps)  # quiet: no viewer, no event files
    pipeline = trainer.pipeline
    warmup = min(100, steps // 5)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: List[float] = []
    clock = [time.perf_counter()]

    def tick(step: int) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step >= warmup:
            times.append(now - clock[0])
        clock[0] = now
        if times and (step + 1) % 250 == 0:  # a run cut short by a time limit still leaves its step time
            print(f"[{method}] step {step + 1}/{steps}: median {1000 * statistics.median(times):.2f} ms/step, "
                  f"{int(getattr(pipeline.model, 'total_points', pipeline.model.num_points))} Gaussians", flush=True)

    run_steps(trainer, steps, tick)
    table = profile_steps(trainer, steps, profile, device) if profile else None
    if sync_audit:
        table = (table or "") + "\n" + audit_steps(trainer, steps + profile, sync_audit, device)
    if host_profile:
        table = (table or "") + "\n" + host_profile_steps(trainer, steps + profile + sync_audit, host_profile, device)
    pipeline.eval()
    if scene.endswith("city-appearance"):
        # Held-out views have no bilateral grid of their own (README): score every method also
        # with its colours fitted to the ground truth (splatfacto's cc_psnr / cc_ssim). Only for
        # the evaluation: splatfacto's training metrics would run the fit (15 least-squares
        # solves) on every step, and the step time would measure it instead of the method.
        pipeline.model.config.color_corrected_metrics = True
    metrics = pipeline.get_average_eval_image_metrics(step=steps)
    if scene.endswith("city-appearance"):  # and NeRF-W's protocol: fitted on each view's left half, scored on its right
        from landmark_plugin.gaussians.appearance import held_out_half_psnr

        model = pipeline.model
        views = [(camera, model.get_gt_img(data["image"])[..., :3]) for camera, data in pipeline.datamanager.fixed_indices_eval_dataloader]
        metrics["ho_psnr"] = held_out_half_psnr(model, views, steps=ho_steps)
    return {
        "method": method,
        "steps": steps,
        "step_ms_median": 1000 * statistics.median(times) if times else math.nan,
        "step_ms_mean": 1000 * statistics.fmean(times) if times else math.nan,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan,
        "num_gaussians": int(getattr(pipeline.model, "total_points", pipeline.model.num_points)),
        **offload_figures(pipeline.model),
        **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        **({"profile": table} if table else {}),
    }


def offload_figures(model) -> Dict:
    """With offload: the mean share of the rank's Gaussians held and uploaded per batch."""
    store = getattr(model, "offload_store", None)
    if store is None or not store.staged_rows:
        return {}
    held = [n / max(total, 1) for n, total in store.staged_rows]
    uploaded = [u / max(total, 1) for u, (_, total) in zip(store.uploaded_rows, store.staged_rows)]
    return {"held_fraction": statistics.fmean(held), "uploaded_fraction": statistics.fmean(uploaded)}


def profile_steps(trainer, start: int, count: int, device: str) -> str:
    """torch.profiler's table (self time, top 40 ops) over ``count`` more training steps."""
    from torch.profiler import ProfilerActivity, profile

    from landmark_plugin.trainer import LandmarkTrainer

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        LandmarkTrainer.run_steps(trainer, start, count)
        if device == "cuda":
            torch.cuda.synchronize()
    # Both orders: GPU time says which kernels cost, host time says where launches pile up.
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if device == "cuda":
        tables.insert(0, averages.table(sort_by="self_cuda_time_total", row_limit=30))
    return "\n".join(tables)


def host_profile_steps(trainer, start: int, count: int, device: str) -> str:
    """Python functions by total host time (cProfile) over ``count`` more training steps.

    torch.profiler names ATen ops; this names the Python code that issues them, which is where
    per-step host overhead is fixed. Time a function spends waiting on the GPU shows up in it too.
    """
    import cProfile
    import io
    import pstats

    from landmark_plugin.trainer import LandmarkTrainer

    profiler = cProfile.Profile()
    profiler.enable()
    LandmarkTrainer.run_steps(trainer, start, count)
    if device == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(25)
    return f"host time by Python function over {count} steps:\n" + text.getvalue()


def audit_steps(trainer, start: int, count: int, device: str) -> str:
    """Synchronising calls per step by source line over ``count`` more training steps."""
    import sys

    from landmark_plugin.trainer import LandmarkTrainer

    sys.path.insert(0, str(Path(__file__).parent))  # python -P leaves the script's folder out
    from sync_audit import SyncAudit

    with SyncAudit(device) as audit:
        LandmarkTrainer.run_steps(trainer, start, count)
    return audit.table(count)


def run_steps(trainer, steps: int, after_step) -> None:
    """Our trainer has run_steps; splatfacto's plain Trainer gets the same loop borrowed."""
    from landmark_plugin.trainer import LandmarkTrainer

    LandmarkTrainer.run_steps(trainer, 0, steps, after_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=["cup", "city"])
    parser.add_argument("--methods", nargs="+", default=["splatfacto", "retina-gs"],
                        help=f"splatfacto, retina-gs or a variant: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/landmark-bench"))
    parser.add_argument("--json", type=Path, default=None, help="results as JSON (rewritten after every run)")
    parser.add_argument("--cap", type=int, default=100_000, help="Gaussian cap of the *-mcmc (cap_max) and retina-gs-capped (max_gaussians) variants")
    parser.add_argument("--ho-steps", type=int, default=200,
                        help="Adam steps of each held-out embedding fit (ho_psnr); fewer make CPU runs affordable")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny city, retina-gs, 3 steps")
    parser.add_argument("--retina-mode", choices=["clip", "plain", "auto"], default="clip", help="retina-gs's render mode")
    parser.add_argument("--profile", type=int, default=0, help="profile this many more steps per run (torch.profiler)")
    parser.add_argument("--host-profile", type=int, default=0, help="cProfile this many more steps per run (host time by Python function)")
    parser.add_argument("--sync-audit", type=int, default=0, help="count host-device synchronisations by source line over this many more steps")
    args = parser.parse_args()
    if args.smoke:
        args.scenes, args.methods, args.steps = ["tiny-city"], ["retina-gs"], 3
    unknown = [m for m in args.methods if m not in ("splatfacto", "retina-gs") and m not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: splatfacto, retina-gs, {', '.join(VARIANTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    results = []
    for scene in args.scenes:
        dataparser, description = scene_dataparser(scene, args.data_root, args.work)
        for method in args.methods:
            torch.manual_seed(42)
            try:
                row = run_one(method, dataparser, args.steps, args.work / "runs", device, args.retina_mode, args.profile,
                              args.sync_audit, args.host_profile, scene, args.cap, args.ho_steps)
            except Exception as err:  # one broken method must not cost the others' results
                import traceback

                traceback.print_exc()
                row = {"method": method, "steps": args.steps, "error": f"{type(err).__name__}: {err}"}
            if row.get("profile"):
                print(row["profile"], flush=True)
            row.update(scene=scene, scene_description=description, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            if args.json:  # after every run, so a later failure or hang keeps the earlier rows
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2))
    print_table(results)
    exit_now()


def exit_now() -> None:
    """Leave without waiting for threads: the process has been seen to hang at exit after the
    results were out (BENCHMARKS.md, issue 17).  Names the non-daemon threads still alive, so
    the cause can be found, then exits."""
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if alive:
        print(f"exiting past non-daemon threads still alive: {alive}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def print_table(results: List[Dict]) -> None:
    cc = any("cc_psnr" in r for r in results)
    print(f"\n{'scene':16} {'method':20} {'steps':>6} {'ms/step':>8} {'mem GB':>7} {'#gauss':>9} {'PSNR':>7}"
          + (f" {'ccPSNR':>7} {'hoPSNR':>7}" if cc else "") + f" {'SSIM':>6}" + (f" {'ccSSIM':>6}" if cc else ""))
    for r in results:
        if "error" in r:
            print(f"{r['scene']:16} {r['method']:20} FAILED: {r['error']}")
            continue
        print(
            f"{r['scene']:16} {r['method']:20} {r['steps']:6d} {r['step_ms_median']:8.2f} {r['peak_mem_gb']:7.2f} "
            f"{r['num_gaussians']:9d} {r.get('psnr', math.nan):7.2f}"
            + (f" {r.get('cc_psnr', math.nan):7.2f} {r.get('ho_psnr', math.nan):7.2f}" if cc else "")
            + f" {r.get('ssim', math.nan):6.3f}" + (f" {r.get('cc_ssim', math.nan):6.3f}" if cc else "")
        )
    by_scene: Dict[str, Dict[str, Dict]] = {}
    for r in results:
        if "error" not in r:
            by_scene.setdefault(r["scene"], {})[r["method"]] = r
    for scene, rows in by_scene.items():
        for name, ours in rows.items():
            if not name.startswith("retina-gs"):
                continue
            refs = ["splatfacto"] + ([name.replace("retina-gs", "splatfacto")] if name != "retina-gs" else [])
            for ref_name in refs:
                if ref_name in rows:
                    print(f"{scene}: {name}/{ref_name} " + compare(ours, rows[ref_name], ratios=True))
        for base in ("splatfacto", "retina-gs"):
            for option in ("bilateral", "affine", "appearance"):
                if base in rows and f"{base}-{option}" in rows:
                    print(f"{scene}: {base}-{option} minus {base} " + compare(rows[f"{base}-{option}"], rows[base], ratios=False))


def compare(ours: Dict, ref: Dict, ratios: bool) -> str:
    """Step-time / memory / count ratios (``ratios``) and PSNR (and cc_psnr) differences."""
    parts = []
    if ratios:
        parts.append(f"step time {ours['step_ms_median'] / ref['step_ms_median']:.3f}x")
        if ref["peak_mem_gb"] > 0 and math.isfinite(ours["peak_mem_gb"]):
            parts.append(f"peak mem {ours['peak_mem_gb'] / ref['peak_mem_gb']:.2f}x")
        parts.append(f"Gaussians {ours['num_gaussians'] / max(ref['num_gaussians'], 1):.2f}x")
    parts.append(f"PSNR {ours.get('psnr', math.nan) - ref.get('psnr', math.nan):+.2f} dB")
    for key in ("cc_psnr", "ho_psnr"):
        if key in ours or key in ref:
            parts.append(f"{key} {ours.get(key, math.nan) - ref.get(key, math.nan):+.2f} dB")
    return ", ".join(parts)


if __name__ == "__main__":
    main()
