"""Ray batches for landmark-grid, and the scene box the grid tiles, derived from the data.

Batches are nerfstudio's VanillaDataManager ray bundles; their ``camera_indices`` select the
per-image appearance embedding.  What this subclass adds is the box: the grid spends its
texels on the box, so it should hug the content rather than the dataparser's generic cube.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple, Type, Union

import torch
from jaxtyping import Float
from torch import Tensor

from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.data.checked import CheckedDataset, CheckedInput
from landmark_plugin.data.nerfstudio_data import to_dataparser_frame
from landmark_plugin.data.ply import read_points_ply
from landmark_plugin.errors import ConfigError


def scene_bounds(
    default_aabb: Float[Tensor, "2 3"],
    points: Optional[Float[Tensor, "N 3"]] = None,
    camera_centers: Optional[Float[Tensor, "C 3"]] = None,
    quantile: float = 0.005,
    margin: float = 0.05,
) -> Float[Tensor, "2 3"]:
    """The box the grid should tile, from the scene's points and cameras.

    With points (SfM / synthetic point cloud): their ``quantile .. 1 - quantile`` box (drops
    stray points), clipped to the camera box grown by its largest extent on every side (drops
    far background that no camera looks at closely), padded by ``margin`` times the largest
    extent on every axis (so flat scenes keep some height).  Without points: ``default_aabb``,
    the dataparser's box (e.g. blender's [-1.5, 1.5]^3, nerfstudio-data's normalised cube).

    Args:
        default_aabb: [2, 3] the dataparser's scene box.
        points: [N, 3] scene points, or None.
        camera_centers: [C, 3] camera positions, or None.
        quantile: fraction of points ignored at each end per axis.
        margin: padding as a fraction of the largest extent.
    """
    if points is None or points.shape[0] < 8:
        return default_aabb.clone().float()
    points = points.float()
    if points.shape[0] > 1_000_000:  # quantile() refuses huge inputs; a fixed subsample is plenty
        points = points[torch.linspace(0, points.shape[0] - 1, 1_000_000).long()]
    low = torch.quantile(points, quantile, dim=0)
    high = torch.quantile(points, 1.0 - quantile, dim=0)
    if camera_centers is not None and camera_centers.shape[0] > 0:
        cams = camera_centers.float()
        grow = (cams.max(0).values - cams.min(0).values).max()
        low = torch.maximum(low, cams.min(0).values - grow)
        high = torch.minimum(high, cams.max(0).values + grow)
    pad = margin * (high - low).max().clamp(min=1e-6)
    return torch.stack([low - pad, high + pad])


@dataclass
class LandmarkGridDataManagerConfig(VanillaDataManagerConfig):
    """VanillaDataManager whose scene box is derived from the data (see ``scene_bounds``)."""

    _target: Type = field(default_factory=lambda: LandmarkGridDataManager)
    """target class to instantiate"""
    scene_bounds: Optional[Tuple[float, float, float, float, float, float]] = None
    """Scene box as xmin ymin zmin xmax ymax zmax in the dataparser's (normalised) coordinates;
    overrides the box derived from the points and cameras."""
    bounds_quantile: float = 0.005
    """Fraction of the points ignored at each end of every axis when deriving the box."""
    bounds_margin: float = 0.05
    """Padding of the derived box, as a fraction of its largest extent."""


class LandmarkGridDataManager(CheckedInput, VanillaDataManager[CheckedDataset]):
    """Ray batches with image indices; the datasets' scene box is replaced by the grid's box.

    The input is validated before any image is loaded (``CheckedInput``).
    """

    config: LandmarkGridDataManagerConfig

    def __init__(
        self,
        config: LandmarkGridDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ):
        super().__init__(config, device, test_mode, world_size, local_rank, **kwargs)
        aabb = self.grid_aabb()
        box = SceneBox(aabb=aabb)
        # the pipeline hands train_dataset.scene_box to the model; keep every copy the same
        self.train_dataparser_outputs.scene_box = box
        self.train_dataset.scene_box = box
        self.eval_dataset.scene_box = box
        CONSOLE.print(f"landmark-grid scene box: min {aabb[0].tolist()} max {aabb[1].tolist()}")

    def grid_aabb(self) -> Float[Tensor, "2 3"]:
        """The configured box, else one derived from the training points and cameras."""
        if self.config.scene_bounds is not None:
            values = torch.tensor(self.config.scene_bounds, dtype=torch.float32).view(2, 3)
            if not bool((values[1] > values[0]).all()):
                raise ConfigError(f"--pipeline.datamanager.scene-bounds needs min < max on every axis, got {self.config.scene_bounds}")
            return values
        outputs = self.train_dataparser_outputs
        points = outputs.metadata.get("points3D_xyz")
        if points is None:
            points = self._points_from_transforms_ply()
        centers = outputs.cameras.camera_to_worlds[:, :3, 3]
        return scene_bounds(
            outputs.scene_box.aabb,
            points=torch.as_tensor(points) if points is not None else None,
            camera_centers=centers,
            quantile=self.config.bounds_quantile,
            margin=self.config.bounds_margin,
        )

    def _points_from_transforms_ply(self) -> Optional[Float[Tensor, "N 3"]]:
        """The nerfstudio-data point cloud (transforms.json's ply_file_path) in dataparser coordinates.

        nerfstudio-data reads it only with ``load_3D_points`` and then through open3d, which is
        heavy and fails to import on machines without libusb; the box needs only positions.
        """
        data = Path(self.config.data) if self.config.data is not None else None
        if data is None:
            return None
        transforms = data if data.suffix == ".json" else data / "transforms.json"
        if not transforms.is_file():
            return None
        ply_name = json.loads(transforms.read_text()).get("ply_file_path")
        if not ply_name or not (transforms.parent / ply_name).is_file():
            return None
        xyz, _ = read_points_ply(transforms.parent / ply_name)
        outputs = self.train_dataparser_outputs
        return to_dataparser_frame(torch.from_numpy(xyz), outputs.dataparser_transform.float(), outputs.dataparser_scale)
