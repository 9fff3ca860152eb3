"""nerfstudio-data with a point cloud, read without open3d (issue 21, item 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _trainers import micro_city  # noqa: F401 -- fixture

from landmark_plugin.data.nerfstudio_data import PlyNerfstudioDataParserConfig, without_open3d
from landmark_plugin.data.ply import read_points_ply


def test_points_equal_the_hand_applied_dataparser_transform(micro_city):
    # nerfstudio-data's defaults orient (pca), centre and scale the poses: a non-trivial transform.
    config = PlyNerfstudioDataParserConfig(data=micro_city, load_3D_points=True)
    outputs = config.setup().get_dataparser_outputs("train")
    xyz, rgb = read_points_ply(micro_city / "sparse_pc.ply")
    transform = outputs.dataparser_transform.double().numpy()  # [3, 4]
    assert not np.allclose(transform, np.eye(4)[:3]), "the test needs a transform that moves the points"
    expected = (xyz.astype(np.float64) @ transform[:, :3].T + transform[:, 3]) * outputs.dataparser_scale
    points = outputs.metadata["points3D_xyz"]
    assert points.dtype == torch.float32 and points.shape == (len(xyz), 3)
    np.testing.assert_allclose(points.numpy(), expected, rtol=0, atol=1e-5)
    assert torch.equal(outputs.metadata["points3D_rgb"], torch.from_numpy(rgb))


def test_plain_nerfstudio_data_config_becomes_ours_with_its_fields():
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    plain = NerfstudioDataParserConfig(data=Path("x"), load_3D_points=True, downscale_factor=2, orientation_method="up")
    swapped = without_open3d(plain)
    assert type(swapped) is PlyNerfstudioDataParserConfig
    assert (swapped.data, swapped.load_3D_points, swapped.downscale_factor, swapped.orientation_method) == (
        Path("x"), True, 2, "up"
    )
    ours = PlyNerfstudioDataParserConfig()
    assert without_open3d(ours) is ours


@pytest.mark.parametrize("method", ["retina-gs", "landmark-grid"])
def test_nerfstudio_data_as_typed_is_our_parser(method):
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    config = tyro.cli(AnnotatedBaseConfigUnion, args=[method, "--data", "x", "nerfstudio-data"])
    parser = config.pipeline.datamanager.dataparser
    assert type(parser) is PlyNerfstudioDataParserConfig
    assert parser.load_3D_points == (method == "retina-gs")  # the method's default survives the subcommand
