"""Bad input fails early, with one clear error naming the file and the problem.

`parse_checked` checks the input files a parser is about to read (transforms.json, COLMAP
folders: `check_parser_input`), runs the parser, turns what the parser raises on malformed
input into `InputError` (`parse_split`), and then checks its outputs (images exist and match
the intrinsics, poses are finite, the point cloud is usable: `check_outputs_of`).  The data
managers run the same three steps around nerfstudio's own parsing (data/checked.py), before
any GPU work starts.

Imports only dataparser-level nerfstudio modules: dataparser entry points are loaded while
nerfstudio's datamanager module is still importing.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from nerfstudio.cameras.cameras import CAMERA_MODEL_TO_TYPE
from nerfstudio.data.dataparsers.base_dataparser import DataParserConfig, DataparserOutputs
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.data.utils import colmap_parsing_utils as colmap_io

from landmark_plugin.errors import UserError

INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
SPLITS = ("train", "val", "test")
MAX_IMAGE_SIDE = 1 << 20


class InputError(UserError):
    """The input data is malformed; the message names the file and what is wrong with it."""


# Errors a parser raises on malformed input (never KeyboardInterrupt, MemoryError, ...).
_PARSE_ERRORS = (
    KeyError,
    IndexError,
    TypeError,
    ValueError,
    AssertionError,
    RuntimeError,
    OSError,
    ArithmeticError,  # e.g. nerfstudio's auto scale divides by zero when all cameras coincide
    struct.error,
    UnicodeDecodeError,
    AttributeError,
)


@contextlib.contextmanager
def input_errors(source: Path, what: str = "cannot parse") -> Iterator[None]:
    """Re-raise a parser's exception on malformed input as InputError naming `source`."""
    try:
        yield
    except InputError:
        raise
    except _PARSE_ERRORS as error:
        raise InputError(f"{source}: {what}: {type(error).__name__}: {error}") from error


def read_json(path: Path) -> Any:
    """Parsed JSON of `path`, or InputError naming it (missing, unreadable or malformed)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read: {error}") from error


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels; InputError if unreadable."""
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise InputError(f"{path}: unreadable image: {error}") from error


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def check_pose_matrix(matrix: Any, where: str, rows: Sequence[int] = (4,)) -> None:
    """A finite camera-to-world matrix (rows x 4) with an invertible rotation block."""
    if not isinstance(matrix, list) or len(matrix) not in rows:
        raise InputError(f"{where}: transform_matrix must be a list of {' or '.join(map(str, rows))} rows of 4 numbers")
    if not all(isinstance(row, list) and len(row) == 4 and all(_is_number(v) for v in row) for row in matrix):
        raise InputError(f"{where}: transform_matrix must hold rows of 4 numbers")
    if not all(is_finite_number(v) for row in matrix for v in row):
        raise InputError(f"{where}: transform_matrix has NaN or infinite entries")
    values = torch.tensor([[float(v) for v in row] for row in matrix], dtype=torch.float64)
    if abs(float(torch.linalg.det(values[:3, :3]))) < 1e-9:
        raise InputError(f"{where}: transform_matrix has a singular rotation block")
    # nerfstudio multiplies by the full 4x4, so a wrong last row silently distorts the pose.
    if len(matrix) == 4 and not torch.allclose(values[3], torch.tensor([0.0, 0, 0, 1], dtype=values.dtype), atol=1e-4):
        raise InputError(f"{where}: transform_matrix's last row must be [0, 0, 0, 1], got {matrix[3]}")


