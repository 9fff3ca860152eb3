"""Every kind of broken input gives one InputError that names the broken file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import synthetic_city_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dataparsers import write_matrixcity

from landmark_plugin.data.matrixcity import MatrixCityDataParserConfig
from landmark_plugin.data.ply import write_points_ply
from landmark_plugin.data.validate import InputError, parse_checked


def fails_naming(path: Path, config, split: str = "train") -> InputError:
    with pytest.raises(InputError) as caught:
        parse_checked(config, split)
    assert str(path) in str(caught.value), f"message does not name {path}: {caught.value}"
    return caught.value


def edit_transforms(folder: Path, edit) -> Path:
    path = folder / "transforms.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))  # json writes NaN as the bare token NaN, as some tools do
    return path


def train_image(folder: Path, index: int = 1) -> Path:
    return folder / json.loads((folder / "transforms.json").read_text())["train_filenames"][index]


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("index", [0, 4], ids=["first-image", "later-image"])
def test_missing_image(tiny_city_copy, index):
    # nerfstudio opens the first image itself (auto downscale); later ones only we check.
    missing = tiny_city_copy / "images" / f"frame_{index:05d}.png"
    missing.unlink()
    fails_naming(missing, synthetic_city_config(tiny_city_copy))


def test_unreadable_image(tiny_city_copy):
    broken = train_image(tiny_city_copy)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    error = fails_naming(broken, synthetic_city_config(tiny_city_copy))
    assert "unreadable" in str(error)


def test_image_size_disagrees_with_intrinsics(tiny_city_copy):
    wrong = train_image(tiny_city_copy)
    cv2.imwrite(str(wrong), np.zeros((40, 50, 3), np.uint8))
    error = fails_naming(wrong, synthetic_city_config(tiny_city_copy))
    assert "50x40" in str(error) and "96x72" in str(error)


# ---------------------------------------------------------------- transforms.json


def test_malformed_transforms_json(tiny_city_copy):
    path = tiny_city_copy / "transforms.json"
    path.write_text(path.read_text()[:200])
    error = fails_naming(path, synthetic_city_config(tiny_city_copy))
    assert "malformed JSON" in str(error)


@pytest.mark.parametrize("key", ["transform_matrix", "file_path", "fl_x", "frames"])
def test_missing_key(tiny_city_copy, key):
    def drop(meta):
        holder = meta["frames"][2] if key in meta["frames"][2] else meta
        del holder[key]

    path = edit_transforms(tiny_city_copy, drop)
    error = fails_naming(path, synthetic_city_config(tiny_city_copy))
    assert key in str(error)


def test_nan_pose(tiny_city_copy):
    def poison(meta):
        meta["frames"][4]["transform_matrix"][0][3] = float("nan")

    path = edit_transforms(tiny_city_copy, poison)
    error = fails_naming(path, synthetic_city_config(tiny_city_copy))
    assert "NaN" in str(error) and "frame 4" in str(error)


def test_split_list_names_unknown_file(tiny_city_copy):
    path = edit_transforms(tiny_city_copy, lambda meta: meta["test_filenames"].append("images/nope.png"))
    fails_naming(path, synthetic_city_config(tiny_city_copy), "test")


def test_plain_nerfstudio_data_config_is_checked_too(tiny_city_copy):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    path = edit_transforms(tiny_city_copy, lambda meta: meta["frames"][0].pop("transform_matrix"))
    fails_naming(path, NerfstudioDataParserConfig(data=tiny_city_copy))


# ---------------------------------------------------------------- point clouds


def test_empty_point_cloud(tiny_city_copy):
    ply = tiny_city_copy / "sparse_pc.ply"
    write_points_ply(ply, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))
    fails_naming(ply, synthetic_city_config(tiny_city_copy))


def test_nan_point_cloud(tiny_city_copy):
    ply = tiny_city_copy / "sparse_pc.ply"
    xyz = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    xyz[7, 1] = np.nan
    write_points_ply(ply, xyz, np.zeros((20, 3), np.uint8))
    error = fails_naming(ply, synthetic_city_config(tiny_city_copy))
    assert "1 points" in str(error)


def test_missing_point_cloud_file(tiny_city_copy):
    ply = tiny_city_copy / "sparse_pc.ply"
    ply.unlink()
    fails_naming(ply, synthetic_city_config(tiny_city_copy))


# ---------------------------------------------------------------- COLMAP


def colmap_folder(root: Path) -> Path:
    """A one-image COLMAP dataset: images/a.png and sparse/0 with a valid cameras.bin."""
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_io

    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "a.png"), np.zeros((12, 16, 3), np.uint8))
    model = root / "sparse" / "0"
    model.mkdir(parents=True)
    camera = colmap_io.Camera(id=1, model="PINHOLE", width=16, height=12, params=np.array([20.0, 20.0, 8.0, 6.0]))
    colmap_io.write_cameras_binary({1: camera}, str(model / "cameras.bin"))
    return root


def colmap_config(root: Path):
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    return ColmapDataParserConfig(data=root, colmap_path=Path("sparse/0"))


def test_colmap_missing_sparse_folder(tmp_path):
    root = colmap_folder(tmp_path / "scene")
    for file in (root / "sparse" / "0").iterdir():
        file.unlink()
    (root / "sparse" / "0").rmdir()
    fails_naming(root / "sparse" / "0", colmap_config(root))


@pytest.mark.parametrize("broken", ["images.bin", "cameras.bin"])
def test_colmap_unreadable_model_file(tmp_path, broken):
    root = colmap_folder(tmp_path / "scene")
    model = root / "sparse" / "0"
    (model / "images.bin").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00garbage")
    (model / "points3D.bin").write_bytes(b"\x00" * 8)
    if broken == "cameras.bin":
        (model / "cameras.bin").write_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00\x07")
    error = fails_naming(model / broken, colmap_config(root))
    assert "unreadable COLMAP file" in str(error)


def test_colmap_missing_model_file(tmp_path):
    root = colmap_folder(tmp_path / "scene")
    fails_naming(root / "sparse" / "0", colmap_config(root))  # no images.bin / images.txt


def test_colmap_image_folders(tmp_path):
    """The image folder nerfstudio will read must exist: images/ at full size, images_<factor>/
    when downscaled (then images/ itself may be absent, as in datasets shipped pre-scaled)."""
    from landmark_plugin.data.validate import InputError, check_colmap_folder

    from nerfstudio.data.utils import colmap_parsing_utils as colmap_io

    root = colmap_folder(tmp_path / "scene")
    colmap_io.write_images_binary({}, str(root / "sparse" / "0" / "images.bin"))
    colmap_io.write_points3D_binary({}, str(root / "sparse" / "0" / "points3D.bin"))
    scaled = colmap_config(root)
    scaled.downscale_factor = 4
    with pytest.raises(InputError, match="images_4: downscaled image folder not found"):
        check_colmap_folder(scaled)
    (root / "images").rename(root / "images_4")
    check_colmap_folder(scaled)  # pre-scaled only: accepted
    with pytest.raises(InputError, match="images: image folder not found"):
        check_colmap_folder(colmap_config(root))


# ---------------------------------------------------------------- MatrixCity


def test_matrixcity_malformed_split_file(tmp_path):
    root = write_matrixcity(tmp_path / "small_city")
    path = root / "aerial/pose/block_A/transforms_test.json"
    path.write_text("{ not json")
    fails_naming(path, MatrixCityDataParserConfig(data=root), "test")


def test_matrixcity_frame_without_pose(tmp_path):
    root = write_matrixcity(tmp_path / "small_city")
    path = root / "aerial/pose/block_A/transforms_train.json"
    meta = json.loads(path.read_text())
    del meta["frames"][1]["transform_matrix"]
    path.write_text(json.dumps(meta))
    fails_naming(path, MatrixCityDataParserConfig(data=root))


def test_matrixcity_missing_block_and_missing_test_file(tmp_path):
    root = write_matrixcity(tmp_path / "small_city")
    fails_naming(root / "aerial/pose/block_Z", MatrixCityDataParserConfig(data=root, blocks=("block_Z",)))
    missing = root / "street/pose/block_A/transforms_test.json"
    missing.unlink()
    fails_naming(missing, MatrixCityDataParserConfig(data=root, views=("street",)))


def test_matrixcity_missing_image_and_depth(tmp_path):
    root = write_matrixcity(tmp_path / "small_city")
    image = root / "aerial/train/block_1/0002.png"
    image.unlink()
    fails_naming(image, MatrixCityDataParserConfig(data=root))
    depth = root.parent / "small_city_depth/aerial/test/block_1_test_depth/0001.npy"
    depth.unlink()
    config = MatrixCityDataParserConfig(data=root, depth_root=root.parent / "small_city_depth", depth_extension=".npy")
    fails_naming(depth, config, "test")


# ---------------------------------------------------------------- fuzz

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, 1, 72, 96, 48.0, -1.0]),
)
JUNK = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8), st.lists(NUMBERS, max_size=4))
ROW = st.one_of(st.lists(NUMBERS, min_size=4, max_size=4), st.just([0.0, 0.0, 0.0, 1.0]), JUNK)

def pose(x: float) -> list:
    return [[1.0, 0, 0, x], [0, 1.0, 0, 0], [0, 0, 1.0, 2.0], [0, 0, 0, 1.0]]


MATRIX = st.one_of(
    st.just(pose(0.0)),
    st.lists(ROW, min_size=3, max_size=5),
    JUNK,
)
DELETE = object()
FRAME_KEYS = ("file_path", "transform_matrix", "fl_x", "w", "h", "mask_path", "depth_file_path", "k1")
TOP_KEYS = (
    *("frames", "fl_x", "fl_y", "cx", "cy", "w", "h", "camera_model", "k1", "applied_transform", "applied_scale"),
    *("train_filenames", "val_filenames", "test_filenames", "ply_file_path", "orientation_override"),
)
VALUES = st.one_of(
    JUNK,
    MATRIX,
    st.sampled_from(["images/a.png", "images", "missing.png", "OPENCV", "up", 16, 12, 8.0]),
    st.lists(st.sampled_from(["images/a.png", "images/b.png", "x"]), max_size=2),
    st.just(DELETE),
)
MUTATION = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(TOP_KEYS), VALUES),
    st.tuples(st.just("frame"), st.sampled_from(FRAME_KEYS), VALUES),
    st.tuples(st.just("entry"), st.integers(0, 3), st.integers(0, 3), NUMBERS),
    st.tuples(st.just("copy-frame"), st.just(None), st.just(None)),
)


def valid_transforms() -> dict:
    """Two 16x12 images (images/a.png, images/b.png) with proper poses, intrinsics and split lists."""
    return {
        "fl_x": 20.0, "fl_y": 20.0, "cx": 8.0, "cy": 6.0, "w": 16, "h": 12, "camera_model": "OPENCV",
        "frames": [
            {"file_path": "images/a.png", "transform_matrix": pose(0.0)},
            {"file_path": "images/b.png", "transform_matrix": pose(1.0)},
        ],
        "train_filenames": ["images/a.png"], "val_filenames": ["images/b.png"], "test_filenames": ["images/b.png"],
    }  # fmt: skip


def mutated(mutations: list) -> dict:
    meta = valid_transforms()
    for kind, *args in mutations:
        frames = meta.get("frames")
        frame = frames[-1] if isinstance(frames, list) and frames and isinstance(frames[-1], dict) else None
        if kind == "copy-frame" and frame is not None:
            frames.append(json.loads(json.dumps(frame)))
        elif kind == "entry" and frame is not None and isinstance(frame.get("transform_matrix"), list):
            matrix = frame["transform_matrix"]
            row = matrix[min(args[0], len(matrix) - 1)] if matrix else None
            if isinstance(row, list) and row:
                row[min(args[1], len(row) - 1)] = args[2]
        elif kind in ("top", "frame"):
            holder = meta if kind == "top" else frame
            if holder is not None:
                if args[1] is DELETE:
                    holder.pop(args[0], None)
                else:
                    holder[args[0]] = args[1]
    return meta


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mutations=st.lists(MUTATION, max_size=4),
    junk=st.one_of(st.none(), st.none(), st.none(), JUNK),
    load_points=st.booleans(),
    text_noise=st.sampled_from(["", "", "", "", "", "}", "\x00"]),
)
def test_fuzzed_transforms_json_only_raises_input_error(tmp_path_factory, mutations, junk, load_points, text_noise):
    """Small edits of a valid transforms.json (and plain junk) give success or InputError, nothing else."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    meta = mutated(mutations) if junk is None else junk

    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "images").mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(folder / "images" / name), np.zeros((12, 16, 3), np.uint8))
    (folder / "transforms.json").write_text(json.dumps(meta) + text_noise)
    # Without points, so that nerfstudio's own parser never reaches open3d (an environment
    # matter, not an input one); the synthetic-city parser reads .ply itself.
    configs = [NerfstudioDataParserConfig(data=folder), synthetic_city_config(folder, load_3D_points=load_points)]
    for config in configs:
        for split in ("train", "test"):
            try:
                parse_checked(config, split)
            except InputError:
                pass


