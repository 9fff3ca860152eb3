"""landmark-grid field and model on CPU: upsampling with optimiser state, checkpoints, scene
bounds, and a few real training steps on the tiny synthetic city."""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import pytest
import torch

from landmark_plugin.core.grid_features import seam_mismatch

nerfstudio = pytest.importorskip("nerfstudio")

from nerfstudio.cameras.rays import Frustums, RayBundle, RaySamples  # noqa: E402
from nerfstudio.data.scene_box import SceneBox  # noqa: E402
from nerfstudio.field_components.field_heads import FieldHeadNames  # noqa: E402

from landmark_plugin.grid.datamanager import scene_bounds  # noqa: E402
from landmark_plugin.grid.field import MultiBranchGridFieldConfig  # noqa: E402
from landmark_plugin.grid.model import LandmarkGridModelConfig, upsample_steps  # noqa: E402

# the spec's bound for "upsampling keeps the represented function"; integer-factor resampling
# is exact, so what remains is float32 rounding through the decoder
UPSAMPLE_TOL = 1e-3

AABB = torch.tensor([[-1.0, -0.5, -0.2], [1.0, 0.7, 0.3]])


def _samples(points: torch.Tensor, seed: int = 0) -> RaySamples:
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(points.shape, generator=gen), dim=-1)
    zeros = torch.zeros_like(points[..., :1])
    return RaySamples(
        frustums=Frustums(origins=points, directions=directions, starts=zeros, ends=zeros, pixel_area=zeros + 1),
        camera_indices=torch.randint(0, 4, (*points.shape[:-1], 1), generator=gen),
    )


def _points(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return AABB[0] + torch.rand(n, 3, generator=gen) * (AABB[1] - AABB[0])


def _field(**changes):
    config = MultiBranchGridFieldConfig(blocks=(3, 2), cells=6, density_components=4, appearance_components=6)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return config.setup(aabb=AABB, num_images=4)


def _outputs(field, samples):
    out = field(samples)
    return torch.cat([out[FieldHeadNames.DENSITY], out[FieldHeadNames.RGB]], -1)


def _assert_seams_consistent(field):
    for factors in field.factor_sets():
        for param, spatial in factors._spatial_axes():
            assert seam_mismatch(param.detach(), factors.blocks, spatial) == 0.0


@pytest.mark.parametrize("mode", ["xy-z", "vm"])
def test_upsampling_keeps_the_field_and_the_optimiser_keeps_working(mode):
    field = _field(mode=mode)
    samples, target = _samples(_points(2048)), torch.rand(2048, 4)
    optimizer = torch.optim.Adam(field.parameters(), lr=1e-2)

    def step() -> float:
        optimizer.zero_grad()
        loss = (_outputs(field, samples) - target).square().mean()
        loss.backward()
        optimizer.step()
        return float(loss)

    losses = [step() for _ in range(10)]
    _assert_seams_consistent(field)  # tied gradients + Adam keep the seam copies equal
    field.eval()
    probe = _samples(_points(2000, seed=7), seed=8)
    with torch.no_grad():
        before = _outputs(field, probe)
    cells_before = field.density.cells()
    shapes_before = {n: p.shape for n, p in field.named_parameters()}
    for factors in field.factor_sets():
        factors.upsample(2, [optimizer])
    assert field.density.cells() == [2 * c for c in cells_before]
    with torch.no_grad():
        after = _outputs(field, probe)
    assert (after - before).abs().max() <= UPSAMPLE_TOL
    # every parameter in the optimiser is the field's current one, with state of its shape
    params = {id(p) for p in field.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) in params
            for value in optimizer.state[p].values():
                if torch.is_tensor(value) and value.dim() > 0:
                    assert value.shape == p.shape
    grown = [n for n, p in field.named_parameters() if p.shape != shapes_before[n]]
    assert len(grown) == 2 * len(field.factor_sets()) * len(field.axes)
    field.train()
    losses += [step() for _ in range(10)]
    assert losses[-1] < losses[9] < losses[0]
    _assert_seams_consistent(field)


def test_points_outside_the_box_are_empty():
    field = _field()
    outside = torch.tensor([[2.0, 0.0, 0.0], [0.0, -0.6, 0.0], [0.0, 0.0, 0.31], [-1.01, 0.69, 0.0]])
    density, _ = field.get_density(_samples(outside))
    assert torch.equal(density, torch.zeros(4, 1))
    inside, _ = field.get_density(_samples(_points(16)))
    assert (inside > 0).all()


def test_appearance_embedding_follows_the_image_index():
    field = _field()
    with torch.no_grad():
        field.embedding_appearance.embedding.weight.normal_()
    points = _points(8).repeat(2, 1)
    samples = _samples(points)
    samples.frustums.directions = samples.frustums.directions[:8].repeat(2, 1)
    samples.camera_indices = torch.tensor([0] * 8 + [3] * 8)[:, None]
    field.train()
    rgb = field(samples)[FieldHeadNames.RGB]
    assert (rgb[:8] - rgb[8:]).abs().max() > 1e-3  # same points, different images
    field.eval()  # eval: the mean code, whatever the index ...
    rgb_eval = field(samples)[FieldHeadNames.RGB]
    # equal up to float32 rounding: a CPU's matmul kernel may block rows 0-7 and 8-15 differently
    torch.testing.assert_close(rgb_eval[:8], rgb_eval[8:], atol=1e-6, rtol=0)
    field.eval_appearance_index = 3  # ... unless an image's appearance is picked
    torch.testing.assert_close(field(samples)[FieldHeadNames.RGB][:8], rgb[8:], atol=1e-6, rtol=0)


def _model(num_train_data: int = 4):
    config = LandmarkGridModelConfig(
        field=MultiBranchGridFieldConfig(blocks=(2, 2), cells=6, density_components=4, appearance_components=6),
        proposal_cells=(4, 8),
        num_proposal_samples_per_ray=(16, 8),
        num_nerf_samples_per_ray=8,
    )
    torch.manual_seed(0)
    return config.setup(scene_box=SceneBox(aabb=AABB.clone()), num_train_data=num_train_data)


def _rays(n: int = 64) -> RayBundle:
    gen = torch.Generator().manual_seed(3)
    origins = torch.tensor([0.0, 0.0, 1.5]) + 0.2 * torch.randn(n, 3, generator=gen)
    directions = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, -1.0]) + 0.3 * torch.randn(n, 3, generator=gen), dim=-1)
    return RayBundle(
        origins=origins,
        directions=directions,
        pixel_area=torch.full((n, 1), 1e-4),
        camera_indices=torch.randint(0, 4, (n, 1), generator=gen),
    )