def _check_intrinsics(meta: dict, frames: list, path: Path) -> None:
    for key in INTRINSIC_KEYS:
        if key in meta:
            holders = [(meta, "top level")]
        else:
            missing = [i for i, frame in enumerate(frames) if key not in frame]
            if missing:
                raise InputError(f"{path}: '{key}' is missing (neither at top level nor in frame {missing[0]})")
            holders = [(frame, f"frame {i}") for i, frame in enumerate(frames)]
        for holder, where in holders:
            value = holder[key]
            if key in ("cx", "cy") and not is_finite_number(value):
                raise InputError(f"{path}: {where}: '{key}' must be a finite number, got {value!r}")
            if key not in ("cx", "cy") and not (is_finite_number(value) and value > 0):
                raise InputError(f"{path}: {where}: '{key}' must be a positive finite number, got {value!r}")
            if key in ("w", "h") and (float(value) != int(value) or value > MAX_IMAGE_SIDE):
                raise InputError(
                    f"{path}: {where}: '{key}' must be a whole number of pixels up to {MAX_IMAGE_SIDE}, got {value!r}"
                )


def _one_of(value: Any, names: Any) -> bool:
    return isinstance(value, str) and value in names


def _check_optional_frame_paths(frames: list, key: str, path: Path) -> None:
    present = [isinstance(frame.get(key), str) for frame in frames]
    if any(key in frame and not isinstance(frame[key], str) for frame in frames):
        raise InputError(f"{path}: '{key}' must be a string in every frame that has it")
    if any(present) and not all(present):
        raise InputError(f"{path}: '{key}' is given for some frames but not for frame {present.index(False)}")


def check_transforms_json(path: Path, config: Optional[NerfstudioDataParserConfig] = None) -> dict:
    """Validate a nerfstudio-data transforms.json and return its contents.

    Checks what nerfstudio's parser would otherwise trip over with an assertion, KeyError,
    ZeroDivisionError or a mysterious NaN: JSON syntax, frames with a file_path and a finite
    4x4 pose, complete intrinsics, a known camera model, consistent split lists, and, as far
    as `config` asks for them, the point cloud file and cameras spread out enough to scale.
    """
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise InputError(f"{path}: top level must be a JSON object")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InputError(f"{path}: 'frames' must be a non-empty list")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict):
            raise InputError(f"{path}: frame {i} must be an object")
        if not isinstance(frame.get("file_path"), str) or not frame["file_path"]:
            raise InputError(f"{path}: frame {i} has no 'file_path' string")
        if "transform_matrix" not in frame:
            raise InputError(f"{path}: frame {i} ({frame['file_path']}) has no 'transform_matrix'")
        check_pose_matrix(frame["transform_matrix"], f"{path}: frame {i} ({frame['file_path']})")
        for key in ("k1", "k2", "k3", "k4", "p1", "p2"):
            if key in frame and not is_finite_number(frame[key]):
                raise InputError(f"{path}: frame {i}: '{key}' must be a finite number")
    _check_intrinsics(meta, frames, path)
    for key in ("k1", "k2", "k3", "k4", "p1", "p2"):
        if key in meta and not is_finite_number(meta[key]):
            raise InputError(f"{path}: '{key}' must be a finite number")
    if "distortion_params" in meta or any("distortion_params" in f for f in frames):
        raise InputError(f"{path}: 'distortion_params' lists are not supported; give k1..k4, p1, p2")
    if "camera_model" in meta and not _one_of(meta["camera_model"], CAMERA_MODEL_TO_TYPE):
        raise InputError(f"{path}: unknown camera_model {meta['camera_model']!r}")
    for key in ("mask_path", "depth_file_path"):
        _check_optional_frame_paths(frames, key, path)

    names = {str(Path(frame["file_path"])) for frame in frames}
    listed = [split for split in SPLITS if f"{split}_filenames" in meta]
    for split in listed:
        value = meta[f"{split}_filenames"]
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            raise InputError(f"{path}: '{split}_filenames' must be a list of strings")
        unknown = [name for name in value if str(Path(name)) not in names]
        if unknown:
            raise InputError(f"{path}: '{split}_filenames' names {unknown[0]!r}, which is not a frame's file_path")
    if listed and len(listed) < len(SPLITS):
        missing = [split for split in SPLITS if split not in listed]
        raise InputError(f"{path}: has {listed[0]}_filenames but no {missing[0]}_filenames")
    for key in ("applied_transform",):
        if key in meta:
            check_pose_matrix(meta[key], f"{path}: '{key}'", rows=(3,))
    if "applied_scale" in meta and not (is_finite_number(meta["applied_scale"]) and meta["applied_scale"] > 0):
        raise InputError(f"{path}: 'applied_scale' must be a positive finite number")
    if "orientation_override" in meta and not _one_of(meta["orientation_override"], ("pca", "up", "vertical", "none")):
        raise InputError(f"{path}: unknown orientation_override {meta['orientation_override']!r}")
    if config is not None and config.auto_scale_poses:
        _check_camera_spread([frame["transform_matrix"] for frame in frames], config.center_method, path)
    if config is not None and config.load_3D_points and "ply_file_path" in meta:
        if not isinstance(meta["ply_file_path"], str):
            raise InputError(f"{path}: 'ply_file_path' must be a string")
        if not (path.parent / meta["ply_file_path"]).is_file():
            raise InputError(f"{path.parent / meta['ply_file_path']}: point cloud file not found (ply_file_path)")
    return meta


