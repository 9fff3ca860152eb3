"""Tiny models for the layout-edit and viewer-control tests."""

from __future__ import annotations

import torch

GRID_AABB = torch.tensor([[-1.0, -1.0, -0.2], [1.0, 1.0, 0.3]])


def grid_model(background: str = "last_sample"):
    """A tiny landmark-grid model in eval mode: 2x2 blocks of random grids, dense enough to see."""
    from nerfstudio.data.scene_box import SceneBox

    from landmark_plugin.grid.field import MultiBranchGridFieldConfig
    from landmark_plugin.grid.model import LandmarkGridModelConfig

    config = LandmarkGridModelConfig(
        field=MultiBranchGridFieldConfig(
            blocks=(2, 2), cells=6, density_components=4, appearance_components=6, init_scale=0.3, density_bias=0.0
        ),
        proposal_cells=(4, 8),
        num_proposal_samples_per_ray=(16, 8),
        num_nerf_samples_per_ray=8,
        background_color=background,
    )
    torch.manual_seed(0)
    model = config.setup(scene_box=SceneBox(aabb=GRID_AABB.clone()), num_train_data=4)
    return model.eval()


def down_camera(position, width: int = 32, height: int = 24):
    """A pinhole camera at ``position`` looking straight down (-z)."""
    from nerfstudio.cameras.cameras import Cameras

    c2w = torch.eye(4)[:3].clone()
    c2w[:, 3] = torch.as_tensor(position, dtype=torch.float32)
    return Cameras(camera_to_worlds=c2w[None], fx=20.0, fy=20.0, cx=width / 2, cy=height / 2, width=width, height=height)
