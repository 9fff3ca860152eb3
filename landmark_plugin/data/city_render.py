"""Materials, shading and analytic ray casting of a synthetic city (see `city.py`).

Surfaces are Lambertian under one fixed sun plus ambient light, so a surface point has one
colour from every view: the renderer and the point sampler share `surface_radiance`, and a
sampled point has exactly the colour the images show there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from jaxtyping import Bool, Float, Int

SKY, GROUND, ROOF, WALL = 0, 1, 2, 3
"""Surface codes returned by `trace`."""

# Wall faces, in the order -x, +x, -y, +y; a ray travelling along +axis enters the -axis face.
FACE_NORMALS = np.array([[-1.0, 0, 0], [1.0, 0, 0], [0, -1.0, 0], [0, 1.0, 0]])
AMBIENT, DIFFUSE = 0.5, 0.55

ASPHALT = np.array([0.21, 0.21, 0.23])
LANE_MARKING = np.array([0.92, 0.86, 0.55])
PAVEMENT = np.array([0.62, 0.60, 0.56])
LOT_GROUND = np.array([0.50, 0.49, 0.46])
PARK = np.array([0.30, 0.50, 0.24])
OUTSKIRTS = np.array([[0.42, 0.48, 0.32], [0.50, 0.50, 0.36], [0.36, 0.44, 0.30]])
GLASS = np.array([0.12, 0.16, 0.24])
LIT_WINDOW = np.array([0.95, 0.82, 0.52])
SKY_HORIZON = np.array([0.78, 0.85, 0.93])
SKY_ZENITH = np.array([0.38, 0.56, 0.84])


@dataclass(frozen=True, eq=False)
class ImageAppearance:
    """How one image is lit and exposed, where the capture's appearance varies (``CityConfig.
    vary_appearance``): the scene's albedos stay, the light and the camera's response change."""

    sun_dir: Float[np.ndarray, "3"]
    """Unit vector towards the sun at this image's time of day."""
    sun_rgb: Float[np.ndarray, "3"]
    """Colour and strength of the direct sunlight (scales DIFFUSE)."""
    sky_rgb: Float[np.ndarray, "3"]
    """Colour of the skylight (scales AMBIENT and the sky itself)."""
    gain: Float[np.ndarray, "3"]
    """Camera response on linear radiance: exposure times white balance, per channel."""


@dataclass(frozen=True, eq=False)
class CityLayout:
    """Geometry and materials of one city. B buildings; lengths in city units, z up."""

    box_min: Float[np.ndarray, "B 3"]
    """Lower corner of each building box (z = 0: buildings stand on the ground)."""
    box_max: Float[np.ndarray, "B 3"]
    """Upper corner of each building box (z = building height)."""
    facade_rgb: Float[np.ndarray, "B 3"]
    """Wall albedo of each building."""
    roof_rgb: Float[np.ndarray, "B 3"]
    """Roof albedo of each building."""
    floor_height: Float[np.ndarray, " B"]
    """Storey height (vertical window pitch) of each building."""
    window_pitch: Float[np.ndarray, " B"]
    """Horizontal window pitch of each building."""
    park_grid: Bool[np.ndarray, "nx ny"]
    """Lots (in lot-grid coordinates) that are parks instead of buildings."""
    city_min: Float[np.ndarray, "2"]
    """South-west corner of the street grid (outer streets included)."""
    city_max: Float[np.ndarray, "2"]
    """North-east corner of the street grid."""
    ground_min: Float[np.ndarray, "2"]
    """South-west corner of the ground plane (street grid plus outskirts)."""
    ground_max: Float[np.ndarray, "2"]
    """North-east corner of the ground plane; rays beyond it see sky."""
    block_pitch: Float[np.ndarray, "2"]
    """Distance between neighbouring streets along x and y."""
    lots_per_block: Int[np.ndarray, "2"]
    """Lots per block along x and y."""
    lot_size: float
    street_width: float
    pavement_width: float
    sun_dir: Float[np.ndarray, "3"]
    """Unit vector towards the sun."""

    @property
    def num_buildings(self) -> int:
        return len(self.box_min)


