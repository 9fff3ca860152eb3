"""Empty-space skipping for landmark-grid (``--pipeline.model.sampler occupancy``), on CPU.

- With an exact occupancy grid (every cell whose largest density over a dense probe is below the
  threshold is empty, every other cell occupied), the skipped render (occupied cells only, early
  termination at transmittance < 1e-4) equals the dense render (the same uniform march through
  every cell, no termination) within 1e-4, also under a layout edit; and points of cells the grid
  marks empty really have density below the threshold.
- A few training steps on the tiny city update the grid from the field; the checkpoint restores it.
"""

from __future__ import annotations

import math

import pytest
import torch

nerfstudio = pytest.importorskip("nerfstudio")

from nerfstudio.cameras.rays import RayBundle  # noqa: E402
from nerfstudio.data.scene_box import SceneBox  # noqa: E402

from landmark_plugin.core.edits import BoxEdit  # noqa: E402
from landmark_plugin.errors import ConfigError  # noqa: E402
from landmark_plugin.grid.field import MultiBranchGridFieldConfig  # noqa: E402
from landmark_plugin.grid.model import LandmarkGridModelConfig  # noqa: E402
from landmark_plugin.grid.occupancy import OccupancyConfig  # noqa: E402

AABB = torch.tensor([[-1.0, -0.5, -0.2], [1.0, 0.7, 0.3]])
THRESHOLD = 1e-3
"""Density below which a cell is empty (an opacity of 1e-3 x step per skipped sample at most)."""


def _model(**occupancy):
    config = LandmarkGridModelConfig(
        field=MultiBranchGridFieldConfig(
            blocks=(2, 2), cells=6, density_components=4, appearance_components=6, density_bias=-20.0
        ),
        proposal_cells=(4, 8),
        num_proposal_samples_per_ray=(16, 8),
        num_nerf_samples_per_ray=8,
        sampler="occupancy",
        occupancy=OccupancyConfig(cells=16, march_samples=192, **occupancy),
    )
    torch.manual_seed(0)
    return config.setup(scene_box=SceneBox(aabb=AABB.clone()), num_train_data=4)


def _rays(n: int = 96) -> RayBundle:
    gen = torch.Generator().manual_seed(3)
    origins = torch.tensor([0.0, 0.1, 1.5]) + 0.3 * torch.randn(n, 3, generator=gen)
    directions = torch.nn.functional.normalize(
        torch.tensor([0.0, 0.0, -1.0]) + 0.5 * torch.randn(n, 3, generator=gen), dim=-1
    )
    return RayBundle(
        origins=origins, directions=directions, pixel_area=torch.full((n, 1), 1e-4),
        camera_indices=torch.randint(0, 4, (n, 1), generator=gen),
    )  # fmt: skip


def _trained_model():
    """A few steps of training, then block (0, 0) made solid: the rest is near-empty air
    (density about exp(-20)), so the grid has empty and occupied cells."""
    model = _model()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.rand(64, 3, generator=torch.Generator().manual_seed(4))
    for step in range(3):
        optimizer.zero_grad()
        outputs = model(_rays(64))
        model.get_loss_dict(outputs, {"image": target})["rgb_loss"].backward()
        optimizer.step()
    with torch.no_grad():
        density = model.field.density
        for plane, line in zip(density.planes, density.lines):
            plane[0] += 1.75  # block (0, 0): 8 factor-components of about 1.75^2 -> density ~exp(4.5)
            line[0] += 1.75
    model.eval()
    return model


@pytest.fixture(scope="module")
def model():
    model = _trained_model()
    model.occupancy.rebuild(model.field.density_fn, THRESHOLD, probes=6)
    binaries = model.occupancy.estimator.binaries
    assert 0 < int(binaries.sum()) < binaries.numel()  # some cells are skipped, some marched
    return model


def _render(model, dense: bool):
    occupancy, config = model.occupancy, model.config.occupancy
    if not dense:
        with torch.no_grad():
            return model(_rays())
    # every cell marched, no early termination: the reference
    saved = occupancy.estimator.binaries.clone(), config.early_stop_eps
    occupancy.estimator.binaries.fill_(True)
    config.early_stop_eps = 0.0
    try:
        with torch.no_grad():
            return model(_rays())
    finally:
        occupancy.estimator.binaries.copy_(saved[0])
        config.early_stop_eps = saved[1]


def _assert_skipped_equals_dense(model):
    skipped, dense = _render(model, dense=False), _render(model, dense=True)
    assert skipped["num_samples_per_ray"].sum() < 0.8 * dense["num_samples_per_ray"].sum()
    for key in ("rgb", "accumulation"):
        torch.testing.assert_close(skipped[key], dense[key], atol=1e-4, rtol=0)
    assert dense["accumulation"].max() > 0.9  # the rays do hit something
    return dense


def test_skipped_render_equals_dense_render_with_an_exact_grid(model):
    _assert_skipped_equals_dense(model)


def test_skipping_follows_layout_edits(model):
    # the solid block copied into the empty air beside it: the grid is read where the field is
    copy = BoxEdit("copy", torch.tensor([[-1.0, -0.5, -0.2], [0.0, 0.1, 0.3]]), torch.tensor([1.0, 0.0, 0.0]))
    unedited = _render(model, dense=True)
    model.field.layout_edits = (copy,)
    try:
        edited = _assert_skipped_equals_dense(model)
        assert (edited["accumulation"] - unedited["accumulation"]).abs().max() > 0.5  # the copy shows
    finally:
        model.field.layout_edits = ()


