"""landmark-grid on unbounded scenes (``--pipeline.model.field.contraction linf``): the scene box
fills the middle of the grid, everything beyond it the rest, and rays run to the far plane.
(Several ranks equal one process: tests/test_grid_parallel.py, the contracted cases.)"""

from __future__ import annotations

import pytest
import torch

nerfstudio = pytest.importorskip("nerfstudio")

from nerfstudio.cameras.rays import RayBundle  # noqa: E402
from nerfstudio.data.scene_box import SceneBox  # noqa: E402
from nerfstudio.model_components.scene_colliders import AABBBoxCollider, NearFarCollider  # noqa: E402

from landmark_plugin.errors import ConfigError  # noqa: E402
from landmark_plugin.grid.field import MultiBranchGridFieldConfig  # noqa: E402
from landmark_plugin.grid.model import LandmarkGridModelConfig  # noqa: E402

AABB = torch.tensor([[-1.0, -0.5, -0.2], [1.0, 0.7, 0.3]])


def _field(contraction: str):
    config = MultiBranchGridFieldConfig(blocks=(2, 2), cells=6, density_components=4, appearance_components=6,
                                        contraction=contraction)  # type: ignore[arg-type]
    torch.manual_seed(0)
    return config.setup(aabb=AABB, num_images=4)


def _model(contraction: str, sampler: str = "proposal"):
    config = LandmarkGridModelConfig(
        field=MultiBranchGridFieldConfig(blocks=(2, 2), cells=6, density_components=4, appearance_components=6,
                                         contraction=contraction),  # type: ignore[arg-type]
        proposal_cells=(4, 8), num_proposal_samples_per_ray=(16, 8), num_nerf_samples_per_ray=8, sampler=sampler,  # type: ignore[arg-type]
    )
    torch.manual_seed(0)
    return config.setup(scene_box=SceneBox(aabb=AABB.clone()), num_train_data=4)


def test_the_box_fills_the_middle_of_the_grid_and_all_space_the_rest():
    bounded, contracted = _field("none"), _field("linf")
    gen = torch.Generator().manual_seed(0)
    inner = AABB[0] + torch.rand(64, 3, generator=gen) * (AABB[1] - AABB[0])
    blocks_b, local_b, inside_b = bounded.route(inner)
    blocks_c, local_c, inside_c = contracted.route(inner)
    assert inside_b.all() and inside_c.all()
    # inside the box the contraction is the identity: the box is the middle half of every axis
    unit_b = (inner - AABB[0]) / (AABB[1] - AABB[0])
    # far away (and in every direction) the points still land inside the grid, never outside
    far = torch.cat([inner * 1e3, -inner * 50.0, torch.tensor([[1e6, 0.0, 0.0], [0.0, 0.0, -1e6]])])
    _, local_far, inside_far = contracted.route(far)
    assert inside_far.all() and bool((local_far.abs() <= 1).all())  # block-local coordinates are in [-1, 1]
    assert not bounded.route(far)[2].any()
    # the contracted unit position of a box point: 1/4 + unit / 2 (nerfstudio's contraction of [-1, 1]^3)
    expected = 0.25 + 0.5 * unit_b
    lo = contracted.aabb[0] + expected * (contracted.aabb[1] - contracted.aabb[0])  # as if bounded
    blocks_e, local_e, _ = bounded.route(lo)
    assert torch.equal(blocks_e, blocks_c)
    torch.testing.assert_close(local_e, local_c, atol=1e-5, rtol=0)


def test_beyond_the_box_a_contracted_field_has_density_and_a_bounded_one_none():
    from test_grid_model import _samples

    outside = torch.tensor([[2.0, 0.0, 0.0], [0.0, -0.6, 0.0], [0.0, 0.0, 3.0], [-40.0, 7.0, 1.0]])
    bounded, _ = _field("none").get_density(_samples(outside))
    contracted, _ = _field("linf").get_density(_samples(outside))
    assert torch.equal(bounded, torch.zeros(4, 1))
    assert (contracted > 0).all()


def _rays(n: int = 32) -> RayBundle:
    gen = torch.Generator().manual_seed(3)
    origins = torch.tensor([0.0, 0.0, 0.1]) + 0.05 * torch.randn(n, 3, generator=gen)  # inside the box
    directions = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    return RayBundle(origins=origins, directions=directions, pixel_area=torch.full((n, 1), 1e-4),
                     camera_indices=torch.randint(0, 4, (n, 1), generator=gen))


def test_contracted_rays_run_to_the_far_plane_and_train():
    model = _model("linf")
    assert isinstance(model.collider, NearFarCollider) and isinstance(_model("none").collider, AABBBoxCollider)
    model.train()
    outputs = model(_rays())
    ends = outputs["ray_samples_list"][0].frustums.ends
    assert float(ends.max()) > 100.0, "the first proposal round samples far beyond the box"
    assert float(outputs["ray_samples_list"][-1].frustums.ends.max()) > 2.0, "the field samples beyond the box"
    batch = {"image": torch.rand(32, 3)}
    losses = model.get_loss_dict(outputs, batch, model.get_metrics_dict(outputs, batch))
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.get_param_groups()["grids"])


def test_occupancy_refuses_a_contracted_field():
    with pytest.raises(ConfigError, match="contraction none"):
        _model("linf", sampler="occupancy")
