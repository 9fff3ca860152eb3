"""Dataparsers through parse_checked: synthetic-city, matrixcity (on files in MatrixCity's layout), colmap."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_CITY, shared_data, synthetic_city_config

from landmark_plugin.data.matrixcity import MatrixCityDataParserConfig
from landmark_plugin.data.ply import write_points_ply
from landmark_plugin.data.validate import InputError, parse_checked

# ---------------------------------------------------------------- synthetic-city


def test_synthetic_city_splits_and_points(tiny_city_dataparser):
    train = parse_checked(tiny_city_dataparser, "train")
    test = parse_checked(tiny_city_dataparser, "test")
    val = parse_checked(tiny_city_dataparser, "val")
    n_test = math.ceil(TINY_CITY["num_images"] / TINY_CITY["test_every"])
    assert len(train.image_filenames) == TINY_CITY["num_images"] - n_test
    assert len(test.image_filenames) == n_test and val.image_filenames == test.image_filenames
    assert not set(train.image_filenames) & set(test.image_filenames)
    assert train.cameras.camera_to_worlds.abs().max() <= 1.0 + 1e-6
    points = train.metadata["points3D_xyz"]
    assert points.shape == (TINY_CITY["num_points"], 3) and torch.isfinite(points).all()
    assert train.metadata["points3D_rgb"].dtype == torch.uint8
    # The generator's frame is kept (only scaled): the ground is z = 0, buildings stand above it.
    assert points[:, 2].min() > -1e-6 and points[:, 2].max() > 0


def test_synthetic_city_agrees_with_nerfstudio_data_parser(tiny_city, tiny_city_dataparser):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    plain = NerfstudioDataParserConfig(data=tiny_city, orientation_method="none", center_method="none")
    for split in ("train", "test"):
        ours = parse_checked(tiny_city_dataparser, split)
        theirs = parse_checked(plain, split)
        assert ours.image_filenames == theirs.image_filenames
        torch.testing.assert_close(ours.cameras.camera_to_worlds, theirs.cameras.camera_to_worlds)
        torch.testing.assert_close(ours.cameras.fx, theirs.cameras.fx)
    # nerfstudio's defaults (orient 'up', centre on poses) also parse it.
    default = parse_checked(NerfstudioDataParserConfig(data=tiny_city), "train")
    assert torch.isfinite(default.cameras.camera_to_worlds).all()


def test_synthetic_city_generates_once_on_first_use(tmp_path):
    config = synthetic_city_config(tmp_path / "fresh" / "city")
    outputs = parse_checked(config, "train")
    transforms = tmp_path / "fresh" / "city" / "transforms.json"
    assert transforms.is_file() and len(outputs.image_filenames) > 0
    stamp = transforms.stat().st_mtime_ns
    parse_checked(config, "test")
    assert transforms.stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "fresh").iterdir() if p.name.startswith(".")], "scratch folder left behind"


def test_synthetic_city_will_not_generate_into_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=str(tmp_path)):
        parse_checked(synthetic_city_config(tmp_path), "train")


def test_dataparser_entry_points_load_during_datamanager_import():
    # nerfstudio imports dataparser entry points while its datamanager module is half
    # imported; specs.py must not import anything that needs the datamanager.
    code = (
        "import nerfstudio.data.datamanagers.base_datamanager\n"
        "from nerfstudio.configs.dataparser_configs import all_dataparsers as d\n"
        "print(type(d['synthetic-city']).__name__, type(d['matrixcity']).__name__)\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        NERFSTUDIO_DATAPARSER_CONFIGS="synthetic-city=landmark_plugin.data.specs:synthetic_city,"
        "matrixcity=landmark_plugin.data.specs:matrixcity",
    )
    from importlib.metadata import entry_points

    if {"synthetic-city", "matrixcity"} <= set(entry_points(group="nerfstudio.dataparser_configs").names):
        env.pop("NERFSTUDIO_DATAPARSER_CONFIGS")  # installed: test the real entry points
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SyntheticCityDataParserConfig MatrixCityDataParserConfig" in result.stdout


# ---------------------------------------------------------------- matrixcity

AERIAL_SIZE, STREET_SIZE = (16, 12), (10, 10)
ANGLE_X = 0.75
ROAD = "small_city_road_down"  # a street capture folder name as MatrixCity has them


def aerial_pose_m(i: int) -> np.ndarray:
    """A camera 150 m up, tilted 45 degrees down, kilometres from the origin (MatrixCity-like)."""
    tilt = math.radians(45)
    c2w = np.eye(4)
    c2w[:3, :3] = [[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)], [0, math.sin(tilt), math.cos(tilt)]]
    c2w[:3, 3] = [-1200.0 + 40.0 * i, 800.0 + 25.0 * (i % 3), 150.0 + 5.0 * i]
    return c2w


def street_pose_m(i: int) -> np.ndarray:
    c2w = np.eye(4)
    c2w[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]  # level, looking along -x
    c2w[:3, 3] = [-1150.0 + 5.0 * i, 820.0, 2.0]
    return c2w


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:04d}.png"), rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def split_file(frames_folder: str, poses_m: list, size: tuple[int, int]) -> dict:
    """A MatrixCity pose/ split file: shared intrinsics, positions in 100 m, paths relative to the file."""
    fl = 0.5 * size[0] / math.tan(0.5 * ANGLE_X)
    frames = []
    for i, c2w in enumerate(poses_m):
        c2w = c2w.copy()
        c2w[:3, 3] /= 100.0
        frames.append({"file_path": f"../../{frames_folder}/{i:04d}.png", "transform_matrix": c2w.tolist()})
    return {
        "camera_angle_x": ANGLE_X, "fl_x": fl, "fl_y": fl, "k1": 0, "k2": 0, "p1": 0, "p2": 0,
        "cx": size[0] / 2, "cy": size[1] / 2, "w": float(size[0]), "h": float(size[1]), "frames": frames,
    }  # fmt: skip


def raw_capture_file(poses_m: list) -> dict:
    """A raw MatrixCity capture file: field of view only, rotation stored / 100, metres."""
    frames = []
    for i, c2w in enumerate(poses_m):
        raw = c2w.copy()
        raw[:3, :3] *= 0.01
        frames.append({"frame_index": i, "rot_mat": raw.tolist()})
    return {"camera_angle_x": ANGLE_X, "frames": frames}


def write_matrixcity(root: Path) -> Path:
    """A tiny map in MatrixCity's layout: aerial + street split files, one raw capture block, depth."""
    aerial_train = [aerial_pose_m(i) for i in range(4)]
    aerial_test = [aerial_pose_m(i + 10) for i in range(2)]
    street_train, street_test = [street_pose_m(i) for i in range(3)], [street_pose_m(10)]
    write_images(root / "aerial/train/block_1", 4, AERIAL_SIZE, 0)
    write_images(root / "aerial/test/block_1_test", 2, AERIAL_SIZE, 1)
    write_images(root / f"street/train/{ROAD}", 3, STREET_SIZE, 2)
    write_images(root / f"street/test/{ROAD}_test", 1, STREET_SIZE, 3)
    files = {
        "aerial/pose/block_A/transforms_train.json": split_file("train/block_1", aerial_train, AERIAL_SIZE),
        "aerial/pose/block_A/transforms_test.json": split_file("test/block_1_test", aerial_test, AERIAL_SIZE),
        "street/pose/block_A/transforms_train.json": split_file(f"train/{ROAD}", street_train, STREET_SIZE),
        "street/pose/block_A/transforms_test.json": split_file(f"test/{ROAD}_test", street_test, STREET_SIZE),
        "aerial/train/block_2/transforms.json": raw_capture_file(aerial_train[:3]),
        "aerial/test/block_2_test/transforms.json": raw_capture_file(aerial_test[:1]),
    }
    write_images(root / "aerial/train/block_2", 3, AERIAL_SIZE, 4)
    write_images(root / "aerial/test/block_2_test", 1, AERIAL_SIZE, 5)
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    depth_root = root.parent / f"{root.name}_depth"
    for folder, count in (("aerial/train/block_1", 4), ("aerial/test/block_1_test", 2)):
        target = depth_root / Path(folder).parent / f"{Path(folder).name}_depth"
        target.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(target / f"{i:04d}.npy", np.full((AERIAL_SIZE[1], AERIAL_SIZE[0]), 21000.0, np.float32))
    return root