def _check_camera_spread(matrices: list, center_method: str, path: Path) -> None:
    """Auto scale divides by the largest camera offset; it must not be zero."""
    positions = torch.tensor([[float(row[3]) for row in matrix[:3]] for matrix in matrices], dtype=torch.float64)
    if center_method == "poses":
        positions = positions - positions.mean(0)
    if center_method != "focus" and float(positions.abs().max()) == 0.0:
        raise InputError(
            f"{path}: all cameras sit at one point, so auto_scale_poses has nothing to scale by "
            f"(center_method={center_method}); add views or turn auto_scale_poses off"
        )


def transforms_path(data: Path) -> Path:
    """The transforms.json a nerfstudio-data config reads (`data` may name the file itself)."""
    return data if data.suffix == ".json" else data / "transforms.json"


def _colmap_readers(folder: Path, with_points: bool) -> list[tuple[Path, Any]]:
    readers = []
    for stem, read_bin, read_txt in (
        ("cameras", colmap_io.read_cameras_binary, colmap_io.read_cameras_text),
        ("images", colmap_io.read_images_binary, colmap_io.read_images_text),
        ("points3D", colmap_io.read_points3D_binary, colmap_io.read_points3D_text),
    ):
        if stem == "points3D" and not with_points:
            continue
        if (folder / f"{stem}.bin").exists():
            readers.append((folder / f"{stem}.bin", read_bin))
        elif (folder / f"{stem}.txt").exists():
            readers.append((folder / f"{stem}.txt", read_txt))
        else:
            raise InputError(f"{folder}: COLMAP model has neither {stem}.bin nor {stem}.txt")
    return readers


def check_colmap_folder(config: ColmapDataParserConfig) -> None:
    """The COLMAP model folder and image folder a colmap config points at exist.

    Also refuses a missing images_<factor> folder, where nerfstudio would stop and ask on
    the terminal whether to create it.
    """
    if not config.data.is_dir():
        raise InputError(f"{config.data}: data folder not found")
    model = config.data / config.colmap_path
    if not model.is_dir():
        raise InputError(f"{model}: COLMAP model folder not found (colmap_path={config.colmap_path}; pass "
                         "--colmap-path with the folder of cameras.bin, images.bin, points3D.bin)")
    for file, _ in _colmap_readers(model, config.load_3D_points):
        if file.stat().st_size == 0:
            raise InputError(f"{file}: empty COLMAP file")
    images = config.data / config.images_path
    factor = config.downscale_factor
    if factor is not None and factor > 1:
        # nerfstudio reads only images_<factor> then; the full-size folder may be absent.
        scaled = images.parent / f"{images.name}_{factor}"
        if not scaled.is_dir():
            raise InputError(f"{scaled}: downscaled image folder not found (downscale_factor={factor})")
    elif not images.is_dir():
        raise InputError(f"{images}: image folder not found (images_path={config.images_path})")


