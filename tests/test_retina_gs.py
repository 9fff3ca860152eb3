"""retina-gs as a nerfstudio method: training, ownership, checkpoints, and the ns-* commands."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from landmark_plugin.core.partition import assign_leaves

BIN = Path(sys.executable).parent


def ns(command: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an ns-* command of this environment; fail the test with its output if it fails."""
    # This environment's bin/ first: the ns-* commands and the ffmpeg that scripts/install.sh links.
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        [str(BIN / command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command} {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def small_config(data: Path, out: Path, steps: int):
    """retina-gs-small shrunk for CPU tests: tiny data, no viewer, frequent refinement."""
    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig
    from landmark_plugin.method_configs.retina_gs import retina_gs_small

    config = copy.deepcopy(retina_gs_small.config)
    config.pipeline.datamanager.dataparser = SyntheticCityDataParserConfig(data=data)
    config.pipeline.datamanager.data = data
    config.machine.device_type = "cpu"
    config.max_num_iterations = steps
    config.output_dir = out
    config.vis = "tensorboard"
    config.steps_per_eval_image = config.steps_per_eval_all_images = config.steps_per_save = 10**9
    config.pipeline.model.warmup_length = 5
    config.pipeline.model.refine_every = 5
    config.set_timestamp()
    return config


def make_trainer(data: Path, out: Path, steps: int, **model_overrides):
    config = small_config(data, out, steps)
    for key, value in model_overrides.items():
        setattr(config.pipeline.model, key, value)
    torch.manual_seed(0)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def fixed_view_loss(trainer) -> float:
    """Main loss of the model on training image 0 (no camera optimiser noise, no random background)."""
    pipeline = trainer.pipeline
    dm = pipeline.datamanager
    camera = dm.train_dataset.cameras[0:1].to(pipeline.device)
    data = dict(dm.cached_train[0])
    data["image"] = data["image"].to(pipeline.device)
    model = pipeline.model
    model.eval()
    with torch.no_grad():
        outputs = model.get_outputs(camera)
        loss = model.get_loss_dict(outputs, data)["main_loss"]
    model.train()
    return float(loss)


TRAIN_STEPS = 24


@pytest.fixture(scope="module")
def trained(tiny_city, tmp_path_factory):
    """One short CPU run shared by the tests below: (trainer, loss before, losses)."""
    trainer = make_trainer(tiny_city, tmp_path_factory.mktemp("retina") / "outputs", TRAIN_STEPS, tree_depth=3)
    before = fixed_view_loss(trainer)
    losses = trainer.run_steps(0, TRAIN_STEPS)
    return trainer, before, losses


def test_training_lowers_loss_and_keeps_ownership(trained):
    trainer, before, losses = trained
    model = trainer.pipeline.model
    after = fixed_view_loss(trainer)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.99 * before, f"loss on a training view went {before:.4f} -> {after:.4f}"
    # every Gaussian is owned by the leaf holding its mean (refreshed at each refinement step)
    model.refresh_ownership()
    assert torch.equal(model.leaf_ids, assign_leaves(model.tree, model.means.detach()))
    assert int(model.leaf_counts().sum()) == model.num_points


def test_refinement_reassigns_moved_gaussians(tiny_city, tmp_path):
    trainer = make_trainer(tiny_city, tmp_path / "outputs", 6)
    model = trainer.pipeline.model
    trainer.run_steps(0, 1)
    with torch.no_grad():  # move every Gaussian to the mirror point: most change leaf
        centre = model.tree.bounds.mean(dim=0)
        model.means.copy_(2 * centre - model.means)
    stale = model.leaf_ids.clone()
    trainer.run_steps(1, 5)  # step 5 is a refinement step (refine_every=5)
    expected = assign_leaves(model.tree, model.means.detach())
    assert torch.equal(model.leaf_ids, expected)
    assert not torch.equal(stale[: expected.numel()], expected), "the mirror move should change ownership"


def test_checkpoint_round_trip(trained):
    trainer, _, _ = trained
    step = TRAIN_STEPS - 1
    trainer.save_checkpoint(step)
    ckpt_dir = trainer.checkpoint_dir
    assert [p.name for p in ckpt_dir.iterdir()] == [f"step-{step:09d}.ckpt"], "no temp file may remain"
    reference = fixed_view_loss(trainer)
    state = {k: v.detach().clone() for k, v in trainer.pipeline.model.gauss_params.items()}

    resumed_config = copy.deepcopy(trainer.config)
    resumed_config.load_dir = ckpt_dir
    resumed = resumed_config.setup(local_rank=0, world_size=1)
    resumed.setup()
    model = resumed.pipeline.model
    for name, value in state.items():
        assert torch.equal(model.gauss_params[name].detach(), value), name
    assert torch.equal(model.tree_split_value, trainer.pipeline.model.tree_split_value)
    assert fixed_view_loss(resumed) == pytest.approx(reference, abs=1e-6)
    assert resumed._start_step == TRAIN_STEPS
    resumed.run_steps(TRAIN_STEPS, 2)  # optimiser state was restored at the checkpoint's size

    (ckpt_dir / ".step-000009999.ckpt.abcd.tmp").write_bytes(b"half-written")
    from landmark_plugin.trainer import latest_complete_step

    assert latest_complete_step(ckpt_dir) == step, "a half-written checkpoint must be ignored on resume"


def test_ns_train_lists_retina_gs(tmp_path):
    result = ns("ns-train", "retina-gs", "--help", cwd=tmp_path)
    assert "tree-depth" in result.stdout
    assert "retina-gs-small" in ns("ns-train", "--help", cwd=tmp_path).stdout


@pytest.mark.slow
def test_cli_train_render_eval_export(tiny_city, tmp_path):
    ns(
        "ns-train", "retina-gs-small", "--data", str(tiny_city), "--output-dir", str(tmp_path / "outputs"),
        "--experiment-name", "city", "--timestamp", "t", "--machine.device-type", "cpu",
        "--max-num-iterations", "6", "--steps-per-save", "5", "--vis", "tensorboard", "synthetic-city",
        cwd=tmp_path,
    )
    config = tmp_path / "outputs" / "city" / "retina-gs-small" / "t" / "config.yml"
    assert config.exists()
    assert (config.parent / "nerfstudio_models" / "step-000000005.ckpt").exists()

    frames = tmp_path / "frames"
    ns(
        "ns-render", "interpolate", "--load-config", str(config), "--output-path", str(frames),
        "--output-format", "images", "--interpolation-steps", "2", "--frame-rate", "2", cwd=tmp_path,
    )
    written = sorted(frames.glob("*.jpg")) + sorted(frames.glob("*.png"))
    assert len(written) >= 2, f"ns-render wrote {written}"

    eval_json = tmp_path / "eval.json"
    ns("ns-eval", "--load-config", str(config), "--output-path", str(eval_json), cwd=tmp_path)
    results = json.loads(eval_json.read_text())["results"]
    assert 5.0 < results["psnr"] < 60.0 and 0.0 < results["ssim"] <= 1.0

    exports = tmp_path / "exports"
    # landmark-export: ns-export gaussian-splat writes the same file but imports open3d, which
    # fails on machines without libusb (CI among them).
    ns("landmark-export", "--load-config", str(config), "--output-dir", str(exports), cwd=tmp_path)
    from plyfile import PlyData

    ply = PlyData.read(str(exports / "splat.ply"))
    names = ply["vertex"].data.dtype.names
    for required in ("x", "y", "z", "f_dc_0", "opacity", "scale_0", "rot_0"):
        assert required in names
    assert ply["vertex"].count > 0