def test_colmap_model_found_in_sparse_0(tmp_path):
    """nerfstudio's default colmap_path (colmap/sparse/0) is absent: the data managers read
    sparse/0, COLMAP's own layout (the README's command works as written)."""
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    from landmark_plugin.data.checked import find_colmap_model

    root = colmap_folder(tmp_path / "scene")
    config = ColmapDataParserConfig(data=root)
    find_colmap_model(config)
    assert config.colmap_path == Path("sparse/0")
    explicit = ColmapDataParserConfig(data=root, colmap_path=Path("elsewhere"))
    find_colmap_model(explicit)
    assert explicit.colmap_path == Path("elsewhere"), "a path the user gave is never replaced"
    (root / "colmap" / "sparse" / "0").mkdir(parents=True)
    config = ColmapDataParserConfig(data=root)
    find_colmap_model(config)
    assert config.colmap_path == Path("colmap/sparse/0"), "nerfstudio's default is kept where it exists"
    (root / "sparse" / "0" / "cameras.bin").unlink()
    (root / "sparse" / "0").rmdir()
    (root / "colmap" / "sparse" / "0").rmdir()
    error = fails_naming(root / "colmap" / "sparse" / "0", ColmapDataParserConfig(data=root))
    assert "--colmap-path" in str(error)