@pytest.fixture()
def matrixcity_root(tmp_path) -> Path:
    return write_matrixcity(tmp_path / "small_city")


def test_matrixcity_split_files_scale_to_a_unit_box(matrixcity_root):
    config = MatrixCityDataParserConfig(data=matrixcity_root)
    train, test = parse_checked(config, "train"), parse_checked(config, "test")
    assert len(train.image_filenames) == 4 and len(test.image_filenames) == 2
    assert train.image_filenames[0] == matrixcity_root / "aerial/train/block_1/0000.png"
    # Train and test share one transform, which maps metres to a box of half-size 1.
    torch.testing.assert_close(train.dataparser_transform, test.dataparser_transform)
    assert train.dataparser_scale == test.dataparser_scale
    every = torch.cat([train.cameras.camera_to_worlds, test.cameras.camera_to_worlds])
    assert math.isclose(float(every[:, :, 3].abs().max()), 1.0, rel_tol=1e-5)
    original = train.transform_poses_to_original_space(train.cameras.camera_to_worlds, camera_convention="opengl")
    expected = torch.tensor(np.stack([aerial_pose_m(i) for i in range(4)])[:, :3, :4], dtype=torch.float32)
    torch.testing.assert_close(original, expected, atol=1e-2, rtol=1e-5)  # centimetres out of kilometres
    assert float(train.cameras.fx[0]) == pytest.approx(0.5 * AERIAL_SIZE[0] / math.tan(0.5 * ANGLE_X))


