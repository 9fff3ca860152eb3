"""The synthetic-city generator: determinism, sizes, formats, and points that lie on what is rendered."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TINY_CITY, synthetic_city_config

from landmark_plugin.data.city import CityConfig, make_cameras, make_layout, write_city
from landmark_plugin.data.city_cli import WriteCity
from landmark_plugin.data.city_render import render_view, sample_points
from landmark_plugin.data.ply import read_points_ply

EIGHT_SMALL = CityConfig(num_images=8, width=96, height=72, num_points=300)


def dataset_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    start = time.perf_counter()
    first = dataset_bytes(write_city(tmp_path / "a", EIGHT_SMALL))
    elapsed = time.perf_counter() - start
    second = dataset_bytes(write_city(tmp_path / "b", EIGHT_SMALL, workers=2))  # rendered in worker processes
    assert first.keys() == second.keys()
    assert len([name for name in first if name.startswith("images/")]) == 8
    for name in first:
        assert first[name] == second[name], name
    assert elapsed < 3.0, f"8 images of 96x72 took {elapsed:.2f} s (budget 1 s, 3x slack for busy CI)"


def test_different_seeds_give_different_cities(tmp_path):
    a = dataset_bytes(write_city(tmp_path / "a", EIGHT_SMALL))
    b = dataset_bytes(write_city(tmp_path / "b", dataclasses.replace(EIGHT_SMALL, seed=1)))
    assert a["images/frame_00000.png"] != b["images/frame_00000.png"]
    assert a["sparse_pc.ply"] != b["sparse_pc.ply"]


def test_more_images_keep_the_same_layout():
    a = make_layout(EIGHT_SMALL)
    b = make_layout(dataclasses.replace(EIGHT_SMALL, num_images=100, width=320))
    np.testing.assert_array_equal(a.box_max, b.box_max)


@pytest.mark.parametrize("blocks, lots", [((1, 1), (1, 1)), ((2, 3), (2, 1)), ((4, 4), (3, 2))])
def test_any_size_city_is_centred_with_z_up(blocks, lots):
    config = CityConfig(blocks=blocks, lots_per_block=lots, num_images=6, width=32, height=24, park_fraction=0.0)
    layout = make_layout(config)
    assert layout.num_buildings == blocks[0] * blocks[1] * lots[0] * lots[1]
    np.testing.assert_allclose(layout.city_min, -layout.city_max)
    assert np.all(layout.box_min[:, 2] == 0) and np.all(layout.box_max[:, 2] > 0)
    assert np.all(np.abs(layout.box_max[:, :2]) <= layout.city_max)
    assert 1.0 < float(np.max(layout.city_max)) * 2 < 20.0  # extent of order 1-10 units
    cameras = make_cameras(config, layout)
    aerial_heights = cameras.camera_to_worlds[~cameras.is_street, 2, 3]
    assert np.all(aerial_heights > layout.box_max[:, 2].max())


def test_written_files_have_the_configured_sizes(tiny_city):
    meta = json.loads((tiny_city / "transforms.json").read_text())
    assert len(meta["frames"]) == TINY_CITY["num_images"]
    assert (meta["w"], meta["h"]) == (TINY_CITY["width"], TINY_CITY["height"])
    names = [frame["file_path"] for frame in meta["frames"]]
    assert meta["test_filenames"] == names[:: TINY_CITY["test_every"]] == meta["val_filenames"]
    assert sorted(meta["train_filenames"] + meta["test_filenames"]) == sorted(names)
    for name in names:
        image = cv2.imread(str(tiny_city / name))
        assert image.shape == (TINY_CITY["height"], TINY_CITY["width"], 3)
    for frame in meta["frames"]:
        c2w = np.array(frame["transform_matrix"])
        np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-9)
        np.testing.assert_array_equal(c2w[3], [0, 0, 0, 1])
    xyz, rgb = read_points_ply(tiny_city / meta["ply_file_path"])
    assert xyz.shape == (TINY_CITY["num_points"], 3) and rgb.shape == xyz.shape
    assert np.isfinite(xyz).all()


def test_cameras_look_at_geometry():
    config = CityConfig(**{**TINY_CITY, "num_images": 24})
    layout = make_layout(config)
    cameras = make_cameras(config, layout)
    assert 0 < cameras.is_street.sum() < len(cameras.is_street)
    for c2w, street in zip(cameras.camera_to_worlds, cameras.is_street):
        _, depth = render_view(layout, c2w, cameras.intrinsics, cameras.width, cameras.height)
        sky = float(np.isinf(depth).mean())
        if street:
            assert sky < 0.8, "a street view should see buildings or road"
            assert 0 < c2w[2, 3] < layout.box_max[:, 2].min()
        else:
            assert sky < 0.3, "most of an aerial view should be city"
            assert c2w[2, 3] > layout.box_max[:, 2].max()


def test_points_lie_on_rendered_geometry_with_rendered_colours():
    # Four times the tiny resolution, so that window texture is not aliased away.
    config = CityConfig(**{**TINY_CITY, "width": 384, "height": 288})
    layout = make_layout(config)
    cameras = make_cameras(config, layout)
    xyz, rgb = sample_points(layout, 3000, np.random.default_rng(0))
    for c2w in cameras.camera_to_worlds[~cameras.is_street][:2]:
        image, depth = render_view(layout, c2w, cameras.intrinsics, cameras.width, cameras.height)
        cam = (xyz - c2w[:3, 3]) @ c2w[:3, :3]
        z = -cam[:, 2]
        u = cameras.fx * cam[:, 0] / z + cameras.cx
        v = -cameras.fy * cam[:, 1] / z + cameras.cy
        inside = (z > 0) & (u >= 0) & (u < cameras.width) & (v >= 0) & (v < cameras.height)
        rows, cols = v[inside].astype(int), u[inside].astype(int)
        # Visible points (not behind a building, not on a back-facing wall) have the pixel's depth...
        visible = np.abs(depth[rows, cols] - z[inside]) < 0.01 * z[inside]
        assert visible.mean() > 0.3
        # ...and, texture edges inside a pixel aside, its colour.
        error = np.abs(image[rows, cols].astype(int) - rgb[inside].astype(int)).max(-1)[visible]
        assert np.median(error) <= 2 and (error <= 12).mean() > 0.75


def test_config_rejects_impossible_values():
    for bad in (dict(blocks=(0, 2)), dict(height_range=(2.0, 1.0)), dict(test_every=1), dict(fov_deg=180.0)):
        with pytest.raises(ValueError):
            CityConfig(**bad)


def test_cli_writes_a_dataset(tmp_path, capsys):
    import tyro

    out = tmp_path / "cli-city"
    args = ["--output-dir", str(out), "--num-images", "4", "--width", "32", "--height", "24", "--num-points", "50"]
    tyro.cli(WriteCity, args=args).main()
    meta = json.loads((out / "transforms.json").read_text())
    assert len(meta["frames"]) == 4 and meta["synthetic_city"]["num_points"] == 50
    assert str(out.resolve()) in capsys.readouterr().out.replace("\n", "")
    with pytest.raises(SystemExit):
        tyro.cli(WriteCity, args=args).main()  # refuses to overwrite without --overwrite


def test_nerfstudio_reads_the_point_cloud_with_open3d(tiny_city):
    """nerfstudio-data's own loader (open3d) reads sparse_pc.ply to the same points as ours."""
    reason = "open3d does not import here (it needs system libraries such as libusb)"
    pytest.importorskip("open3d", reason=reason, exc_type=ImportError)
    import torch
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from landmark_plugin.data.validate import parse_checked

    plain = NerfstudioDataParserConfig(data=tiny_city, load_3D_points=True, orientation_method="none")
    theirs = parse_checked(plain, "train").metadata
    ours = parse_checked(synthetic_city_config(tiny_city, orientation_method="none", center_method="poses"), "train")
    torch.testing.assert_close(theirs["points3D_xyz"], ours.metadata["points3D_xyz"])
    assert torch.equal(theirs["points3D_rgb"], ours.metadata["points3D_rgb"])


