"""Point clouds as binary PLY: float x y z and uchar red green blue (what nerfstudio and open3d read)."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
from jaxtyping import Float, UInt8
from plyfile import PlyData, PlyElement

GREY = 128
"""Colour given to points of a file that has no colour properties."""


def write_points_ply(path: Path, xyz: Float[np.ndarray, "N 3"], rgb: UInt8[np.ndarray, "N 3"]) -> None:
    """Write N coloured points as a binary little-endian PLY."""
    vertex = np.empty(
        len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    )
    for i, name in enumerate(("x", "y", "z")):
        vertex[name] = xyz[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        vertex[name] = rgb[:, i]
    PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(str(path))


def read_points_ply(path: Path) -> Tuple[Float[np.ndarray, "N 3"], UInt8[np.ndarray, "N 3"]]:
    """(xyz float32 [N, 3], rgb uint8 [N, 3]) of a PLY's vertices; grey where it has no colours.

    plyfile rather than open3d: the same format, without a 400 MB import that also needs
    system libraries (libusb) some machines lack.
    """
    vertex = PlyData.read(str(path))["vertex"].data
    names = vertex.dtype.names or ()
    xyz = np.stack([vertex[a] for a in ("x", "y", "z")], axis=-1).astype(np.float32)
    if all(c in names for c in ("red", "green", "blue")):
        rgb = np.stack([vertex[c] for c in ("red", "green", "blue")], axis=-1).astype(np.uint8)
    else:
        rgb = np.full((len(xyz), 3), GREY, dtype=np.uint8)
    return xyz, rgb
