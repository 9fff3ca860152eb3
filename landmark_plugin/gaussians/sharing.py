"""Clip mode across ranks: every rank hands the Gaussians that reach other ranks' leaves to them.

RetinaGS's rule draws a Gaussian in every leaf its ray points reach (``core.clip``).  On one
process all leaves render from one set; on several, a rank's partial covers its own leaves
only, so for a batch of cameras each rank decides, with the sharing rule of the renderer it
uses (``render_clip.reached_leaves``: same projection, same reach boxes), which of its
Gaussians land in a leaf of another rank for at least one camera, and sends those rows there
in one ``exchange_rows`` per batch.  The receiver renders them beside its own Gaussians,
clipped to its leaves (``render_partial_clipped(leaf_mask=...)``), so every (Gaussian, leaf)
copy is drawn exactly once, by the leaf's rank, as in the whole render.

The exchange is autograd-aware: the copies' gradients return to the owner and are summed
into its parameters; in the same backward collective, the screen-space gradients of the
copies (gsplat's densification statistics: ``means2d.grad`` and ``absgrad`` per camera) return
too (``CopyStats``), so the owner's strategy sees the sum over all copies, as in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.render import Gaussians
from landmark_plugin.core.render_clip import reached_leaves
from landmark_plugin.distributed.collectives import RowPayload, all_reduce_ints, exchange_rows


class CopyStats(RowPayload):
    """Screen-space gradients of copies drawn on other ranks, per camera, back to their owner.

    Receiver side: ``renders`` lists, per (camera, part) render, the render's ``means2d``
    (its rows from ``first`` on are the received Gaussians).  Owner side: ``remote`` [N, B, 4]
    (gradient x, y, then absgrad x, y) after the backward.
    """

    def __init__(self, num_cameras: int, num_local: int, like: Tensor):
        self.num_cameras = num_cameras
        self.width = 4 * num_cameras
        self.renders: List[Tuple[Tensor, int, int]] = []
        self.remote = like.new_zeros(num_local, num_cameras, 4)

    def collect(self, num_received: int) -> Float[Tensor, "M E"]:
        out = self.remote.new_zeros(num_received, self.num_cameras, 4)
        for means2d, first, b in self.renders:
            grad = means2d.grad
            if grad is not None:
                out[:, b, :2] += grad[0, first : first + num_received].to(out)
            absgrad = getattr(means2d, "absgrad", None)
            if absgrad is not None:
                out[:, b, 2:] += absgrad[0, first : first + num_received].to(out)
        return out.reshape(num_received, -1)

    def deliver(self, sent_rows: Int[Tensor, " K"], values: Float[Tensor, "K E"]) -> None:
        self.remote.index_add_(0, sent_rows, values.view(-1, self.num_cameras, 4).to(self.remote))


@dataclass
class Shared:
    """What the exchange of one batch gives a rank.

    Attributes:
        received: the Gaussians other ranks sent (activated, differentiable).
        radii: per camera, [N] projection radii of this rank's own Gaussians (densification
            counts them whether or not this rank draws them).
        stats: the copies' screen gradients (``CopyStats``).
        anchor: chain it into the loss (see ``exchange_rows``).
    """

    received: Gaussians
    radii: List[Tensor]
    stats: CopyStats
    anchor: Tensor


def _leaf_ranks(frame) -> Int[Tensor, " L"]:
    part_rank = torch.as_tensor(frame.parts.rank, dtype=torch.int64)
    return part_rank[frame.leaf_part]


@torch.no_grad()
def parts_reached(frame, gaussians: Gaussians, views) -> Bool[Tensor, "B S"]:
    """Which part any Gaussian of any rank is drawn in, per camera (collective): the
    visibility of clip mode (a part whose own Gaussians are all culled may still draw copies)."""
    boxes = frame.model.clip_boxes
    met = torch.zeros(len(views), len(frame.parts), dtype=torch.int64)
    for b, v in enumerate(views):
        copies, _ = reached_leaves(gaussians, boxes, v.viewmat, v.K, v.width, v.height, frame.settings, frame.backend)
        parts = torch.unique(frame.leaf_part.to(copies.leaf.device)[copies.leaf]).cpu()
        met[b, parts] = 1
    return all_reduce_ints(frame.comm, met, "parts reached by clip copies") > 0


def share_rows(frame, gaussians: Gaussians, views, anchor: Tensor) -> Shared:
    """Send every local Gaussian to each other rank whose leaves it reaches for a camera of the
    batch (collective); receive theirs."""
    comm, boxes = frame.comm, frame.model.clip_boxes
    n = gaussians.means.shape[0]
    leaf_rank = _leaf_ranks(frame).to(gaussians.means.device)
    send = torch.zeros(n, comm.world_size, dtype=torch.bool, device=gaussians.means.device)
    radii = []
    for v in views:
        copies, r = reached_leaves(gaussians, boxes, v.viewmat, v.K, v.width, v.height, frame.settings, frame.backend)
        send[copies.gaussian, leaf_rank[copies.leaf]] = True
        radii.append(r.to(torch.int32))
    dests = [torch.nonzero(send[:, r]).flatten() for r in range(comm.world_size)]
    stats = CopyStats(len(views), n, gaussians.means)
    received, _, anchor = exchange_rows(comm, gaussians.rows(), dests, anchor, stats)
    return Shared(gaussians.from_rows(received), radii, stats, anchor)


def join(own: Gaussians, other: Optional[Gaussians]) -> Gaussians:
    """Own Gaussians first, then the received ones (renders index the received from ``len(own)``)."""
    if other is None or other.means.shape[0] == 0:
        return own
    return Gaussians(*(torch.cat([a, b.to(a.dtype)]) for a, b in zip(own.fields(), other.fields())))
