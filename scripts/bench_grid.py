#!/usr/bin/env python
"""landmark-grid against nerfacto at equal training time, side by side in one process.

For each scene and method: a short calibration run measures seconds per step, the step count
that fills ``--seconds`` becomes ``max_num_iterations`` (so schedules and grid upsampling end
with the run), then a fresh model trains with nerfstudio's Trainer until the time is spent
(CUDA synchronised, callbacks included, evaluation excluded).  Recorded: steps, training rays/s,
peak GPU memory, and PSNR / SSIM (/ LPIPS when its weights are available) over all held-out
images.  Writes JSON and prints a table last.

    python scripts/bench_grid.py --seconds 600 --json bench_grid.json     # GPU: city + lego
    python scripts/bench_grid.py --scenes cup beer --seconds 120 --data-root .devcarry/data   # GPU: real captures
    python scripts/bench_grid.py --smoke                                   # CPU: tiny city, 4 steps

Scenes: ``city`` (synthetic, generated under ``--work``), ``lego`` (lego_synthetic) and the real
COLMAP captures of ``REAL_SCENES`` (under ``--data-root``; sources in benchmarks/REAL_SCENES.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("nerfacto", "landmark-grid")
VARIANTS = {
    "landmark-grid-occupancy": ("landmark-grid", {"sampler": "occupancy"}),
    # the box in the middle of a contracted grid, rays to the far plane (the real scenes' recipe),
    # and the box alone
    "landmark-grid-unbounded": ("landmark-grid", {"field.contraction": "linf"}),
    "landmark-grid-bounded": ("landmark-grid", {"field.contraction": "none"}),
    # renders (eval PSNR and frames/s) with the colour decoder in bfloat16; training as landmark-grid
    "landmark-grid-bf16": ("landmark-grid", {"field.render_precision": "bfloat16"}),
}
"""Benchmarked names that are a registered method with model overrides: (method, overrides)."""
REAL_SCENES = {
    "cup": ("cup_colmap", 4, "cup_colmap images_4 (200x150, 67 train / 10 eval)"),
    "beer": ("beer_colmap", 2, "beer_colmap images_2 (360x640, 62 train / 9 eval)"),
}
"""Real COLMAP captures: scene -> (folder under --data-root, downscale factor, i.e. the images_<N>
folder read next to sparse/0, description).  Every 8th image (name order) is held out."""
REAL_SCENE_GRID = {"field.mode": "vm", "field.blocks": (1, 1), "field.contraction": "linf"}
"""landmark-grid on the real captures (an object on a desk or floor): one block of TensoRF's three
plane x line pairs, as on lego (the x-y blocks and xy-z factorisation are for city-scale ground),
and the room beyond the box in a contracted grid (``landmark-grid-bounded``: the box alone)."""


def real_scene_parser(scene: str, data_root: Path):
    """(colmap dataparser config, description) of a ``REAL_SCENES`` capture, built as
    scripts/bench_gaussians.py builds cup.  ``load_3D_points``: landmark-grid's datamanager derives
    its scene box from the parser's ``points3D_xyz`` (nerfacto ignores them: contraction, own collider)."""
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    folder, factor, description = REAL_SCENES[scene]
    path = data_root / folder
    if not (path / "sparse" / "0").is_dir() or not (path / f"images_{factor}").is_dir():
        raise FileNotFoundError(f"{path} needs sparse/0 and images_{factor}: "
                                f"pass --data-root with the folder holding {folder}")
    parser = ColmapDataParserConfig(
        data=path, colmap_path=Path("sparse/0"), downscale_factor=factor,
        eval_mode="interval", eval_interval=8, load_3D_points=True,
    )
    return parser, description


def scene_setup(scene: str, work: Path, data_root: Path, lego: Optional[Path], smoke: bool, city_images: int = 240):
    """(dataparser config, description, per-scene overrides of the model configs)."""
    from landmark_plugin.data.city import CityConfig
    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig

    if scene == "city":
        if smoke:
            city = CityConfig(blocks=(2, 2), num_images=10, width=96, height=72, num_points=400, test_every=5)
        else:
            city = CityConfig(blocks=(4, 4), num_images=city_images, width=320, height=240, num_points=20000)
        name = f"city-{city.num_images}x{city.width}x{city.height}"
        parser = SyntheticCityDataParserConfig(data=work / name, city=city)
        return parser, f"synthetic city, {city.num_images} images {city.width}x{city.height}", {}
    if scene in REAL_SCENES:  # nerfacto as for any real capture: its defaults (contraction, background)
        parser, description = real_scene_parser(scene, data_root)
        return parser, description, {"landmark-grid": dict(REAL_SCENE_GRID)}
    if scene == "lego":
        from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

        if lego is None or not (lego / "transforms_train.json").exists():
            raise FileNotFoundError(f"lego_synthetic not found at {lego}: pass --lego")
        # an object: TensoRF's three plane/line pairs in one block, white background for both methods
        grid = {"field.mode": "vm", "field.blocks": (1, 1), "background_color": "white"}
        return BlenderDataParserConfig(data=lego), "lego_synthetic 400x400 (87 train / 13 test)", {
            "landmark-grid": grid,
            "nerfacto": {"background_color": "white"},
        }
    raise SystemExit(f"unknown scene {scene}")


