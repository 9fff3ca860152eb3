"""nerfstudio-data with its point cloud read by plyfile instead of open3d.

nerfstudio's ``Nerfstudio._load_3D_points`` imports open3d, which fails on machines without
libusb (headless servers, containers, CI): a valid capture whose transforms.json names a
``ply_file_path`` (what ns-process-data writes) could not be trained.  ``PlyNerfstudio`` is
nerfstudio's parser with only that method replaced; the points get the same transform and
scale.  It is the default dataparser of retina-gs and landmark-grid, and tyro keeps it when
the user types ``nerfstudio-data`` (it matches the subcommand's type), so the command line
is nerfstudio's.  Our data managers also swap a plain nerfstudio-data config for it
(``without_open3d``), e.g. in an older config.yml.

Dataparser level only (no datamanager or model imports): see data/specs.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Type

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from nerfstudio.data.dataparsers.base_dataparser import DataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio, NerfstudioDataParserConfig

from landmark_plugin.data.ply import read_points_ply
from landmark_plugin.data.validate import InputError, input_errors


def to_dataparser_frame(
    xyz: Float[Tensor, "N 3"], transform: Float[Tensor, "3 4"], scale: float
) -> Float[Tensor, "N 3"]:
    """Points of the capture's world in dataparser coordinates: ``(transform @ [x, 1]) * scale``,
    what nerfstudio applies to the cameras (and to the point cloud in ``_load_3D_points``)."""
    homogeneous = torch.cat([xyz.to(transform.dtype), torch.ones_like(xyz[..., :1], dtype=transform.dtype)], dim=-1)
    return (homogeneous @ transform.T) * scale


def load_points(ply_file_path: Path, transform: Float[Tensor, "3 4"], scale: float) -> Dict[str, Tensor]:
    """``points3D_xyz`` (float32 [N, 3], dataparser coordinates) and ``points3D_rgb`` (uint8 [N, 3])
    of a PLY; InputError naming the file if it cannot be read or holds no points."""
    with input_errors(ply_file_path, "cannot read point cloud"):
        xyz, rgb = read_points_ply(ply_file_path)
    if len(xyz) == 0:
        raise InputError(f"{ply_file_path}: point cloud has no points")
    points = to_dataparser_frame(torch.from_numpy(xyz), transform, scale)
    return {"points3D_xyz": points.float(), "points3D_rgb": torch.from_numpy(np.ascontiguousarray(rgb))}


@dataclass
class PlyNerfstudioDataParserConfig(NerfstudioDataParserConfig):
    """nerfstudio-data whose point cloud (transforms.json's ply_file_path) is read without open3d."""

    _target: Type = field(default_factory=lambda: PlyNerfstudio)
    """target class to instantiate"""


class PlyNerfstudio(Nerfstudio):
    """nerfstudio's Nerfstudio parser; the point cloud is read with plyfile."""

    config: PlyNerfstudioDataParserConfig

    def _load_3D_points(self, ply_file_path: Path, transform_matrix: torch.Tensor, scale_factor: float):
        return load_points(ply_file_path, transform_matrix, scale_factor)


def without_open3d(config: DataParserConfig) -> DataParserConfig:
    """``config``, or for nerfstudio's own nerfstudio-data config the same fields on our parser."""
    if type(config) is not NerfstudioDataParserConfig:
        return config
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "_target"}
    return PlyNerfstudioDataParserConfig(**values)