def _hash01(*keys: np.ndarray) -> Float[np.ndarray, "..."]:
    """Deterministic per-cell random number in [0, 1) from integer keys (exact integer math)."""
    h = np.zeros(np.broadcast(*keys).shape, dtype=np.uint64)
    for key, prime in zip(keys, (73856093, 19349663, 83492791, 2654435761, 97531)):
        h ^= np.asarray(key).astype(np.int64).astype(np.uint64) * np.uint64(prime)
    h &= np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(1 << 24)


def _cells(values: np.ndarray, size: float) -> np.ndarray:
    return np.floor(values / size).astype(np.int64)


def ground_albedo(layout: CityLayout, xy: Float[np.ndarray, "N 2"]) -> Float[np.ndarray, "N 3"]:
    """Streets with dashed centre lines, tiled pavements, lots, parks and fields outside the grid."""
    sw, pw = layout.street_width, layout.pavement_width
    rel = xy - layout.city_min
    in_city = np.all((rel >= 0) & (xy <= layout.city_max), axis=-1)
    local = np.mod(rel, layout.block_pitch)
    street_band = local < sw  # [N, 2]: column 0 = a street running along y
    street = in_city & street_band.any(-1)
    pavement = in_city & ~street & ((local < sw + pw) | (local > layout.block_pitch - pw)).any(-1)
    lot = in_city & ~street & ~pavement

    cell = _cells(xy, 0.04)
    grain = 0.9 + 0.18 * _hash01(cell[:, 0], cell[:, 1])[:, None]
    fields = OUTSKIRTS[(_hash01(*_cells(xy, 0.35).T, 7) * len(OUTSKIRTS)).astype(int)]
    out = fields * grain

    out[street] = ASPHALT * grain[street]
    for axis in (0, 1):  # centre line of streets running along the other axis, not at crossings
        along = xy[:, 1 - axis]
        line = street & street_band[:, axis] & ~street_band[:, 1 - axis]
        line &= (np.abs(local[:, axis] - sw / 2) < 0.025 * sw) & (np.mod(along, 0.1) < 0.055)
        out[line] = LANE_MARKING

    tiles = (np.mod(xy, 0.04) < 0.005).any(-1)
    out[pavement] = PAVEMENT * np.where(tiles[pavement], 0.8, 1.0)[:, None]

    lot_ij = (rel // layout.block_pitch) * layout.lots_per_block + np.clip(
        ((local - sw - pw) // layout.lot_size), 0, layout.lots_per_block - 1
    )
    lot_ij = np.clip(lot_ij.astype(np.int64), 0, np.array(layout.park_grid.shape) - 1)
    is_park = lot & layout.park_grid[lot_ij[:, 0], lot_ij[:, 1]]
    out[lot] = LOT_GROUND * grain[lot]
    out[is_park] = PARK * (0.75 + 0.45 * _hash01(*_cells(xy[is_park], 0.03).T, 3))[:, None]
    return out


def roof_albedo(layout: CityLayout, b: Int[np.ndarray, " N"], xy: Float[np.ndarray, "N 2"]) -> Float[np.ndarray, "N 3"]:
    """Roof tiles with a parapet band in the facade colour."""
    local = xy - layout.box_min[b, :2]
    size = layout.box_max[b, :2] - layout.box_min[b, :2]
    tile = _cells(local, 0.05)
    out = layout.roof_rgb[b] * (0.88 + 0.2 * _hash01(tile[:, 0], tile[:, 1], b))[:, None]
    parapet = np.minimum(local, size - local).min(-1) < 0.02
    out[parapet] = 0.8 * layout.facade_rgb[b[parapet]]
    return out


def wall_albedo(
    layout: CityLayout, b: Int[np.ndarray, " N"], face: Int[np.ndarray, " N"], p: Float[np.ndarray, "N 3"]
) -> Float[np.ndarray, "N 3"]:
    """Facade with a centred grid of windows (some lit), a darker ground floor."""
    along_axis = np.where(face < 2, 1, 0)  # walls facing +-x run along y, and vice versa
    rows = np.arange(len(b))
    u = p[rows, along_axis] - layout.box_min[b, along_axis]
    length = layout.box_max[b, along_axis] - layout.box_min[b, along_axis]
    height = layout.box_max[b, 2]
    pitch, storey = layout.window_pitch[b], layout.floor_height[b]
    columns = np.floor(length / pitch)
    cu = (u - (length - columns * pitch) / 2) / pitch
    col, fu = np.floor(cu), cu - np.floor(cu)
    cz = p[:, 2] / storey
    row, fz = np.floor(cz), cz - np.floor(cz)
    storeys = np.floor(height / storey)

    out = layout.facade_rgb[b] * (0.94 + 0.08 * _hash01(b, row, face))[:, None]
    out[row < 1] *= 0.7
    window = (col >= 0) & (col < columns) & (row >= 1) & (row < storeys - 0.5)
    window &= (fu > 0.22) & (fu < 0.78) & (fz > 0.28) & (fz < 0.8)
    luck = _hash01(b, face, col, row)
    glass = GLASS * (0.8 + 0.6 * luck[:, None])
    glass[luck > 0.88] = LIT_WINDOW
    out[window] = glass[window]
    return out


def shade(
    layout: CityLayout,
    albedo: Float[np.ndarray, "N 3"],
    normal: Float[np.ndarray, "N 3"],
    appearance: Optional[ImageAppearance] = None,
) -> Float[np.ndarray, "N 3"]:
    """Lambertian radiance under the sun plus ambient light: the layout's fixed light clipped to
    [0, 1], or an image's light (left unclipped: the camera's gain comes first)."""
    if appearance is None:
        light = AMBIENT + DIFFUSE * np.clip(normal @ layout.sun_dir, 0.0, None)
        return np.clip(albedo * light[:, None], 0.0, 1.0)
    direct = np.clip(normal @ appearance.sun_dir, 0.0, None)[:, None] * appearance.sun_rgb
    return albedo * (AMBIENT * appearance.sky_rgb + DIFFUSE * direct)


def surface_radiance(
    layout: CityLayout,
    surface: Int[np.ndarray, " N"],
    building: Int[np.ndarray, " N"],
    face: Int[np.ndarray, " N"],
    points: Float[np.ndarray, "N 3"],
    appearance: Optional[ImageAppearance] = None,
) -> Float[np.ndarray, "N 3"]:
    """Colour of surface points (GROUND, ROOF or WALL; building/face ignored where unused),
    under the layout's fixed light or one image's (``shade``)."""
    out = np.zeros((len(points), 3))
    up = np.array([[0.0, 0.0, 1.0]])
    for code in (GROUND, ROOF, WALL):
        sel = surface == code
        if not sel.any():
            continue
        if code == GROUND:
            out[sel] = shade(layout, ground_albedo(layout, points[sel, :2]), up, appearance)
        elif code == ROOF:
            out[sel] = shade(layout, roof_albedo(layout, building[sel], points[sel, :2]), up, appearance)
        else:
            albedo = wall_albedo(layout, building[sel], face[sel], points[sel])
            out[sel] = shade(layout, albedo, FACE_NORMALS[face[sel]], appearance)
    return out


def to_uint8(rgb: Float[np.ndarray, "... 3"]) -> np.ndarray:
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def sky_radiance(directions: Float[np.ndarray, "N 3"]) -> Float[np.ndarray, "N 3"]:
    elevation = directions[:, 2] / np.linalg.norm(directions, axis=-1)
    blend = np.clip(elevation, 0.0, 1.0)[:, None] ** 0.7
    return SKY_HORIZON + (SKY_ZENITH - SKY_HORIZON) * blend


def camera_rays(
    c2w: Float[np.ndarray, "4 4"], K: Float[np.ndarray, "3 3"], width: int, height: int
) -> Float[np.ndarray, "H W 3"]:
    """World ray directions through pixel centres, scaled so that the ray parameter is z-depth."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    cam = np.stack([(u - K[0, 2]) / K[0, 0], -(v - K[1, 2]) / K[1, 1], -np.ones_like(u)], axis=-1)
    return cam @ c2w[:3, :3].T


def _screen_rects(
    layout: CityLayout, c2w: np.ndarray, K: np.ndarray, width: int, height: int, near: float = 1e-4
) -> Int[np.ndarray, "B 4"]:
    """Conservative pixel rectangle (r0, r1, c0, c1) of each building; empty where behind.

    Boxes that straddle the camera plane get the whole image: projecting their corners
    would not bound them.
    """
    lo, hi = layout.box_min, layout.box_max
    corners = np.stack([np.where(np.array(bits)[None, :], hi, lo) for bits in np.ndindex(2, 2, 2)], axis=1)
    cam = (corners - c2w[:3, 3]) @ c2w[:3, :3]  # [B, 8, 3]
    depth = -cam[..., 2]
    safe = np.maximum(depth, near)
    u = K[0, 0] * cam[..., 0] / safe + K[0, 2]
    v = -K[1, 1] * cam[..., 1] / safe + K[1, 2]
    rects = np.stack(
        [
            np.floor(v.min(1) - 0.5) - 1,
            np.ceil(v.max(1) - 0.5) + 2,
            np.floor(u.min(1) - 0.5) - 1,
            np.ceil(u.max(1) - 0.5) + 2,
        ],
        axis=-1,
    )
    rects = np.clip(rects, 0, [height, height, width, width]).astype(np.int64)
    straddle = (depth.min(1) <= near) & (depth.max(1) > near)
    rects[straddle] = [0, height, 0, width]
    rects[depth.max(1) <= near] = 0
    return rects


def trace(
    layout: CityLayout, c2w: Float[np.ndarray, "4 4"], K: Float[np.ndarray, "3 3"], width: int, height: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First hit of every pixel ray: (z-depth [H, W] (inf for sky), surface, building, face, dirs)."""
    dirs = camera_rays(c2w, K, width, height)
    origin = c2w[:3, 3]
    depth = np.full((height, width), np.inf)
    surface = np.zeros((height, width), dtype=np.int64)
    building = np.full((height, width), -1, dtype=np.int64)
    axis = np.zeros((height, width), dtype=np.int64)

    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[..., 2] < 0, -origin[2] / dirs[..., 2], np.inf)
    hit_xy = origin[:2] + np.where(np.isfinite(t_ground), t_ground, 0.0)[..., None] * dirs[..., :2]
    on_ground = np.isfinite(t_ground) & np.all((hit_xy >= layout.ground_min) & (hit_xy <= layout.ground_max), axis=-1)
    depth[on_ground], surface[on_ground] = t_ground[on_ground], GROUND

    inv = 1.0 / np.where(dirs == 0.0, 1e-12, dirs)
    for b, (r0, r1, c0, c1) in enumerate(_screen_rects(layout, c2w, K, width, height)):
        if r1 <= r0 or c1 <= c0:
            continue
        sub_inv = inv[r0:r1, c0:c1]
        t0 = (layout.box_min[b] - origin) * sub_inv
        t1 = (layout.box_max[b] - origin) * sub_inv
        t_entry = np.minimum(t0, t1)
        t_near = t_entry.max(-1)
        t_far = np.maximum(t0, t1).min(-1)
        closer = (t_near <= t_far) & (t_near > 0) & (t_near < depth[r0:r1, c0:c1])
        if not closer.any():
            continue
        depth[r0:r1, c0:c1][closer] = t_near[closer]
        building[r0:r1, c0:c1][closer] = b
        axis[r0:r1, c0:c1][closer] = t_entry.argmax(-1)[closer]

    is_box = building >= 0
    surface[is_box] = np.where(axis[is_box] == 2, ROOF, WALL)
    face = np.where(surface == WALL, 2 * axis + (np.take_along_axis(dirs, axis[..., None], -1)[..., 0] < 0), 0)
    return depth, surface, building, face, dirs


