"""Compose per-leaf partial renders into one image (DESIGN.md section 3).

A partial is (C_k, T_k): premultiplied colour sum_i c_i a_i T_i and transmittance
prod_i (1 - a_i) of one leaf (or one rank's subtree), with no background.  Given partials
in front-to-back order,

    C = sum_k (prod_{j<k} T_j) C_k + bg prod_k T_k,    T = prod_k T_k.

The same function serves the single-process model, the distributed owner rank, the viewer
and ns-render.  It is plain torch, so gradients reach every partial.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

Partials = Union[Float[Tensor, "L H W D"], Sequence[Float[Tensor, "H W D"]]]
PartialsT = Union[Float[Tensor, "L H W 1"], Sequence[Float[Tensor, "H W 1"]]]


def composite(
    partial_colors: Partials,
    partial_trans: PartialsT,
    background: Optional[Float[Tensor, " D"]] = None,
) -> tuple[Float[Tensor, "H W D"], Float[Tensor, "H W 1"]]:
    """Front-to-back "over" of partial renders.

    A running product is used instead of ``cumprod``: cumprod's backward divides by its
    inputs, and a partial's T can be tiny or exactly 0.

    Args:
        partial_colors: [L, H, W, D] tensor or list of L [H, W, D] premultiplied colours,
            nearest first.
        partial_trans: [L, H, W, 1] tensor or list of L [H, W, 1] transmittances.
        background: optional [D] colour behind everything.

    Returns:
        [H, W, D] colour (background included when given) and [H, W, 1] transmittance.
    """
    colors, trans = list(partial_colors), list(partial_trans)
    if len(colors) != len(trans):
        raise ValueError(f"{len(colors)} colour partials but {len(trans)} transmittances")
    if not colors:
        raise ValueError("composite needs at least one partial (or use an empty render)")
    out = colors[0]
    through = trans[0]
    for c_k, t_k in zip(colors[1:], trans[1:]):
        out = out + through * c_k
        through = through * t_k
    if background is not None:
        out = out + through * background.to(out)
    return out, through


def expected_depth(
    premult_depth: Float[Tensor, "H W 1"], trans: Float[Tensor, "H W 1"], eps: float = 1e-10
) -> Float[Tensor, "H W 1"]:
    """Expected depth D / max(1 - T, eps), as gsplat's "ED" mode divides by alpha."""
    return premult_depth / torch.clamp_min(1.0 - trans, eps)


def paste_partial(
    crop_color: Float[Tensor, "h w D"],
    crop_trans: Float[Tensor, "h w 1"],
    window: tuple[int, int, int, int],
    width: int,
    height: int,
) -> tuple[Float[Tensor, "H W D"], Float[Tensor, "H W 1"]]:
    """Place a partial rendered over ``window`` = (x0, y0, x1, y1) into a full image.

    Outside the window the partial is empty: colour 0, T 1, which leaves the composite
    unchanged there.  Differentiable (padding).

    Args:
        crop_color: [y1 - y0, x1 - x0, D] premultiplied colour.
        crop_trans: [y1 - y0, x1 - x0, 1] transmittance.
        window: pixel rectangle, half-open.
        width, height: full image size.

    Returns:
        [height, width, D] colour and [height, width, 1] transmittance.
    """
    x0, y0, x1, y1 = window
    if crop_color.shape[:2] != (y1 - y0, x1 - x0) or crop_trans.shape[:2] != (y1 - y0, x1 - x0):
        raise ValueError(f"crop of shape {tuple(crop_color.shape)} does not match window {window}")
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"window {window} is not inside the {width}x{height} image")
    pad = (0, 0, x0, width - x1, y0, height - y1)  # last dim first: channels, x, y
    return F.pad(crop_color, pad, value=0.0), F.pad(crop_trans, pad, value=1.0)