def test_checkpoint_round_trips_after_upsampling(tmp_path):
    model = _model()
    model.upsample_grids()
    with torch.no_grad():
        for p in model.parameters():  # make sure nothing of the fresh init survives by chance
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    path = tmp_path / "model.ckpt"
    torch.save({"model": model.state_dict()}, path)
    loaded_state = torch.load(path, weights_only=True)  # torch >= 2.6 default
    fresh = _model()
    assert fresh.field.density.cells() != model.field.density.cells()
    fresh.load_model(loaded_state)
    fresh.eval()
    assert fresh.field.density.cells() == model.field.density.cells()
    torch.manual_seed(5)
    a = model(copy.deepcopy(_rays()))
    torch.manual_seed(5)
    b = fresh(copy.deepcopy(_rays()))
    for key in ("rgb", "accumulation", "depth"):
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_model_outputs_and_losses_on_cpu():
    model = _model()
    model.train()
    outputs = model(_rays(32))
    assert outputs["rgb"].shape == (32, 3) and outputs["accumulation"].shape == (32, 1)
    batch = {"image": torch.rand(32, 3)}
    metrics = model.get_metrics_dict(outputs, batch)
    losses = model.get_loss_dict(outputs, batch, metrics)
    assert {"rgb_loss", "interlevel_loss", "distortion_loss", "tv_density", "tv_appearance", "l1_density"} <= set(losses)
    sum(losses.values()).backward()
    groups = model.get_param_groups()
    assert set(groups) == {"grids", "decoder", "proposal_networks"}
    assert all(p.grad is not None for p in groups["grids"])


def test_upsample_steps_follow_the_run_length():
    assert upsample_steps((0.05, 0.1, 0.2), 30000) == [1500, 3000, 6000]
    assert upsample_steps((0.05, 0.1, 0.2), 5) == [0, 0, 1]  # short runs: grow several times at once
    assert upsample_steps((), 100) == []