def test_matrixcity_aerial_and_street_together(matrixcity_root):
    config = MatrixCityDataParserConfig(data=matrixcity_root, views=("aerial", "street"))
    train = parse_checked(config, "train")
    assert len(train.image_filenames) == 4 + 3
    widths = train.cameras.width[:, 0].tolist()
    assert widths == [AERIAL_SIZE[0]] * 4 + [STREET_SIZE[0]] * 3
    assert len(parse_checked(config, "val").image_filenames) == 2 + 1


def test_matrixcity_raw_capture_block(matrixcity_root):
    config = MatrixCityDataParserConfig(data=matrixcity_root, blocks=("block_2",))
    train = parse_checked(config, "train")
    assert len(train.image_filenames) == 3
    rotation = train.cameras.camera_to_worlds[:, :3, :3]
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5, rtol=0)
    assert float(train.cameras.fx[0]) == pytest.approx(0.5 * AERIAL_SIZE[0] / math.tan(0.5 * ANGLE_X))
    assert int(train.cameras.height[0]) == AERIAL_SIZE[1]  # taken from the image header


def test_matrixcity_depth_and_points(matrixcity_root, tmp_path):
    points_m = np.array([[-1100.0, 900.0, 0.0], [-1000.0, 850.0, 30.0]], dtype=np.float32)
    write_points_ply(tmp_path / "points.ply", points_m, np.full((2, 3), 200, np.uint8))
    config = MatrixCityDataParserConfig(
        data=matrixcity_root,
        depth_root=matrixcity_root.parent / "small_city_depth",
        depth_extension=".npy",
        points_ply=tmp_path / "points.ply",
    )
    train = parse_checked(config, "train")
    depth_files = train.metadata["depth_filenames"]
    assert len(depth_files) == 4 and all(path.is_file() for path in depth_files)
    assert depth_files[0].parent.name == "block_1_depth"
    assert train.metadata["depth_unit_scale_factor"] == 0.01
    transform, scale = train.dataparser_transform, train.dataparser_scale
    expected = (torch.from_numpy(points_m) @ transform[:, :3].T + transform[:, 3]) * scale
    torch.testing.assert_close(train.metadata["points3D_xyz"], expected)


# ---------------------------------------------------------------- nerfstudio's colmap parser


def test_colmap_cup_through_parse_checked():
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    cup = shared_data("cup_colmap")
    config = ColmapDataParserConfig(data=cup, colmap_path=Path("sparse/0"), downscale_factor=4)
    train, test = parse_checked(config, "train"), parse_checked(config, "test")
    assert len(train.image_filenames) + len(test.image_filenames) == 77
    assert all(path.parent.name == "images_4" for path in train.image_filenames)
    assert {int(train.cameras.width[0]), int(train.cameras.height[0])} == {200, 150}
    assert train.metadata["points3D_xyz"].shape == (9262, 3)
