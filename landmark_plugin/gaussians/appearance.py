"""Per-image appearance of retina-gs: splatfacto's bilateral grid, or one affine colour transform
per image, applied to the composite.

Real captures change exposure, white balance and light from image to image.  With
``use_bilateral_grid`` every training image gets a bilateral grid of affine colour transforms
(nerfstudio's ``BilateralGrid``, splatfacto's option and shapes), sliced by pixel position and
grey level and applied to the camera's composited image, where splatfacto applies it to its
render.  The frame is the same on every world size:

- the rank that composites a camera applies that image's grid, so only it puts a gradient on
  that grid; before the step (``sync_grid_gradients_``, from the pipeline's ``sync_gradients_``)
  the batch's grids' gradients are summed over ranks -- B grids travel, not one per training
  image -- and the total variation's gradient (splatfacto's weight) is added on every rank alike,
  so every rank steps the same grids, as one process would.

``affine_appearance`` is the same machinery with a grid of one cell: a 3x4 colour matrix per image
(exposure, white balance, a colour cast; what the affine models of large-scene papers fit), with no
total variation to regularise (one cell has no neighbours).

Outside training (eval, ns-render, the viewer) the render shows the appearance a layout edit
picks (``edits.Appearance``: one image's grid, or a blend of two), else ``eval_appearance``:
``none`` (splatfacto's: the scene's own colours) or ``mean`` (the mean of all images' grids).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from jaxtyping import Float
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.model_components.lib_bilagrid import BilateralGrid, slice, total_variation_loss
from torch import Tensor

from landmark_plugin.distributed.collectives import all_reduce_sum
from landmark_plugin.errors import ConfigError

TV_WEIGHT = 10.0
"""splatfacto's weight of the grids' total variation."""

Mix = Tuple[Tuple[int, float], ...]
"""(image, weight) pairs whose grids, so weighted, give a render's appearance."""


def make_grids(config, num_images: int) -> Optional[BilateralGrid]:
    """One identity grid per training image (``config``: splatfacto's ``use_bilateral_grid``,
    ``grid_shape``; or ``affine_appearance``: one cell), or None when both options are off."""
    if config.use_bilateral_grid and config.affine_appearance:
        raise ConfigError("choose one per-image appearance: --pipeline.model.use-bilateral-grid or --pipeline.model.affine-appearance")
    if config.affine_appearance:
        return BilateralGrid(num=num_images, grid_X=1, grid_Y=1, grid_W=1)
    if not config.use_bilateral_grid:
        return None
    grid_x, grid_y, grid_w = config.grid_shape
    return BilateralGrid(num=num_images, grid_X=grid_x, grid_Y=grid_y, grid_W=grid_w)


def image_index(cameras: Cameras, b: int) -> Optional[int]:
    """The training image of camera ``b`` (nerfstudio's ``cam_idx`` metadata), if it has one."""
    index = (cameras.metadata or {}).get("cam_idx")
    if index is None:
        return None
    if isinstance(index, int):
        return index
    return int(torch.as_tensor(index).reshape(-1)[b])


def eval_mix(model) -> Mix:
    """The appearance of renders outside training: the layout edit's, else ``eval_appearance``."""
    picked = getattr(model, "eval_appearance_mix", None)
    if picked is not None:
        image, to_image, t = picked
        return ((image, 1.0),) if to_image is None or t == 0.0 else ((image, 1.0 - t), (to_image, t))
    if model.config.eval_appearance == "mean":
        count = model.bil_grids.grids.shape[0]
        return tuple((i, 1.0 / count) for i in range(count))
    return ()


def apply_appearance(model, rgb: Float[Tensor, "H W 3"], image: Optional[int]) -> Float[Tensor, "H W 3"]:
    """``rgb`` through its appearance: in training the grid of ``image`` (none if it is None),
    otherwise ``eval_mix``; unchanged without bilateral grids."""
    grids: Optional[BilateralGrid] = getattr(model, "bil_grids", None)
    if grids is None:
        return rgb
    if model.training:
        if image is None:
            return rgb
        return _sliced(grids, rgb, image)
    mix = eval_mix(model)
    if not mix:
        return rgb
    with torch.no_grad():
        blend = BilateralGrid(1, grids.grid_width, grids.grid_height, grids.grid_guidance).to(rgb.device, rgb.dtype)
        blend.grids.copy_(_weighted(grids.grids, mix)[None])
        return _sliced(blend, rgb, 0)


def _weighted(grids: Tensor, mix: Mix) -> Tensor:
    """sum_i w_i grids[i] (slicing is linear in the grid, so this is the blend of the images')."""
    index = torch.tensor([i for i, _ in mix], device=grids.device)
    weights = torch.tensor([w for _, w in mix], device=grids.device, dtype=grids.dtype)
    return torch.einsum("n,n...->...", weights, grids[index])


def _sliced(grids: BilateralGrid, rgb: Tensor, index: int) -> Tensor:
    """Grid ``index`` applied to one image, as splatfacto's ``_apply_bilateral_grid``."""
    height, width = rgb.shape[:2]
    grid_y, grid_x = torch.meshgrid(
        torch.linspace(0, 1.0, height, device=rgb.device, dtype=rgb.dtype),
        torch.linspace(0, 1.0, width, device=rgb.device, dtype=rgb.dtype),
        indexing="ij",
    )
    xy = torch.stack([grid_x, grid_y], dim=-1)[None]
    out = slice(bil_grids=grids, rgb=rgb[None], xy=xy, grid_idx=torch.tensor(index, device=rgb.device, dtype=torch.long))
    return out["rgb"][0]


def tv_loss(model) -> Optional[Tensor]:
    """The grids' weighted total variation, for the log: detached, since its gradient is added by
    ``sync_grid_gradients_`` (None without grids, or with one-cell affine grids, which have no
    variation)."""
    grids: Optional[BilateralGrid] = getattr(model, "bil_grids", None)
    if grids is None or not model.training or model.config.affine_appearance:
        return None
    with torch.no_grad():
        return TV_WEIGHT * total_variation_loss(grids.grids)


def sync_grid_gradients_(model, comm, images: Sequence[int]) -> None:
    """Before the optimiser step, on every rank: the grids' gradients become one process's.

    Only the batch's images' grids have a photometric gradient, each on the rank that composited
    that image: those rows alone are summed over ranks (B grids, not one per training image).
    Then the total variation's gradient, the same on every rank, is added to every grid (what
    splatfacto's TV term gives), so the replicated grids take identical steps everywhere.
    """
    grids: Optional[BilateralGrid] = getattr(model, "bil_grids", None)
    if grids is None:
        return
    weights = grids.grids
    if weights.grad is None:
        weights.grad = torch.zeros_like(weights)
    rows = torch.tensor(sorted(set(images)), dtype=torch.int64, device=weights.device)
    if rows.numel():
        (summed,) = all_reduce_sum(comm, [weights.grad[rows]], "bilateral grid gradients of the batch")
        weights.grad[rows] = summed
    if not model.config.affine_appearance:
        with torch.enable_grad():
            probe = weights.detach().requires_grad_(True)
            (tv_grad,) = torch.autograd.grad(TV_WEIGHT * total_variation_loss(probe), probe)
        weights.grad += tv_grad