def diagnose_colmap_failure(config: ColmapDataParserConfig, error: BaseException) -> InputError:
    """After the colmap parser failed: read each model file alone to name the unreadable one."""
    model = config.data / config.colmap_path
    for file, reader in _colmap_readers(model, config.load_3D_points):
        try:
            reader(str(file))
        except Exception as file_error:  # noqa: BLE001 -- any failure here means this file is bad
            return InputError(f"{file}: unreadable COLMAP file: {type(file_error).__name__}: {file_error}")
    return InputError(f"{model}: cannot parse COLMAP model: {type(error).__name__}: {error}")


def point_cloud_path(config: DataParserConfig) -> Optional[Path]:
    """The file a config's point cloud comes from, to name in errors; None if it has none."""
    if isinstance(config, ColmapDataParserConfig) and config.load_3D_points:
        model = config.data / config.colmap_path
        return model / "points3D.bin" if (model / "points3D.bin").exists() else model / "points3D.txt"
    if isinstance(config, NerfstudioDataParserConfig) and config.load_3D_points:
        path = transforms_path(config.data)
        with contextlib.suppress(InputError):
            meta = read_json(path)
            if isinstance(meta, dict) and isinstance(meta.get("ply_file_path"), str):
                return path.parent / meta["ply_file_path"]
        return None
    return getattr(config, "points_ply", None)


def check_dataparser_outputs(
    outputs: DataparserOutputs,
    split: str,
    points_source: Optional[Path] = None,
    data_source: Optional[Path] = None,
    images: bool = True,
) -> DataparserOutputs:
    """Images exist, are readable and match the cameras; poses are finite; points are usable.

    Image files are checked from their headers only (no pixel decode), so this stays cheap
    for thousands of images.  `points_source` and `data_source` name the point cloud file
    and the dataset in messages; `images=False` skips the image files.  Returns `outputs`
    unchanged.
    """
    cameras = outputs.cameras
    dataset = data_source or "dataset"
    if len(outputs.image_filenames) == 0:
        raise InputError(f"{dataset}: split '{split}' has no images")
    if len(outputs.image_filenames) != len(cameras):
        count = len(outputs.image_filenames)
        raise InputError(f"{dataset}: split '{split}' has {count} images but {len(cameras)} cameras")
    c2w = cameras.camera_to_worlds
    finite = torch.isfinite(c2w).flatten(1).all(-1)
    det = torch.linalg.det(torch.where(torch.isfinite(c2w[:, :3, :3]), c2w[:, :3, :3], 0.0).double())
    focal_ok = torch.isfinite(cameras.fx).flatten() & (cameras.fx.flatten() > 0) & (cameras.fy.flatten() > 0)
    for i, path in enumerate(outputs.image_filenames):
        path = Path(path)
        if not bool(finite[i]):
            raise InputError(f"{path}: camera pose has NaN or infinite entries ({split} split)")
        if abs(float(det[i])) < 1e-9:
            raise InputError(f"{path}: camera rotation is singular ({split} split)")
        if not bool(focal_ok[i]):
            raise InputError(f"{path}: camera focal length is not a positive finite number ({split} split)")
        if not images:
            continue
        width, height = image_size(path)
        want = (int(cameras.width[i].item()), int(cameras.height[i].item()))
        if (width, height) != want:
            raise InputError(
                f"{path}: image is {width}x{height} but its camera says {want[0]}x{want[1]} ({split} split)"
            )
    for kind, paths in (("mask", outputs.mask_filenames), ("depth", outputs.metadata.get("depth_filenames"))):
        for path in paths if images and paths else []:
            if not Path(path).is_file():
                raise InputError(f"{path}: {kind} file not found ({split} split)")
    xyz = outputs.metadata.get("points3D_xyz")
    if xyz is not None:
        source = points_source or "point cloud (metadata points3D_xyz)"
        if xyz.ndim != 2 or xyz.shape[0] == 0 or xyz.shape[-1] != 3:
            raise InputError(f"{source}: point cloud is empty or not [N, 3] (shape {tuple(xyz.shape)})")
        if not torch.isfinite(xyz).all():
            bad = int((~torch.isfinite(xyz)).any(-1).sum())
            raise InputError(f"{source}: point cloud has {bad} points with NaN or infinite coordinates")
        rgb = outputs.metadata.get("points3D_rgb")
        if rgb is not None and rgb.shape[0] != xyz.shape[0]:
            raise InputError(f"{source}: {xyz.shape[0]} points but {rgb.shape[0]} colours")
    return outputs