def _set(obj, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for name in path:
        obj = getattr(obj, name)
    setattr(obj, last, value)


def method_config(method: str, parser, overrides: Dict, steps: int, out: Path, smoke: bool, rays: int,
                  camera_optimizer: str = "off"):
    """A TrainerConfig for ``method`` on ``parser`` whose schedules end at ``steps``; both methods
    get the same ``camera_optimizer`` mode ("off": the given poses, which held-out views use too)."""
    from nerfstudio.configs.method_configs import all_methods
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig

    method, variant = VARIANTS.get(method, (method, {}))
    config = copy.deepcopy(all_methods[method])
    config.max_num_iterations = steps
    for group in config.optimizers.values():
        if group.get("scheduler") is not None and hasattr(group["scheduler"], "max_steps"):
            group["scheduler"].max_steps = steps
    datamanager = config.pipeline.datamanager
    if method == "nerfacto":  # the same (in-process) data loading for both methods
        datamanager = VanillaDataManagerConfig()
        config.pipeline.datamanager = datamanager
    datamanager.dataparser = copy.deepcopy(parser)
    datamanager.data = parser.data
    datamanager.train_num_rays_per_batch = rays
    datamanager.eval_num_rays_per_batch = rays
    model = config.pipeline.model
    model.camera_optimizer.mode = camera_optimizer  # the same poses for both: compare the fields only
    for key, value in {**overrides.get(method, {}), **variant}.items():
        _set(model, key, value)
    if smoke:
        _shrink(method, model)
    config.output_dir = out
    config.vis = "tensorboard"
    config.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return config


def _shrink(method: str, model) -> None:
    """Tiny CPU sizes: only whether the benchmark runs end to end matters."""
    if method == "landmark-grid":
        model.field.cells = 8
        model.proposal_cells = (4, 8)
        model.occupancy.cells, model.occupancy.march_samples = 16, 64
    else:
        model.num_levels, model.max_res, model.log2_hashmap_size = 4, 64, 12
        model.proposal_net_args_list = [
            {"hidden_dim": 8, "log2_hashmap_size": 10, "num_levels": 2, "max_res": 32, "use_linear": False},
            {"hidden_dim": 8, "log2_hashmap_size": 10, "num_levels": 2, "max_res": 64, "use_linear": False},
        ]
    model.num_proposal_samples_per_ray = (24, 12)
    model.num_nerf_samples_per_ray = 12
    model.eval_num_rays_per_chunk = 4096


def make_trainer(config):
    from landmark_plugin.metrics import offline_safe_lpips

    trainer = config.setup(local_rank=0, world_size=1)
    with offline_safe_lpips():  # nerfacto builds LPIPS at set-up; offline that would crash
        trainer.setup()
    return trainer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_for(trainer, seconds: float, max_steps: int) -> Dict:
    """Train until ``seconds`` of (synchronised) training time or ``max_steps`` steps."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    spent, step = 0.0, 0
    while spent < seconds and step < max_steps:
        _sync()
        start = time.perf_counter()
        trainer.pipeline.train()
        for callback in trainer.callbacks:
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        trainer.train_iteration(step)
        for callback in trainer.callbacks:
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        _sync()
        spent += time.perf_counter() - start
        step += 1
    return {"steps": step, "train_seconds": spent}


def evaluate(trainer) -> Dict:
    from landmark_plugin.metrics import without_unavailable_lpips

    _sync()
    start = time.perf_counter()
    trainer.pipeline.eval()
    metrics = trainer.pipeline.get_average_eval_image_metrics()
    _sync()
    keep = {k: float(v) for k, v in metrics.items() if k in ("psnr", "ssim", "lpips", "fps", "num_rays_per_sec")}
    return {**without_unavailable_lpips(keep), "eval_seconds": time.perf_counter() - start}


def run_one(method: str, scene: str, args) -> Dict:
    parser, description, overrides = scene_setup(
        scene, args.work, args.data_root, args.lego, args.smoke, args.city_images
    )
    options = {"out": args.work / "runs", "smoke": args.smoke, "rays": args.rays,
               "camera_optimizer": args.camera_optimizer}
    if args.steps is not None:
        planned = args.steps
    else:
        calibrate = make_trainer(method_config(method, parser, overrides, 10**9, **options))
        train_for(calibrate, math.inf, max(1, args.calibration_steps // 3))  # warm-up: allocator, kernels
        timed = train_for(calibrate, math.inf, args.calibration_steps)
        del calibrate
        planned = max(1, int(args.seconds * timed["steps"] / timed["train_seconds"]))

    torch.manual_seed(args.seed)
    trainer = make_trainer(method_config(method, parser, overrides, planned, **options))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = train_for(trainer, args.seconds, planned)
    row = {
        "scene": scene,
        "scene_description": description,
        "method": method,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "rays_per_step": args.rays,
        "camera_optimizer": args.camera_optimizer,
        "planned_steps": planned,
        **run,
        "train_rays_per_s": run["steps"] * args.rays / max(run["train_seconds"], 1e-9),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        **evaluate(trainer),
    }
    if method == "nerfacto":
        row["nerfacto_hash_backend"] = _hash_backend()
    return row


def _hash_backend() -> str:
    try:
        import tinycudann  # noqa: F401

        return "tcnn"
    except ImportError:  # nerfstudio then falls back to its torch hash grid (much slower)
        return "torch"


def print_table(rows: List[Dict]) -> None:
    header = f"{'scene':<6} {'method':<24} {'steps':>7} {'train s':>8} {'rays/s':>10} {'PSNR':>6} {'SSIM':>6} {'GPU MiB':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        mem = f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") else "-"
        lines.append(
            f"{r['scene']:<6} {r['method']:<24} {r['steps']:>7} {r['train_seconds']:>8.1f} "
            f"{r['train_rays_per_s']:>10.0f} {r['psnr']:>6.2f} {r['ssim']:>6.3f} {mem:>8}"
        )
    by_scene: Dict[str, Dict[str, Dict]] = {}
    for r in rows:
        by_scene.setdefault(r["scene"], {})[r["method"]] = r
    for scene, methods in by_scene.items():
        if "landmark-grid" in methods and "nerfacto" in methods:
            grid, nerfacto = methods["landmark-grid"], methods["nerfacto"]
            lines.append(
                f"{scene}: landmark-grid - nerfacto PSNR {grid['psnr'] - nerfacto['psnr']:+.2f} dB, "
                f"rays/s ratio {grid['train_rays_per_s'] / nerfacto['train_rays_per_s']:.2f}x"
            )
    print("\n".join(lines))


def parse_args(argv: Optional[List[str]] = None, methods=METHODS, description: str = __doc__) -> argparse.Namespace:
    """The benchmark's command line (``methods``: the default method list)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=None, choices=("city", "lego") + tuple(REAL_SCENES),
                        help="default city lego (smoke: city); cup and beer are real COLMAP captures under --data-root")
    parser.add_argument("--methods", nargs="+", default=list(methods), choices=METHODS + tuple(VARIANTS))
    parser.add_argument("--seconds", type=float, default=None, help="training time per method (default 600; smoke 30)")
    parser.add_argument("--rays", type=int, default=None, help="rays per step (default 4096; smoke 64)")
    parser.add_argument("--calibration-steps", type=int, default=60, help="timed steps to estimate s/step")
    parser.add_argument("--steps", type=int, default=None, help="fixed max steps instead of calibrating (smoke: 4)")
    parser.add_argument("--city-images", type=int, default=240, help="images of the synthetic city (1 in 8 held out)")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding cup_colmap, beer_colmap (and lego_synthetic), e.g. .devcarry/data")
    parser.add_argument("--lego", type=Path, default=None, help="lego_synthetic folder (default: under --data-root)")
    parser.add_argument("--camera-optimizer", default="off", choices=("off", "SO3xR3", "SE3"),
                        help="pose refinement, the same for every method (default off: the given poses)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/landmark-bench-grid"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny city, tiny models, 4 steps")
    args = parser.parse_args(argv)
    args.scenes = args.scenes or (["city"] if args.smoke else ["city", "lego"])
    args.seconds = args.seconds if args.seconds is not None else (30.0 if args.smoke else 600.0)
    args.rays = args.rays or (64 if args.smoke else 4096)
    if args.smoke and args.steps is None:  # no calibration run: keep the CPU test short
        args.steps = 4
    if args.lego is None:
        candidates = [args.data_root / "lego_synthetic", REPO.parent / "shared" / "data" / "lego_synthetic",
                      REPO / "shared" / "data" / "lego_synthetic"]
        args.lego = next((c for c in candidates if c.exists()), None)
    args.work.mkdir(parents=True, exist_ok=True)
    return args


def run(args: argparse.Namespace) -> List[Dict]:
    """One row per (scene, method), written to ``--json`` as they come."""
    rows = []
    for scene in args.scenes:
        for method in args.methods:
            torch.manual_seed(args.seed)
            rows.append(run_one(method, scene, args))
            if args.json is not None:  # keep partial results if a later run dies
                args.json.write_text(json.dumps(rows, indent=2))
    return rows


def main() -> None:
    print_table(run(parse_args()))


if __name__ == "__main__":
    main()
