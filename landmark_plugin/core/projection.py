"""gsplat 1.4.0's ``fully_fused_projection`` (classic 3DGS, pinhole, unpacked) in torch.

Covariance from a normalised wxyz quaternion and linear scales; world-to-camera; EWA
Jacobian with camera-space x/z and y/z clamped to the field of view widened by 30 % of its
half-angle tangent on each side; ``eps2d`` added to the 2D covariance diagonal; conic =
its inverse; radius = ceil(3 sqrt(b + sqrt(max(0.01, b^2 - det)))) with b = trace / 2; and
radius 0 for depth outside [near, far], det <= 0, radius <= radius_clip, or a footprint
square fully off-screen.  Differentiable by autograd, CPU or GPU, float32 or float64.

``rasterize_mode="antialiased"`` (gsplat's, Mip-Splatting's 2D filter): the blur eps2d would
make small splats grow and brighten, so each opacity is scaled by the compensation
sqrt(max(0, det(cov2d) / det(cov2d + eps2d I))) that keeps the splat's integral; every
rasteriser then uses ``Projection.opacities`` of the camera, exactly as gsplat's
``rasterization`` multiplies the opacities before its rasteriser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True)
class RasterSettings:
    """Constants of the rasterisation rule (gsplat 1.4.0 defaults)."""

    near_plane: float = 0.01
    """Gaussians with camera depth below this are culled."""
    far_plane: float = 1e10
    """Gaussians with camera depth above this are culled."""
    eps2d: float = 0.3
    """Screen-space blur added to the 2D covariance diagonal (pixels^2)."""
    tile_size: int = 16
    """Tile edge in pixels; candidates are binned per tile."""
    alpha_min: float = 1.0 / 255.0
    """Contributions with a smaller alpha are skipped."""
    alpha_max: float = 0.999
    """Alpha is clamped to this."""
    min_transmittance: float = 1e-4
    """A pixel ends before the Gaussian that would drop T to this or below; 0 disables."""
    radius_clip: float = 0.0
    """Gaussians with a screen radius (pixels) at or below this are culled."""
    rasterize_mode: Literal["classic", "antialiased"] = "classic"
    """classic: 3DGS's rule.  antialiased: opacities scaled by the eps2d blur's compensation
    (gsplat's ``rasterize_mode``; see the module docstring)."""
    max_candidates: int = 2**20
    """Memory bound: the window is rendered in bands of pixel rows holding about this many
    (pixel, Gaussian) candidates each, and with several bands each is recomputed in backward
    rather than kept (results do not depend on it)."""


class Projection(NamedTuple):
    """Screen-space Gaussians of one camera (rows with radius 0 are culled)."""

    means2d: Float[Tensor, "N 2"]
    conics: Float[Tensor, "N 3"]
    depths: Float[Tensor, " N"]
    radii: Int[Tensor, " N"]
    compensations: Optional[Float[Tensor, " N"]] = None
    """Antialiased mode: the factor on every opacity for this camera; None in classic mode."""

    def take(self, index: Int[Tensor, " M"]) -> "Projection":
        """The rows ``index`` (differentiable)."""
        return Projection(*(None if t is None else t[index] for t in self))

    def opacities(self, opacities: Float[Tensor, " N"]) -> Float[Tensor, " N"]:
        """The opacities the rasteriser and the sharing rule use for this camera."""
        return opacities if self.compensations is None else opacities * self.compensations


def quat_scale_to_covar(
    quats: Float[Tensor, "N 4"], scales: Float[Tensor, "N 3"]
) -> Float[Tensor, "N 3 3"]:
    """World covariance R S S^T R^T from wxyz quaternions (normalised here) and scales."""
    w, x, y, z = F.normalize(quats, p=2, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)
    m = rot * scales[:, None, :]
    return m @ m.transpose(-1, -2)


def world_to_camera(
    means: Float[Tensor, "N 3"], covars: Float[Tensor, "N 3 3"], viewmat: Float[Tensor, "4 4"]
) -> tuple[Float[Tensor, "N 3"], Float[Tensor, "N 3 3"]]:
    """Means and covariances in camera space (viewmat = world-to-camera)."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    return means @ rot.T + trans, rot @ covars @ rot.T


def perspective_projection(
    means_c: Float[Tensor, "N 3"],
    covars_c: Float[Tensor, "N 3 3"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
) -> tuple[Float[Tensor, "N 2"], Float[Tensor, "N 2 2"]]:
    """EWA projection of camera-space Gaussians with positive depth.

    The Jacobian uses x/z and y/z clamped to the field of view widened by 30 % of its
    half-angle tangent on each side (gsplat's limits), which keeps far off-axis splats
    from exploding; the mean itself is projected unclamped.
    """
    x, y, z = means_c.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    rz = 1.0 / z
    tx = z * torch.minimum(torch.maximum(x * rz, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y * rz, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [fx * rz, zero, -fx * tx * rz * rz, zero, fy * rz, -fy * ty * rz * rz], dim=-1
    ).reshape(-1, 2, 3)
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)
    return means2d, cov2d


def project_gaussians(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    scales: Float[Tensor, "N 3"],
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
) -> Projection:
    """gsplat's ``fully_fused_projection`` (classic, unpacked) for one camera.

    Args:
        means: [N, 3] world centres.
        quats: [N, 4] wxyz rotations, not necessarily normalised.
        scales: [N, 3] linear scales.
        viewmat: [4, 4] world-to-camera (OpenCV convention).
        K: [3, 3] pinhole intrinsics.
        width, height: image size in pixels.
        settings: near/far, eps2d, radius_clip.

    Returns:
        Projection with [N, 2] means2d, [N, 3] conics (a, b, c of the inverse blurred
        covariance), [N] camera depths, [N] int32 radii (0 = culled) and, antialiased, [N]
        compensations.
    """
    means_c, covars_c = world_to_camera(means, quat_scale_to_covar(quats, scales), viewmat)
    depth = means_c[:, 2]
    depth_ok = (depth >= settings.near_plane) & (depth <= settings.far_plane)
    # Culled rows get a harmless depth so no inf / nan can reach the backward pass.
    safe_c = torch.where(depth_ok[:, None], means_c, torch.ones_like(means_c))
    means2d, cov2d = perspective_projection(safe_c, covars_c, K.to(means), width, height)
    a = cov2d[:, 0, 0] + settings.eps2d
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + settings.eps2d
    det = a * c - b * b
    det_ok = det > 0
    safe_det = torch.where(det_ok, det, torch.ones_like(det))
    inv_det = 1.0 / safe_det
    conics = torch.stack([c * inv_det, -b * inv_det, a * inv_det], dim=-1)
    compensations = None
    if settings.rasterize_mode == "antialiased":
        det_orig = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
        # clamped above 0 before the root, so sqrt's gradient stays finite where it is 0
        ratio = (det_orig / safe_det).clamp(min=0.0)
        compensations = torch.where(ratio > 0, torch.sqrt(torch.where(ratio > 0, ratio, 1.0)), 0.0)
    radius = _screen_radius(a.detach(), c.detach(), det.detach())
    mx, my = means2d[:, 0].detach(), means2d[:, 1].detach()
    on_screen = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
    keep = depth_ok & det_ok & (radius > settings.radius_clip) & on_screen
    radii = torch.where(keep, radius, torch.zeros_like(radius)).to(torch.int32)
    return Projection(means2d=means2d, conics=conics, depths=depth, radii=radii, compensations=compensations)


def _screen_radius(
    a: Float[Tensor, " N"], c: Float[Tensor, " N"], det: Float[Tensor, " N"]
) -> Float[Tensor, " N"]:
    """ceil(3 sigma) of the larger eigenvalue, the 0.01 floor under the discriminant as
    in gsplat (it also keeps sqrt away from negative rounding noise)."""
    b = 0.5 * (a + c)
    v1 = b + torch.sqrt(torch.clamp_min(b * b - det, 0.01))
    return torch.ceil(3.0 * torch.sqrt(torch.clamp_min(v1, 0.0)))
