"""The `synthetic-city` scene: a procedural city, its cameras, and a nerfstudio-data writer.

A street grid of city blocks; each block is cut into lots, and each lot holds one textured
box building (or is a small park).  Images are ray cast analytically in numpy
(`city_render.py`), so the scene is exact, deterministic from a seed, and any size.

World frame: metres-free "city units", z up, ground at z = 0, city centred on the origin.
Camera frame: OpenGL / nerfstudio (x right, y up, looking down -z).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
from jaxtyping import Bool, Float

from landmark_plugin.data.city_render import CityLayout, ImageAppearance, render_view, sample_points
from landmark_plugin.data.ply import write_points_ply

__all__ = [
    "CityConfig",
    "CityCameras",
    "CityLayout",
    "ImageAppearance",
    "look_at",
    "make_appearances",
    "make_layout",
    "make_cameras",
    "render_view",
    "sample_points",
    "write_city",
    "split_names",
    "transforms_json",
]

# Independent random streams, so that e.g. asking for more images never moves a building.
_LAYOUT_STREAM, _CAMERA_STREAM, _POINTS_STREAM, _APPEARANCE_STREAM = 0, 1, 2, 3


@dataclass(frozen=True)
class CityConfig:
    """Everything that defines a synthetic city dataset; the same config gives the same bytes."""

    seed: int = 0
    """Random seed for layout, cameras and point cloud."""
    blocks: Tuple[int, int] = (3, 3)
    """Number of city blocks along x and y (streets run between and around them)."""
    lots_per_block: Tuple[int, int] = (2, 2)
    """Lots per block along x and y; each lot holds one building or a park."""
    lot_size: float = 0.5
    """Side of a square lot, in city units."""
    street_width: float = 0.3
    """Width of every street, kerb to kerb."""
    pavement_width: float = 0.06
    """Width of the pavement ring around each block."""
    height_range: Tuple[float, float] = (0.25, 1.5)
    """Lowest and highest building height; buildings near the centre tend to be taller."""
    park_fraction: float = 0.1
    """Fraction of lots left empty as parks."""
    num_images: int = 48
    """Number of posed images (aerial and street level together)."""
    width: int = 160
    """Image width in pixels."""
    height: int = 120
    """Image height in pixels."""
    fov_deg: float = 60.0
    """Horizontal field of view in degrees."""
    street_fraction: float = 0.25
    """Fraction of images taken at street level; the rest orbit above the city."""
    num_points: int = 4000
    """Number of points in the sparse point cloud (sparse_pc.ply)."""
    test_every: int = 8
    """Every test_every-th image (0, test_every, ...) is a test image; the others train."""
    vary_appearance: bool = False
    """Light and camera response change from image to image, as over a capture taken across a
    day: each image gets a time of day (the sun's direction and colour, the skylight's colour),
    an exposure (x0.5 to x1.6) and a white balance (red and blue gains, about +-15 %), drawn from
    the seed.  Geometry, albedos and the point cloud stay those of the fixed light;
    transforms.json records every image's values under "appearance"."""

    def __post_init__(self) -> None:
        # Fail at construction, not half-way through writing a dataset.
        if min(self.blocks) < 1 or min(self.lots_per_block) < 1:
            raise ValueError(f"blocks and lots_per_block must be >= 1, got {self.blocks}, {self.lots_per_block}")
        if not 0.0 < self.height_range[0] <= self.height_range[1]:
            raise ValueError(f"height_range must be 0 < low <= high, got {self.height_range}")
        if min(self.lot_size, self.street_width) <= 0 or self.pavement_width < 0:
            raise ValueError("lot_size and street_width must be > 0 and pavement_width >= 0")
        if self.num_images < 1 or self.width < 8 or self.height < 8 or self.num_points < 0:
            raise ValueError("need num_images >= 1, an image of at least 8x8 and num_points >= 0")
        if not 0.0 < self.fov_deg < 170.0:
            raise ValueError(f"fov_deg must be in (0, 170), got {self.fov_deg}")
        if not 0.0 <= self.street_fraction <= 1.0 or not 0.0 <= self.park_fraction < 1.0:
            raise ValueError("street_fraction must be in [0, 1] and park_fraction in [0, 1)")
        if self.test_every < 2:
            raise ValueError(f"test_every must be >= 2 so that some images train, got {self.test_every}")