def test_points_in_empty_cells_have_density_below_the_threshold(model):
    gen = torch.Generator().manual_seed(9)
    points = AABB[0] + torch.rand(20000, 3, generator=gen) * (AABB[1] - AABB[0])
    empty = ~model.occupancy.occupied(points)
    assert 1000 < int(empty.sum()) < len(points)
    with torch.no_grad():
        density = model.field.density_fn(points[empty]).reshape(-1)
    assert density.max() < THRESHOLD


def test_a_proposal_checkpoint_renders_with_the_occupancy_sampler(model):
    """A checkpoint without occupancy state loads (strictly) and the first render rebuilds the
    grid from the field's density: it skips, and renders what the dense march renders."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("occupancy.")}
    fresh = _model()
    fresh.load_state_dict(state)
    fresh.eval()
    assert fresh.occupancy.stale and fresh.occupancy.estimator.binaries.all()
    _assert_skipped_equals_dense(fresh)
    assert not fresh.occupancy.stale and not fresh.occupancy.estimator.binaries.all()


def test_occupancy_without_the_box_collider_is_refused():
    with pytest.raises(ConfigError, match="enable-collider"):
        LandmarkGridModelConfig(sampler="occupancy", enable_collider=False).setup(
            scene_box=SceneBox(aabb=AABB.clone()), num_train_data=1
        )


def test_training_steps_update_the_grid_and_a_checkpoint_restores_it(tiny_city):
    from test_grid_model import tiny_city_config, train_steps

    def pipeline_of(config):
        torch.manual_seed(0)
        return config.pipeline.setup(device="cpu", test_mode="val")

    config = tiny_city_config(tiny_city, steps=6, rays=128)
    model_config = config.pipeline.model
    model_config.field.cells = 8
    model_config.proposal_cells = (4, 8)
    model_config.sampler = "occupancy"
    model_config.occupancy = OccupancyConfig(cells=16, march_samples=64, update_every=2, warmup_steps=3, occ_thre=1.0)
    model_config.upsample_fractions = (0.5,)
    pipeline = pipeline_of(config)
    estimator = pipeline.model.occupancy.estimator
    for losses, metrics in train_steps(config, pipeline):
        assert math.isfinite(float(sum(losses.values()))) and metrics["samples_per_ray"] > 0
    assert estimator.occs.max() > 0 and not estimator.binaries.all()  # updated from the field

    state = {k: v.clone() for k, v in pipeline.state_dict().items()}
    fresh = pipeline_of(config)
    fresh.load_pipeline(state, step=config.max_num_iterations)
    restored = fresh.model.occupancy.estimator
    assert torch.equal(restored.occs, estimator.occs) and torch.equal(restored.binaries, estimator.binaries)
    pipeline.eval(), fresh.eval()
    assert not fresh.model.occupancy.stale  # the checkpoint's grid is used as it is
    camera = pipeline.datamanager.eval_dataset.cameras[0:1]
    with torch.no_grad():
        a, b = (p.model.get_outputs_for_camera(camera) for p in (pipeline, fresh))
    torch.testing.assert_close(a["rgb"], b["rgb"], atol=0, rtol=0)


@pytest.mark.slow
def test_ns_train_resume_and_ns_render_with_the_occupancy_sampler(tiny_city, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from test_grid_cli import TINY, _run

    from landmark_plugin.checkpoints import allow_nerfstudio_checkpoints, load_checkpoint_file

    bin_dir = Path(sys.executable).parent
    occupancy = ["--pipeline.model.sampler", "occupancy", "--pipeline.model.occupancy.cells", "16",
                 "--pipeline.model.occupancy.march-samples", "64", "--pipeline.model.occupancy.update-every", "2",
                 "--pipeline.model.occupancy.occ-thre", "1.0", "--steps-per-save", "2"]  # fmt: skip
    run_dir = tmp_path / "out" / tiny_city.name / "landmark-grid"

    def train(timestamp: str, *extra: str) -> subprocess.CompletedProcess:
        return _run([str(bin_dir / "ns-train"), "landmark-grid", "--data", str(tiny_city), "--output-dir",
                     str(tmp_path / "out"), "--timestamp", timestamp, *TINY, *occupancy, *extra], cwd=tmp_path)  # fmt: skip

    train("first")
    allow_nerfstudio_checkpoints()
    saved = load_checkpoint_file(run_dir / "first" / "nerfstudio_models" / "step-000000003.ckpt")["pipeline"]
    binaries = saved["_model.occupancy.estimator.binaries"]
    assert saved["_model.occupancy.estimator.occs"].max() > 0 and not binaries.all()
    # resume from step 3's checkpoint for 2 more steps
    train("resumed", "--load-dir", str(run_dir / "first" / "nerfstudio_models"), "--max-num-iterations", "6")
    resumed = load_checkpoint_file(run_dir / "resumed" / "nerfstudio_models" / "step-000000005.ckpt")["pipeline"]
    assert torch.isfinite(resumed["_model.occupancy.estimator.occs"]).all()
    _run([str(bin_dir / "ns-render"), "dataset", "--load-config", str(run_dir / "first" / "config.yml"),
          "--output-path", str(tmp_path / "frames"), "--split", "test", "--rendered-output-names", "rgb"],
         cwd=tmp_path)  # fmt: skip
    assert len(list((tmp_path / "frames").rglob("*.jpg")) + list((tmp_path / "frames").rglob("*.png"))) == 2
