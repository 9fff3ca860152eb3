"""`matrixcity` dataparser: MatrixCity's aerial and street captures, one or several blocks.

MatrixCity (city-super/MatrixCity) ships two kinds of pose file per view (aerial/, street/):

- split files `<view>/pose/<block>/transforms_{train,test}.json` (the paper's splits): top-level
  camera_angle_x, fl_x, fl_y, cx, cy, w, h; frames with `file_path` (relative to the file,
  e.g. ../../train/block_1/0000.png) and `transform_matrix` (camera-to-world, OpenGL/NeRF
  axes, orthonormal rotation, positions in units of 100 m);
- raw capture files `<view>/train/<block>/transforms.json` and `<view>/test/<block>_test/...`:
  camera_angle_x; frames with `frame_index` (image <block>/<index:04d>.png) and `rot_mat`
  (rotation stored scaled by 1/100, positions in metres).

Both are read into metres, then oriented, centred and scaled into a unit box over all
frames of both splits (so train and test share one transform), which is recorded as the
dataparser transform and scale, as nerfstudio does.  Depth (EXR, centimetres) is optional.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional, Tuple, Type

import numpy as np
import torch

from nerfstudio.cameras import camera_utils
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox

from landmark_plugin.data.ply import read_points_ply
from landmark_plugin.data.validate import (
    MAX_IMAGE_SIDE,
    InputError,
    check_pose_matrix,
    image_size,
    input_errors,
    is_finite_number,
    read_json,
)


@dataclass(frozen=True)
class PosedImage:
    """One MatrixCity frame: image, camera-to-world in metres (OpenGL axes), pinhole intrinsics."""

    image: Path
    camera_to_world: np.ndarray
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    depth: Optional[Path] = None


def find_split_files(data: Path, view: str, block: str) -> Tuple[Path, Path]:
    """(train file, test file) of one block of one view, in MatrixCity's split or raw layout."""
    candidates = [
        (data / view / "pose" / block / "transforms_train.json", data / view / "pose" / block / "transforms_test.json"),
        (data / view / block / "transforms_train.json", data / view / block / "transforms_test.json"),
        (data / view / "train" / block / "transforms.json", data / view / "test" / f"{block}_test" / "transforms.json"),
    ]
    for train, test in candidates:
        if train.is_file():
            if not test.is_file():
                raise InputError(f"{test}: test split file not found (train split is {train})")
            return train, test
    raise InputError(
        f"{candidates[0][0]}: MatrixCity split file not found for view '{view}', block '{block}' "
        f"(also looked for {candidates[1][0]} and {candidates[2][0]})"
    )


def _number(holder: dict, key: str, where: str) -> Optional[float]:
    value = holder.get(key)
    if value is None:
        return None
    if not is_finite_number(value):
        raise InputError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _frame_pose(frame: dict, where: str, pose_unit_m: float) -> np.ndarray:
    """Camera-to-world in metres from a split-file or raw-capture frame."""
    if "transform_matrix" in frame:
        check_pose_matrix(frame["transform_matrix"], where)
        c2w = np.array(frame["transform_matrix"], dtype=np.float64)
        c2w[:3, 3] *= pose_unit_m
        return c2w
    if "rot_mat" in frame:
        matrix = frame["rot_mat"]
        if isinstance(matrix, list) and len(matrix) == 4 and isinstance(matrix[3], list):
            matrix = matrix[:3] + [[0.0, 0.0, 0.0, 1.0]]  # some raw files store junk in the last row
        check_pose_matrix(matrix, where)
        c2w = np.array(matrix, dtype=np.float64)
        # Raw files store the rotation scaled by 1/100 (not always): normalise each column.
        c2w[:3, :3] /= np.linalg.norm(c2w[:3, :3], axis=0, keepdims=True)
        return c2w
    raise InputError(f"{where}: frame has neither 'transform_matrix' nor 'rot_mat'")


def _frame_image(frame: dict, folder: Path, where: str) -> Path:
    if isinstance(frame.get("file_path"), str) and frame["file_path"]:
        return Path(os.path.normpath(folder / frame["file_path"]))
    index = frame.get("frame_index")
    if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
        return folder / f"{index:04d}.png"
    raise InputError(f"{where}: frame has neither a 'file_path' string nor a 'frame_index'")