def _rng(config: CityConfig, stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, stream])


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> Float[np.ndarray, "n 3"]:
    """Vectorised HSV -> RGB, all inputs in [0, 1]."""
    k = np.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], axis=-1)
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def make_layout(config: CityConfig) -> CityLayout:
    """Street grid, lots, buildings and their materials, drawn from the config's seed."""
    rng = _rng(config, _LAYOUT_STREAM)
    (bx, by), (lx, ly) = config.blocks, config.lots_per_block
    pitch = np.array([lx, ly]) * config.lot_size + 2 * config.pavement_width + config.street_width
    size = np.array([bx, by]) * pitch + config.street_width
    city_min = -size / 2

    # Lot (i, j) in lot-grid coordinates -> its south-west corner in the world.
    nx, ny = bx * lx, by * ly
    li, lj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    li, lj = li.ravel(), lj.ravel()
    kerb = config.street_width + config.pavement_width
    corner = np.stack(
        [
            city_min[0] + (li // lx) * pitch[0] + kerb + (li % lx) * config.lot_size,
            city_min[1] + (lj // ly) * pitch[1] + kerb + (lj % ly) * config.lot_size,
        ],
        axis=-1,
    )
    is_park = rng.random(nx * ny) < config.park_fraction

    n = nx * ny
    setback = rng.uniform(0.04, 0.14, size=(n, 4)) * config.lot_size  # west, south, east, north
    centrality = 1.0 - np.linalg.norm((corner + config.lot_size / 2) / (size / 2), axis=-1) / math.sqrt(2)
    low, high = config.height_range
    height = low + (high - low) * rng.random(n) * (0.45 + 0.55 * np.clip(centrality, 0, 1))
    box_min = np.stack([corner[:, 0] + setback[:, 0], corner[:, 1] + setback[:, 1], np.zeros(n)], axis=-1)
    box_max = np.stack(
        [corner[:, 0] + config.lot_size - setback[:, 2], corner[:, 1] + config.lot_size - setback[:, 3], height],
        axis=-1,
    )
    facade = _hsv_to_rgb(rng.random(n), rng.uniform(0.12, 0.45, n), rng.uniform(0.55, 0.85, n))
    roof_grey = rng.uniform(0.32, 0.6, n)
    roof = np.clip(roof_grey[:, None] + rng.uniform(-0.04, 0.04, (n, 3)), 0, 1)
    floor_height = rng.uniform(0.055, 0.085, n)
    window_pitch = rng.uniform(0.045, 0.08, n)

    keep = ~is_park
    margin = 0.5 * size  # outskirts around the grid, so that oblique views still see ground
    sun = np.array([0.45, 0.25, 0.86])
    return CityLayout(
        box_min=box_min[keep],
        box_max=box_max[keep],
        facade_rgb=facade[keep],
        roof_rgb=roof[keep],
        floor_height=floor_height[keep],
        window_pitch=window_pitch[keep],
        park_grid=is_park.reshape(nx, ny),
        city_min=city_min,
        city_max=-city_min,
        ground_min=city_min - margin,
        ground_max=-city_min + margin,
        block_pitch=pitch,
        lots_per_block=np.array([lx, ly]),
        lot_size=config.lot_size,
        street_width=config.street_width,
        pavement_width=config.pavement_width,
        sun_dir=sun / np.linalg.norm(sun),
    )


@dataclass(frozen=True, eq=False)
class CityCameras:
    """Pinhole cameras with shared intrinsics; poses are OpenGL camera-to-world matrices."""

    camera_to_worlds: Float[np.ndarray, "n 4 4"]
    is_street: Bool[np.ndarray, " n"]
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @property
    def intrinsics(self) -> Float[np.ndarray, "3 3"]:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]])


def look_at(eye: Float[np.ndarray, "3"], target: Float[np.ndarray, "3"]) -> Float[np.ndarray, "4 4"]:
    """OpenGL camera-to-world pose at `eye` looking at `target`, world z up (never straight down)."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right = right / np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, eye
    return c2w


def _aerial_poses(layout: CityLayout, config: CityConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Views from above: several elevations, golden-angle azimuths, targets spread over the city.

    The distance is capped at ~2.5 blocks of footprint so that big cities get many local
    views (like a survey flight) rather than a few that see everything at low resolution.
    """
    half = layout.city_max
    view_radius = min(float(np.linalg.norm(half)), 2.5 * float(layout.block_pitch.max()))
    tan_half_fov = math.tan(math.radians(config.fov_deg) / 2)
    spread = np.clip(1.0 - view_radius / half, 0.0, 1.0) * half + 0.15 * half
    mean_height = float(np.mean(config.height_range))
    poses = []
    for i in range(n):
        elevation = math.radians([38.0, 52.0, 66.0][i % 3] + rng.uniform(-5, 5))
        azimuth = i * math.pi * (3 - math.sqrt(5)) + rng.uniform(-0.2, 0.2)
        target = np.array([*rng.uniform(-spread, spread), rng.uniform(0.1, 0.5) * mean_height])
        distance = view_radius / tan_half_fov * rng.uniform(0.75, 1.1)
        # Small cities of tall towers: stay above the roofs (the ray caster assumes outside views).
        distance = max(distance, (1.25 * config.height_range[1] - target[2]) / math.sin(elevation))
        ground = math.cos(elevation)
        offset = np.array([ground * math.cos(azimuth), ground * math.sin(azimuth), math.sin(elevation)])
        poses.append(look_at(target + distance * offset, target))
    return np.stack(poses) if poses else np.zeros((0, 4, 4))


