"""What densification reads of a retina-gs training batch, gathered by ``RetinaFrame``.

gsplat's strategies read ``rasterization``'s ``info`` of one render over all Gaussians; a frame
renders one partial per (camera, part), and in clip mode on several ranks copies of a rank's
Gaussians are drawn elsewhere.  ``note_render`` keeps each training render's screen means and
radii, ``strategy_info`` assembles them into the ``info`` a single render would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from landmark_plugin.gaussians.sharing import Shared


@dataclass
class StepRecord:
    """What densification needs after backward: per rendered (camera, part), the screen means
    of the local Gaussians (their .grad) and radii, scattered over all local rows."""

    means2d: List[Tuple[Tensor, Tensor, int]] = field(default_factory=list)  # (means2d [1,n,2], index [n], camera)
    radii: Dict[int, Tensor] = field(default_factory=dict)  # camera -> [N] radii
    num_cameras: int = 0
    width: int = 0
    height: int = 0
    sizes: List[Tuple[int, int]] = field(default_factory=list)  # (width, height) of every camera
    shared: Optional[Shared] = None  # clip mode on several ranks: copies drawn elsewhere
    training: bool = False  # made by a training forward (what densification and visible Adam read)


def note_render(record: StepRecord, model, partial, rows: Tensor, b: int, n: int) -> None:
    """Keep what densification reads of one training render (screen means, radii)."""
    if not (model.training and partial.means2d.requires_grad):
        return
    partial.means2d.retain_grad()
    record.means2d.append((partial.means2d, rows, b))
    if record.shared is not None:
        record.shared.stats.renders.append((partial.means2d, n, b))
        record.radii[b] = record.shared.radii[b]
        return
    radii = record.radii.setdefault(b, torch.zeros(model.num_points, dtype=torch.int32, device=model.device))
    radii[rows] = partial.radii[0, : rows.numel()].to(torch.int32)


def camera_radii(record: StepRecord, model) -> Tensor:
    """[B, N] radii of this rank's Gaussians in every camera of the batch; in clip mode on several
    ranks those of the projection that decided the sharing, which counts a Gaussian drawn only
    on another rank too (this rank may have rendered nothing for that camera)."""
    radii = torch.zeros(record.num_cameras, model.num_points, dtype=torch.int32, device=model.device)
    if record.shared is not None:
        for b, r in enumerate(record.shared.radii):
            radii[b] = r
    else:
        for b, r in record.radii.items():
            radii[b] = r
    return radii


def visible_rows(record: StepRecord, model) -> Optional[Tensor]:
    """[N] whether any camera of the last training batch saw each of this rank's Gaussians
    (radius > 0), what visible Adam steps; None when the last forward was not a training batch."""
    if not record.training or record.num_cameras == 0:
        return None
    return (camera_radii(record, model) > 0).any(dim=0)


def strategy_info(record: StepRecord, model) -> Optional[Dict]:
    """The last training batch as gsplat's strategies read it: ``rasterization``'s ``info``
    for B cameras over this rank's N Gaussians (unpacked).

    ``means2d`` is a stand-in [B, N, 2] tensor whose ``.grad`` (and ``.absgrad``) holds every
    (camera, part) render's screen-mean gradient scattered to its rows, plus those of copies
    drawn on other ranks (clip mode); Gaussians a camera did not draw have radius 0 there
    and are skipped by the strategy.  gsplat scales the gradient by ``width / 2 *
    n_cameras`` (the loss is a mean over the B cameras); a camera of another size is
    pre-scaled so that it gets its own ``width / 2``.  None when the last forward was not a
    training batch.
    """
    if not record.training or record.num_cameras == 0:
        return None
    num, n = record.num_cameras, model.num_points
    grads = model.means.new_zeros(num, n, 2)
    absgrads = model.means.new_zeros(num, n, 2)
    for means2d, index, b in record.means2d:
        if means2d.grad is not None:
            grads[b, index] += means2d.grad[0, : index.numel()].to(grads)
        absgrad = getattr(means2d, "absgrad", None)
        if absgrad is not None:
            absgrads[b, index] += absgrad[0, : index.numel()].to(absgrads)
    if record.shared is not None:
        remote = record.shared.stats.remote.transpose(0, 1).to(grads)  # [B, N, 4]
        grads += remote[..., :2]
        absgrads += remote[..., 2:]
    for b, (w, h) in enumerate(record.sizes):
        if (w, h) != (record.width, record.height):
            scale = grads.new_tensor([w / record.width, h / record.height])
            grads[b] *= scale
            absgrads[b] *= scale
    radii = camera_radii(record, model)
    stand_in = model.means.new_zeros(num, n, 2)
    stand_in.grad = grads
    stand_in.absgrad = absgrads
    return {
        "means2d": stand_in, "radii": radii, "width": record.width, "height": record.height,
        "n_cameras": num, "gaussian_ids": None,
    }


def ensure_statistics(model) -> None:
    """gsplat creates the statistics with the default dtype but adds float32 counts and screen
    gradients of the model's dtype: a float64 model needs them made here."""
    state = model.strategy_state
    for key, dtype in (("grad2d", model.means.dtype), ("count", torch.float32)):
        if state.get(key) is None:
            state[key] = torch.zeros(model.num_points, dtype=dtype, device=model.device)


def gather_statistics(model, record: StepRecord, step: int) -> None:
    """The statistics of ``record``'s renders added to the model's strategy state (the rows it holds)."""
    ensure_statistics(model)
    model.strategy.gather_statistics(model.gauss_params, model.strategy_state, step, strategy_info(record, model))