def _intrinsics(meta: dict, frame: dict, image: Path, where: str) -> Tuple[float, float, float, float, int, int]:
    def pick(key: str) -> Optional[float]:
        value = _number(frame, key, where)
        return value if value is not None else _number(meta, key, where)

    width, height = pick("w"), pick("h")
    if width is None or height is None:
        width, height = image_size(image)  # raw capture files give only the field of view
    fx, fy = pick("fl_x"), pick("fl_y")
    if fx is None:
        angle = pick("camera_angle_x")
        if angle is None or not 0 < angle < math.pi:
            raise InputError(f"{where}: needs 'fl_x' or a 'camera_angle_x' in (0, pi)")
        fx = 0.5 * width / math.tan(0.5 * angle)
    fy = fx if fy is None else fy
    cx, cy = pick("cx"), pick("cy")
    cx = width / 2 if cx is None else cx
    cy = height / 2 if cy is None else cy
    if min(fx, fy, width, height) <= 0 or max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(f"{where}: focal lengths and image size must be positive (size at most {MAX_IMAGE_SIDE})")
    return fx, fy, cx, cy, int(width), int(height)


def depth_path(image: Path, data: Path, depth_root: Path, extension: str) -> Path:
    """MatrixCity's depth layout: <data>/<rel>/<folder>/<n>.png -> <depth_root>/<rel>/<folder>_depth/<n><ext>."""
    try:
        relative = image.relative_to(Path(os.path.normpath(data)))
    except ValueError as error:
        raise InputError(f"{image}: image lies outside {data}, so its depth file cannot be located") from error
    return depth_root / relative.parent.parent / f"{relative.parent.name}_depth" / f"{relative.stem}{extension}"


def read_split_file(path: Path, pose_unit_m: float) -> List[PosedImage]:
    """Frames of one MatrixCity pose file (split or raw layout), poses in metres."""
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise InputError(f"{path}: expected an object with a non-empty 'frames' list")
    frames, intrinsics_cache = [], {}
    for i, frame in enumerate(meta["frames"]):
        where = f"{path}: frame {i}"
        if not isinstance(frame, dict):
            raise InputError(f"{where}: must be an object")
        image = _frame_image(frame, path.parent, where)
        c2w = _frame_pose(frame, where, pose_unit_m)
        # Intrinsics are shared by a file's frames unless a frame overrides them; reading the
        # image header once per file keeps raw capture files (fov only) cheap.
        own = any(key in frame for key in ("w", "h", "fl_x", "fl_y", "cx", "cy", "camera_angle_x"))
        if own or "shared" not in intrinsics_cache:
            values = _intrinsics(meta, frame, image, where)
            if not own:
                intrinsics_cache["shared"] = values
        else:
            values = intrinsics_cache["shared"]
        frames.append(PosedImage(image, c2w, *values))
    return frames


@dataclass
class MatrixCityDataParserConfig(DataParserConfig):
    """MatrixCity blocks (aerial and/or street) from their pose files."""

    _target: Type = field(default_factory=lambda: MatrixCity)
    """target class to instantiate"""
    data: Path = Path("data/matrixcity/small_city")
    """One MatrixCity map: the folder that holds aerial/ and street/ (e.g. MatrixCity/small_city)."""
    views: Tuple[str, ...] = ("aerial",)
    """Capture subsets to load, as folders under data: aerial, street, or both."""
    blocks: Tuple[str, ...] = ("block_A",)
    """Blocks to load from every view: pose/ split names (block_A, block_all, ...) or raw blocks (block_1, ...)."""
    pose_unit_m: float = 100.0
    """Metres per unit of split-file positions (MatrixCity's pose/ files use 100 m; raw files are in metres)."""
    orientation_method: Literal["pca", "up", "vertical", "none"] = "none"
    """MatrixCity's world is already z-up; 'up' would tilt it, since aerial cameras all look down one way."""
    center_method: Literal["poses", "focus", "none"] = "poses"
    """How to centre the cameras before scaling."""
    auto_scale_poses: bool = True
    """Scale so that all camera positions fit in [-1, 1] (kilometres of city -> a unit box)."""
    scale_factor: float = 1.0
    """Extra scale applied after the automatic one."""
    scene_scale: float = 1.0
    """Half-size of the scene box around the origin, after scaling."""
    depth_root: Optional[Path] = None
    """MatrixCity's depth tree for this map (e.g. MatrixCity/small_city_depth); None loads no depth."""
    depth_extension: str = ".exr"
    """File extension of the depth maps under depth_root."""
    depth_unit_scale_factor: float = 0.01
    """Metres per depth unit (MatrixCity depth is in centimetres)."""
    points_ply: Optional[Path] = None
    """Optional initial point cloud (.ply, x y z in metres in MatrixCity's world frame, optional colours)."""