def _street_poses(layout: CityLayout, config: CityConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Eye-level views from inside the streets, looking along the street towards its far end."""
    poses = []
    for _ in range(n):
        axis = int(rng.integers(2))  # 0: street running along x, 1: along y
        cross_axis = 1 - axis
        k = int(rng.integers(config.blocks[cross_axis] + 1))  # which of the parallel streets
        eye = np.zeros(3)
        eye[cross_axis] = (
            layout.city_min[cross_axis]
            + k * layout.block_pitch[cross_axis]
            + config.street_width * (0.5 + rng.uniform(-0.3, 0.3))
        )
        eye[axis] = 0.8 * rng.uniform(layout.city_min[axis], layout.city_max[axis])
        eye[2] = rng.uniform(0.035, 0.08)
        sign = -1.0 if eye[axis] > 0 else 1.0  # look towards the far end of the street
        # Turn towards the centre line of the city: on an outer street the other side is fields.
        inward = -1.0 if eye[cross_axis] > 0 else 1.0
        yaw = inward * math.radians(rng.uniform(5, 35))
        pitch = math.radians(rng.uniform(6, 22))
        direction = np.zeros(3)
        direction[axis] = sign * math.cos(yaw)
        direction[cross_axis] = math.sin(yaw)
        direction[:2] *= math.cos(pitch)
        direction[2] = math.sin(pitch)
        poses.append(look_at(eye, eye + direction))
    return np.stack(poses) if poses else np.zeros((0, 4, 4))


def make_appearances(config: CityConfig) -> List[Optional[ImageAppearance]]:
    """Every image's light and camera gain (``vary_appearance``), or None each (the fixed light).

    Four draws per image from their own stream, in image order, so more images never change the
    first ones: a time of day t (dawn 0 .. dusk 1; the sun rises in +x, passes -y at 8..60
    degrees of elevation and sets in -x, warmer and weaker when low), an exposure in stops and
    the red and blue white-balance gains.
    """
    if not config.vary_appearance:
        return [None] * config.num_images
    rng = _rng(config, _APPEARANCE_STREAM)
    out = []
    for _ in range(config.num_images):
        t, stops, log_red, log_blue = rng.random(), rng.uniform(-1.0, 0.7), rng.normal(0.0, 0.08), rng.normal(0.0, 0.08)
        elevation, azimuth = math.radians(8.0 + 52.0 * math.sin(math.pi * t)), -math.pi * t
        high = math.sin(elevation) / math.sin(math.radians(60.0))  # 0.16 at dawn, 1 at noon
        warm = 1.0 - high
        out.append(
            ImageAppearance(
                sun_dir=np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                                  math.sin(elevation)]),
                sun_rgb=(0.55 + 0.45 * high) * np.array([1.0, 1.0 - 0.25 * warm, 1.0 - 0.55 * warm]),
                sky_rgb=np.array([1.0 - 0.05 * warm, 1.0 - 0.1 * warm, 1.0 - 0.25 * warm]) * (0.8 + 0.2 * high),
                gain=2.0**stops * np.array([math.exp(log_red), 1.0, math.exp(log_blue)]),
            )
        )
    return out


def make_cameras(config: CityConfig, layout: CityLayout) -> CityCameras:
    """Aerial and street-level cameras, interleaved so that the test split holds both kinds."""
    rng = _rng(config, _CAMERA_STREAM)
    n = config.num_images
    # Spread the street views evenly through the sequence (Bresenham-style).
    is_street = np.floor((np.arange(n) + 1) * config.street_fraction) > np.floor(np.arange(n) * config.street_fraction)
    aerial = _aerial_poses(layout, config, int((~is_street).sum()), rng)
    street = _street_poses(layout, config, int(is_street.sum()), rng)
    c2w = np.zeros((n, 4, 4))
    c2w[~is_street], c2w[is_street] = aerial, street
    focal = 0.5 * config.width / math.tan(math.radians(config.fov_deg) / 2)
    return CityCameras(
        camera_to_worlds=c2w,
        is_street=is_street,
        fx=focal,
        fy=focal,
        cx=config.width / 2,
        cy=config.height / 2,
        width=config.width,
        height=config.height,
    )


def split_names(names: list, test_every: int) -> Tuple[list, list]:
    """(train, test): every test_every-th name, starting with the first, is a test name."""
    test = [name for i, name in enumerate(names) if i % test_every == 0]
    train = [name for i, name in enumerate(names) if i % test_every != 0]
    return train, test


def write_city(
    out_dir: Path,
    config: CityConfig = CityConfig(),
    on_image: Optional[Callable[[int, int], None]] = None,
    workers: int = 1,
) -> Path:
    """Render the city into `out_dir` as a nerfstudio-data dataset and return `out_dir`.

    Writes images/frame_XXXXX.png, sparse_pc.ply and transforms.json (explicit
    train/val/test filename lists; val = test).  `on_image(done, total)` reports progress.
    `workers` > 1 renders the images in that many forked processes (the same bytes: every
    image depends on the config alone).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    layout = make_layout(config)
    cameras = make_cameras(config, layout)
    appearances = make_appearances(config)
    names = [f"images/frame_{i:05d}.png" for i in range(config.num_images)]
    write = functools.partial(_write_view, out_dir, layout, cameras, appearances)
    if workers > 1:
        # fork: the workers start at once, with everything imported
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            chunk = max(1, config.num_images // (4 * workers))
            for done, _ in enumerate(pool.map(write, range(config.num_images), names, chunksize=chunk), 1):
                if on_image is not None:
                    on_image(done, config.num_images)
    else:
        for i, name in enumerate(names):
            write(i, name)
            if on_image is not None:
                on_image(i + 1, config.num_images)

    xyz, point_rgb = sample_points(layout, config.num_points, _rng(config, _POINTS_STREAM))
    write_points_ply(out_dir / "sparse_pc.ply", xyz, point_rgb)
    (out_dir / "transforms.json").write_text(json.dumps(transforms_json(config, cameras, names), indent=2))
    return out_dir


def _write_view(
    out_dir: Path, layout: CityLayout, cameras: CityCameras, appearances: List[Optional[ImageAppearance]], index: int,
    name: str,
) -> None:
    """Ray cast camera `index` under its appearance and write it to `out_dir / name`."""
    rgb, _ = render_view(layout, cameras.camera_to_worlds[index], cameras.intrinsics, cameras.width, cameras.height,
                         appearances[index])
    # cv2 because it writes the same bytes for the same pixels (no timestamps or metadata).
    if not cv2.imwrite(str(out_dir / name), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {out_dir / name}")


def transforms_json(config: CityConfig, cameras: CityCameras, names: list) -> dict:
    """nerfstudio-data transforms.json of a city's images `names` (one per camera, in order):
    shared intrinsics, explicit train/val/test filename lists (val = test), sparse_pc.ply."""
    train, test = split_names(names, config.test_every)
    return {
        "camera_model": "OPENCV",
        "fl_x": cameras.fx,
        "fl_y": cameras.fy,
        "cx": cameras.cx,
        "cy": cameras.cy,
        "w": cameras.width,
        "h": cameras.height,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "ply_file_path": "sparse_pc.ply",
        "train_filenames": train,
        "val_filenames": test,
        "test_filenames": test,
        "frames": [
            {"file_path": name, "transform_matrix": c2w.tolist(), "street_level": bool(street), **_appearance_record(a)}
            for name, c2w, street, a in zip(names, cameras.camera_to_worlds, cameras.is_street, make_appearances(config))
        ],
        # Extra keys are ignored by nerfstudio; they record how to regenerate this exact scene.
        "synthetic_city": asdict(config),
    }


def _appearance_record(appearance: Optional[ImageAppearance]) -> dict:
    """An image's appearance for transforms.json (nothing under the fixed light)."""
    if appearance is None:
        return {}
    exposure = float(appearance.gain[1])
    return {"appearance": {"sun_dir": appearance.sun_dir.round(6).tolist(), "exposure": round(exposure, 6),
                           "white_balance": (appearance.gain / exposure).round(6).tolist()}}
