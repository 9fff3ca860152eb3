"""Real spherical harmonics colours, numerically as gsplat 1.4.0 evaluates them.

Conventions pinned to gsplat: coefficients are [N, K, 3] with K >= (degree + 1)**2 (extra
coefficients are ignored), bases follow Sloan's "Efficient Spherical Harmonic
Evaluation" (JCGT 2013) sign convention up to degree 4, directions are normalised
before evaluation, and ``rasterization()`` turns the result into a colour with
``max(sh + 0.5, 0)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

MAX_SH_DEGREE = 4
_C0 = 0.2820947917738781
_C1 = 0.48860251190292


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def rgb_to_sh_dc(rgb: Float[Tensor, "*batch 3"]) -> Float[Tensor, "*batch 3"]:
    """The degree-0 coefficient whose colour (``sh * C0 + 0.5``) is ``rgb``."""
    return (rgb - 0.5) / _C0


def recolor_sh(
    sh: Float[Tensor, "N K 3"], gain: Float[Tensor, "N 3"], offset: Float[Tensor, "N 3"], plain: bool = False
) -> Float[Tensor, "N K 3"]:
    """Coefficients whose colour is ``gain * colour + offset`` in every direction (before the
    clamp at zero): every coefficient scales by ``gain`` and the degree-0 one absorbs what the
    ``+ 0.5`` of the colour rule and ``offset`` add.  ``plain``: ``sh`` holds colours [N, 1, 3]."""
    if plain:
        return gain[:, None, :] * sh + offset[:, None, :]
    scaled = gain[:, None, :] * sh
    dc = scaled[:, :1, :] + ((gain - 1.0) * 0.5 + offset)[:, None, :] / _C0
    return torch.cat([dc, scaled[:, 1:, :]], dim=1)


def sh_bases(degree: int, dirs: Float[Tensor, "*batch 3"]) -> Float[Tensor, "*batch B"]:
    """The first ``(degree + 1)**2`` real SH bases at unit directions.

    Args:
        degree: 0..4.
        dirs: [..., 3] unit directions.

    Returns:
        [..., (degree + 1)**2] basis values.
    """
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"SH degree must be in 0..{MAX_SH_DEGREE}, got {degree}")
    x, y, z = dirs.unbind(-1)
    bases = [torch.full_like(x, _C0)]
    if degree >= 1:
        bases += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        bases += _degree2(x, y, z)
    if degree >= 3:
        bases += _degree3(x, y, z)
    if degree >= 4:
        bases += _degree4(x, y, z)
    return torch.stack(bases, dim=-1)


def _degree2(x: Tensor, y: Tensor, z: Tensor) -> list[Tensor]:
    xy2, x2_y2 = 2.0 * x * y, x * x - y * y
    return [
        0.5462742152960395 * xy2,
        -1.092548430592079 * z * y,
        0.9461746957575601 * z * z - 0.3153915652525201,
        -1.092548430592079 * z * x,
        0.5462742152960395 * x2_y2,
    ]


def _degree3(x: Tensor, y: Tensor, z: Tensor) -> list[Tensor]:
    z2 = z * z
    c1, s1 = x * x - y * y, 2.0 * x * y
    c2, s2 = x * c1 - y * s1, x * s1 + y * c1
    a = -2.285228997322329 * z2 + 0.4570457994644658
    b = 1.445305721320277 * z
    return [
        -0.5900435899266435 * s2,
        b * s1,
        a * y,
        z * (1.865881662950577 * z2 - 1.119528997770346),
        a * x,
        b * c1,
        -0.5900435899266435 * c2,
    ]


def _degree4(x: Tensor, y: Tensor, z: Tensor) -> list[Tensor]:
    z2 = z * z
    c1, s1 = x * x - y * y, 2.0 * x * y
    c2, s2 = x * c1 - y * s1, x * s1 + y * c1
    c3, s3 = x * c2 - y * s2, x * s2 + y * c2
    sh6 = 0.9461746957575601 * z2 - 0.3153915652525201
    sh12 = z * (1.865881662950577 * z2 - 1.119528997770346)
    a = z * (-4.683325804901025 * z2 + 2.007139630671868)
    b = 3.31161143515146 * z2 - 0.47308734787878
    c = -1.770130769779931 * z
    return [
        0.6258357354491763 * s3,
        c * s2,
        b * s1,
        a * y,
        1.984313483298443 * z * sh12 - 1.006230589874905 * sh6,
        a * x,
        b * c1,
        c * c2,
        0.6258357354491763 * c3,
    ]


def sh_to_color(
    sh: Float[Tensor, "N K 3"], dirs: Float[Tensor, "N 3"], degree: int
) -> Float[Tensor, "N 3"]:
    """Evaluate SH coefficients along (unnormalised) view directions, without the +0.5.

    Args:
        sh: [N, K, 3] coefficients, K >= (degree + 1)**2.
        dirs: [N, 3] directions (normalised here; zero vectors give the DC term only).
        degree: SH degree to use.

    Returns:
        [N, 3] raw SH values.
    """
    bases_needed = num_sh_bases(degree)
    if sh.shape[-2] < bases_needed:
        raise ValueError(f"degree {degree} needs {bases_needed} coefficients, got {sh.shape[-2]}")
    unit = F.normalize(dirs, p=2, dim=-1)
    bases = sh_bases(degree, unit)  # [N, B]
    return (bases[..., None] * sh[..., :bases_needed, :]).sum(dim=-2)


def camera_center(viewmat: Float[Tensor, "4 4"]) -> Float[Tensor, " 3"]:
    """World position of the camera, as gsplat takes it (``inverse(viewmat)[:3, 3]``)."""
    return torch.linalg.inv(viewmat)[:3, 3]


def gaussian_colors(
    sh: Float[Tensor, "N K 3"],
    means: Float[Tensor, "N 3"],
    campos: Float[Tensor, " 3"],
    degree: int,
) -> Float[Tensor, "N 3"]:
    """What gsplat's ``rasterization(..., sh_degree=degree)`` uses as colours.

    Args:
        sh: [N, K, 3] coefficients.
        means: [N, 3] Gaussian centres.
        campos: [3] camera centre (``camera_center(viewmat)``).
        degree: SH degree.

    Returns:
        [N, 3] colours ``max(SH(means - campos) + 0.5, 0)``.
    """
    return torch.clamp_min(sh_to_color(sh, means - campos, degree) + 0.5, 0.0)