class MatrixCity(DataParser):
    """Reads the selected blocks' train and test files; val is the test split."""

    config: MatrixCityDataParserConfig
    checks_own_input = True
    """Raises InputError itself, naming the file."""

    def _read_frames(self) -> Tuple[List[PosedImage], List[PosedImage]]:
        if not self.config.data.is_dir():
            raise InputError(f"{self.config.data}: MatrixCity folder not found")
        if not self.config.views or not self.config.blocks:
            raise InputError(f"{self.config.data}: choose at least one view and one block")
        train, test = [], []
        for view in self.config.views:
            for block in self.config.blocks:
                train_file, test_file = find_split_files(self.config.data, view, block)
                train += read_split_file(train_file, self.config.pose_unit_m)
                test += read_split_file(test_file, self.config.pose_unit_m)
        return train, test

    def _with_depth(self, frames: List[PosedImage]) -> List[PosedImage]:
        if self.config.depth_root is None:
            return frames
        out = []
        for frame in frames:
            path = depth_path(frame.image, self.config.data, self.config.depth_root, self.config.depth_extension)
            if not path.is_file():
                raise InputError(f"{path}: depth file not found (for {frame.image})")
            out.append(PosedImage(**{**frame.__dict__, "depth": path}))
        return out

    def _load_points(self, transform: torch.Tensor, scale: float) -> dict:
        path = self.config.points_ply
        if path is None:
            return {}
        if not path.is_file():
            raise InputError(f"{path}: point cloud file not found (points_ply)")
        with input_errors(path, "cannot read point cloud"):
            xyz, rgb = read_points_ply(path)
        if len(xyz) == 0:
            raise InputError(f"{path}: point cloud has no points")
        homogeneous = torch.cat([torch.from_numpy(xyz), torch.ones(len(xyz), 1)], dim=-1)
        return {"points3D_xyz": (homogeneous @ transform.T) * scale, "points3D_rgb": torch.from_numpy(rgb)}

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs: Any) -> DataparserOutputs:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}")
        train, test = self._read_frames()
        frames = self._with_depth(train if split == "train" else test)
        every_pose = torch.from_numpy(np.stack([f.camera_to_world for f in train + test]).astype(np.float32))
        _, transform = camera_utils.auto_orient_and_center_poses(
            every_pose, method=self.config.orientation_method, center_method=self.config.center_method
        )
        positions = (transform[:, :3] @ every_pose[:, :3, 3:] + transform[:, 3:])[..., 0]
        scale = self.config.scale_factor
        if self.config.auto_scale_poses:
            extent = float(positions.abs().max())
            scale /= extent if extent > 0 else 1.0

        poses = torch.from_numpy(np.stack([f.camera_to_world for f in frames]).astype(np.float32))
        poses = transform @ poses
        poses[:, :3, 3] *= scale

        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(f, name) for f in frames], dtype=dtype)[:, None]

        cameras = Cameras(
            camera_to_worlds=poses[:, :3, :4],
            fx=column("fx", torch.float32),
            fy=column("fy", torch.float32),
            cx=column("cx", torch.float32),
            cy=column("cy", torch.float32),
            width=column("width", torch.int32),
            height=column("height", torch.int32),
            camera_type=CameraType.PERSPECTIVE,
        )
        box = self.config.scene_scale
        has_depth = self.config.depth_root is not None
        return DataparserOutputs(
            image_filenames=[f.image for f in frames],
            cameras=cameras,
            scene_box=SceneBox(aabb=torch.tensor([[-box] * 3, [box] * 3], dtype=torch.float32)),
            dataparser_transform=transform,
            dataparser_scale=scale,
            metadata={
                "depth_filenames": [f.depth for f in frames] if has_depth else None,
                "depth_unit_scale_factor": self.config.depth_unit_scale_factor,
                **self._load_points(transform, scale),
            },
        )