def render_view(
    layout: CityLayout,
    c2w: Float[np.ndarray, "4 4"],
    K: Float[np.ndarray, "3 3"],
    width: int,
    height: int,
    appearance: Optional[ImageAppearance] = None,
) -> Tuple[np.ndarray, Float[np.ndarray, "H W"]]:
    """Ray cast one pinhole view (OpenGL c2w, pixel-centre rays), under the layout's fixed
    light or under ``appearance`` (this image's light and camera gain).

    Returns rgb uint8 [H, W, 3] and z-depth float32 [H, W] (distance along the optical axis,
    inf where the ray sees sky).
    """
    depth, surface, building, face, dirs = trace(layout, c2w, K, width, height)
    flat = depth.ravel()
    dirs_flat = dirs.reshape(-1, 3)
    points = c2w[:3, 3] + np.where(np.isfinite(flat), flat, 0.0)[:, None] * dirs_flat
    rgb = surface_radiance(layout, surface.ravel(), building.ravel(), face.ravel(), points, appearance)
    sky = surface.ravel() == SKY
    rgb[sky] = sky_radiance(dirs_flat[sky])
    if appearance is not None:
        rgb[sky] *= appearance.sky_rgb
        rgb *= appearance.gain
    return to_uint8(rgb).reshape(height, width, 3), depth.astype(np.float32)