def check_parser_input(config: DataParserConfig) -> Path:
    """Check the files `config`'s parser is about to read; return the path to name in errors.

    transforms.json for nerfstudio-data, the model and image folders for COLMAP.  Parsers
    with ``checks_own_input`` (synthetic-city, matrixcity) check inside their parse instead.
    """
    if not isinstance(config, DataParserConfig):
        raise TypeError(f"expected a DataParserConfig, got {type(config).__name__}")
    own_checks = getattr(config._target, "checks_own_input", False)
    if isinstance(config, NerfstudioDataParserConfig) and not own_checks:
        check_transforms_json(transforms_path(config.data), config)
    if isinstance(config, ColmapDataParserConfig):
        check_colmap_folder(config)
    return transforms_path(config.data) if isinstance(config, NerfstudioDataParserConfig) else Path(config.data)


def is_parse_error(error: BaseException) -> bool:
    """Whether `error` is what a parser raises on malformed input (and not yet an InputError)."""
    return isinstance(error, _PARSE_ERRORS) and not isinstance(error, InputError)


def parse_failure(config: DataParserConfig, error: BaseException) -> InputError:
    """The InputError for `config`'s parser having raised `error` (e.g. nerfstudio's own
    assertion): names the input file, for COLMAP the model file that cannot be read."""
    if isinstance(config, ColmapDataParserConfig):
        return diagnose_colmap_failure(config, error)
    source = transforms_path(config.data) if isinstance(config, NerfstudioDataParserConfig) else config.data
    return InputError(f"{source}: cannot parse: {type(error).__name__}: {error}")


def parse_split(parser: Any, config: DataParserConfig, split: str) -> DataparserOutputs:
    """``parser.get_dataparser_outputs(split)`` with a parser failure raised as InputError."""
    try:
        return parser.get_dataparser_outputs(split=split)
    except _PARSE_ERRORS as error:
        if not is_parse_error(error):
            raise
        raise parse_failure(config, error) from error


def check_outputs_of(
    config: DataParserConfig, outputs: DataparserOutputs, split: str, images: bool = True
) -> DataparserOutputs:
    """`check_dataparser_outputs` with the config's point cloud and data named in messages.

    `images=False` skips the image files (poses and points are still checked): inference
    (ns-render, ns-viewer) needs the cameras, not the pictures.
    """
    points = point_cloud_path(config)
    if (
        isinstance(config, NerfstudioDataParserConfig)
        and config.load_3D_points
        and points is not None
        and "points3D_xyz" not in outputs.metadata
    ):
        raise InputError(f"{points}: point cloud has no points")
    source = transforms_path(config.data) if isinstance(config, NerfstudioDataParserConfig) else config.data
    return check_dataparser_outputs(outputs, split, points_source=points, data_source=source, images=images)


def parse_checked(config: DataParserConfig, split: str = "train") -> DataparserOutputs:
    """Run `config`'s parser for `split` with input checks before and output checks after.

    Everything wrong with the input surfaces as one InputError naming the file.
    """
    if not isinstance(config, DataParserConfig):
        raise TypeError(f"parse_checked needs a DataParserConfig, got {type(config).__name__}")
    check_parser_input(config)
    outputs = parse_split(config.setup(), config, split)
    return check_outputs_of(config, outputs, split)