def test_varying_appearance_changes_light_and_exposure_not_geometry(tmp_path):
    """vary_appearance: per image a time of day, an exposure and a white balance, drawn from the
    seed (same bytes twice, also from worker processes); the geometry and the point cloud stay."""
    varying = dataclasses.replace(EIGHT_SMALL, vary_appearance=True)
    fixed = dataset_bytes(write_city(tmp_path / "fixed", EIGHT_SMALL))
    first = dataset_bytes(write_city(tmp_path / "a", varying))
    assert first == dataset_bytes(write_city(tmp_path / "b", varying, workers=2))
    assert first["sparse_pc.ply"] == fixed["sparse_pc.ply"]
    images = sorted(name for name in first if name.startswith("images/"))
    ratios = []
    for name in images:
        a, f = (cv2.imdecode(np.frombuffer(d[name], np.uint8), cv2.IMREAD_COLOR).astype(np.float64) for d in (first, fixed))
        assert np.abs(a - f).mean() > 3.0, f"{name}: appearance must change the image"
        ratios.append(a.reshape(-1, 3).mean(0) / f.reshape(-1, 3).mean(0))  # BGR
    ratios = np.array(ratios)
    assert np.log(ratios[:, 1]).std() > 0.15, f"exposure must vary between images: {ratios[:, 1]}"
    assert np.log(ratios[:, 2] / ratios[:, 0]).std() > 0.03, "the colour balance must vary between images"
    frames = json.loads(first["transforms.json"])["frames"]
    exposures = [frame["appearance"]["exposure"] for frame in frames]
    assert len(exposures) == 8 and all(0.5 <= e <= 2**0.7 for e in exposures)
    assert "appearance" not in json.loads(fixed["transforms.json"])["frames"][0]


def test_varying_appearance_keeps_the_depth_and_the_first_images():
    from landmark_plugin.data.city import make_appearances

    config = dataclasses.replace(EIGHT_SMALL, vary_appearance=True)
    layout, cameras = make_layout(config), make_cameras(config, make_layout(config))
    more = make_appearances(dataclasses.replace(config, num_images=30))
    for i, appearance in enumerate(make_appearances(config)):
        np.testing.assert_array_equal(appearance.gain, more[i].gain)
        np.testing.assert_array_equal(appearance.sun_dir, more[i].sun_dir)
    c2w, K = cameras.camera_to_worlds[3], cameras.intrinsics
    _, depth = render_view(layout, c2w, K, 96, 72)
    _, lit_depth = render_view(layout, c2w, K, 96, 72, make_appearances(config)[3])
    np.testing.assert_array_equal(depth, lit_depth)