def _surface_areas(layout: CityLayout, ground_margin: float) -> np.ndarray:
    size = layout.box_max - layout.box_min
    roofs = size[:, 0] * size[:, 1]
    walls = np.stack([size[:, 1], size[:, 1], size[:, 0], size[:, 0]], axis=-1) * size[:, 2:3]
    ground_extent = (layout.city_max - layout.city_min) * (1 + ground_margin)
    ground = np.prod(ground_extent) - roofs.sum()
    return np.concatenate([roofs, walls.ravel(), [ground]])


def surface_area(layout: CityLayout, ground_margin: float = 0.1) -> float:
    """Area of what `sample_points` samples: roofs, walls and the ground of the street grid grown
    by `ground_margin`, outside building footprints (the point spacing of n points is about
    sqrt(area / n))."""
    return float(_surface_areas(layout, ground_margin).sum())


def sample_points(
    layout: CityLayout, n: int, rng: np.random.Generator, ground_margin: float = 0.1
) -> Tuple[Float[np.ndarray, "n 3"], np.ndarray]:
    """n points spread by area over roofs, walls and open ground, with their rendered colour.

    Ground is sampled over the street grid grown by `ground_margin`, outside building
    footprints.  Returns (xyz float32 [n, 3], rgb uint8 [n, 3]).
    """
    nb = layout.num_buildings
    areas = _surface_areas(layout, ground_margin)
    category = rng.choice(len(areas), size=n, p=areas / areas.sum())
    points = np.zeros((n, 3))
    surface = np.full(n, GROUND)
    building = np.zeros(n, dtype=np.int64)
    face = np.zeros(n, dtype=np.int64)

    roof = category < nb
    b = category[roof]
    points[roof, :2] = rng.uniform(layout.box_min[b, :2], layout.box_max[b, :2])
    points[roof, 2] = layout.box_max[b, 2]
    surface[roof], building[roof] = ROOF, b

    wall = (category >= nb) & (category < 5 * nb)
    b, f = np.divmod(category[wall] - nb, 4)
    p = rng.uniform(layout.box_min[b], layout.box_max[b])
    fixed_axis = f // 2
    rows = np.arange(len(b))
    p[rows, fixed_axis] = np.where(f % 2 == 0, layout.box_min[b, fixed_axis], layout.box_max[b, fixed_axis])
    points[wall] = p
    surface[wall], building[wall], face[wall] = WALL, b, f

    ground = np.flatnonzero(category == 5 * nb)
    centre = (layout.city_min + layout.city_max) / 2
    half = (layout.city_max - layout.city_min) / 2 * (1 + ground_margin)
    filled = 0
    while filled < len(ground):  # rejection sampling outside the footprints
        xy = rng.uniform(centre - half, centre + half, size=(2 * (len(ground) - filled) + 16, 2))
        inside = np.any(
            np.all((xy[:, None] >= layout.box_min[None, :, :2]) & (xy[:, None] <= layout.box_max[None, :, :2]), -1), -1
        )
        xy = xy[~inside][: len(ground) - filled]
        points[ground[filled : filled + len(xy)], :2] = xy
        filled += len(xy)

    rgb = surface_radiance(layout, surface, building, face, points)
    return points.astype(np.float32), to_uint8(rgb)