def test_scene_bounds_from_points_cameras_and_default():
    default = torch.tensor([[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]])
    assert torch.equal(scene_bounds(default), default)
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(5000, 3, generator=gen) * torch.tensor([2.0, 1.0, 0.1])
    points[:5] = 100.0  # stray points are dropped by the quantiles
    box = scene_bounds(default, points=points, quantile=0.005, margin=0.05)
    pad = 0.05 * 2.0
    torch.testing.assert_close(box, torch.tensor([[-pad, -pad, -pad], [2 + pad, 1 + pad, 0.1 + pad]]), atol=0.03, rtol=0)
    # far background beyond the camera box grown by its extent is cut off
    cams = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.5, 1.0]])
    box = scene_bounds(default, points=points, camera_centers=cams, quantile=0.005, margin=0.0)
    assert box[1, 0] <= 1.0 + 1e-6 and box[0, 2] >= -1e-6


def tiny_city_config(data, steps: int, rays: int):
    """landmark-grid's trainer config for ``steps`` steps of ``rays`` rays on the tiny city at ``data``."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from landmark_plugin.method_configs.landmark_grid import landmark_grid_config

    config = landmark_grid_config(max_steps=steps)
    config.pipeline.datamanager.data = data
    config.pipeline.datamanager.dataparser = NerfstudioDataParserConfig()
    config.pipeline.datamanager.train_num_rays_per_batch = rays
    return config


def train_steps(config, pipeline) -> List[Tuple[Dict, Dict]]:
    """``config.max_num_iterations`` steps of ``pipeline`` as nerfstudio's Trainer runs them
    (callbacks included): each step's (loss dict, metrics dict)."""
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
    from nerfstudio.engine.optimizers import Optimizers

    optimizers = Optimizers(config.optimizers, pipeline.get_param_groups())

    class _Trainer:  # what the callbacks read from the trainer
        pass

    trainer = _Trainer()
    trainer.config = config  # type: ignore[attr-defined]
    callbacks = pipeline.get_training_callbacks(
        TrainingCallbackAttributes(optimizers=optimizers, grad_scaler=None, pipeline=pipeline, trainer=trainer)  # type: ignore[arg-type]
    )
    records = []
    for step in range(config.max_num_iterations):
        for cb in callbacks:
            cb.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        optimizers.zero_grad_all()
        _, loss_dict, metrics = pipeline.get_train_loss_dict(step)
        sum(loss_dict.values()).backward()
        optimizers.optimizer_step_all()
        optimizers.scheduler_step_all(step)
        for cb in callbacks:
            cb.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        records.append(({k: v.detach() for k, v in loss_dict.items()}, metrics))
    return records


@pytest.mark.slow
def test_a_few_steps_on_the_tiny_city_lower_the_loss(tiny_city):
    config = tiny_city_config(tiny_city, steps=30, rays=256)
    model = config.pipeline.model
    model.field.cells = 12
    model.proposal_cells = (8, 16)
    model.num_proposal_samples_per_ray = (32, 16)
    model.num_nerf_samples_per_ray = 16
    model.upsample_fractions = (0.5,)  # grow once mid-run: training must go on across the resize
    torch.manual_seed(0)
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    aabb = pipeline.model.field.aabb
    assert (aabb[1] > aabb[0]).all()  # derived from the city's points, not the default cube
    losses = [float(losses["rgb_loss"]) for losses, _ in train_steps(config, pipeline)]
    assert max(pipeline.model.field.density.cells()) == 2 * 12  # the grid grew once
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, losses


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_render_precision_changes_eval_colour_only_slightly_and_never_training(precision):
    reference, reduced = _field(), _field(render_precision=precision)
    samples = _samples(_points(256))
    reference.eval(), reduced.eval()
    with torch.no_grad():
        want, got = _outputs(reference, samples), _outputs(reduced, samples)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[:, :1], want[:, :1], atol=0, rtol=0)  # density: float32 either way
    colour = (got[:, 1:] - want[:, 1:]).abs()
    assert 0 < float(colour.max()) < 2e-2, f"{precision} decoder: colour error {float(colour.max()):.3g}"
    reference.train(), reduced.train()
    torch.testing.assert_close(_outputs(reduced, samples), _outputs(reference, samples), atol=0, rtol=0)
