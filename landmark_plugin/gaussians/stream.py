"""retina-gs streamed inside the frame (``--pipeline.model.offload stream``): a batch's Gaussians
pass through the GPU one subtree at a time, so the GPU never holds more than one subtree's rows.

``offload host`` (``gaussians/offload.py``) stages the leaves a batch can draw; a city camera
sees most of the city, so that bounds the count by what a whole view needs.  Streaming cuts the
batch itself: the leaves of this rank's parts are grouped into subtrees of
``offload_stream_depth`` (contiguous in every camera's front-to-back leaf order, as parts are),
and a training step makes three passes over the groups a batch can draw (``leaves_in_view``):

1. forward, without autograd: each group renders its partial for every camera that can see it
   (plain rule: its Gaussians sorted by leaf position, then depth), cropped to its content;
   the crops become leaf tensors.  The part's partial is their composite in the camera's
   order (``core.composite``): the frame goes on from there as in memory (exchange,
   composite, loss), and backward stops at the crops;
2. ``backward_step_`` (before the optimiser step): each group again renders its partials,
   now with autograd, and takes the crops' gradients; its densification statistics are
   gathered, and its rows take visible Adam's step (a group's Gaussians draw only in their
   own partials, so their gradient is complete); the rows go back to host memory;
3. refinement (``step_post_backward``) runs on every Gaussian in host memory as with host.

The composite of a part's groups equals its one render (partials of contiguous leaf runs,
the rule several ranks already rely on), so with visible Adam a streamed run is the
in-memory run.  The Gaussian groups' optimisers then have no gradient left to step.

Clip mode (``gaussians/stream_clip.py``): a group's leaves also draw copies of Gaussians held in
other groups and, on several ranks, on other ranks.  A reach pass runs the sharing rule group by
group and exchanges the rows that cross ranks (as guests, parameters only); backward gathers
every group's gradients in host accumulators, returns the guests' to their owners, and then
steps each group's own rows.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from landmark_plugin.core.composite import composite, paste_partial
from landmark_plugin.core.render import Partial, project, render_partial
from landmark_plugin.core.render_clip import ClipLeaves, render_partial_clipped
from landmark_plugin.core.schedule import content_rect
from landmark_plugin.gaussians.frame_stats import StepRecord, gather_statistics, note_render, visible_rows
from landmark_plugin.gaussians.stream_batch import GroupCrop, StreamedBatch, nonfinite_group_, visible_adam_group_
from landmark_plugin.gaussians.stream_clip import backward_clip, clip_visibility, reach


class LeafStream:
    """The passes of a streamed batch over the groups of a frame's parts (see module doc)."""

    def __init__(self, frame, store):
        self.frame = frame
        self.store = store
        self.pending: Optional[StreamedBatch] = None
        self.groups = self._groups()
        self.streamed_batches = 0  # training batches stepped group by group (for the tests)
        self.guests_received = 0  # clip on several ranks: other ranks' rows drawn here, all batches
        self.nonfinite_groups = 0  # groups not stepped for a NaN / Inf gradient, all batches

    def _groups(self) -> List[Tuple[int, int, int]]:
        """(part, first leaf, number of leaves) of every group of this rank: each part cut into
        subtrees of ``offload_stream_depth`` (a part shallower than that is one group)."""
        frame = self.frame
        depth = frame.model.config.tree_depth
        per = 2 ** (depth - min(frame.model.config.offload_stream_depth, depth))
        groups = []
        for s in frame.my_parts:
            first, count = frame.parts.first_leaf[s], frame.parts.num_leaves[s]
            size = min(per, count)
            groups += [(s, f, size) for f in range(first, first + count, size)]
        return groups

    def _hold(self, rows: List[Tensor], k: int, changing: bool = False, guests=None) -> None:
        """Hold the host rows ``rows[k]`` (and ``guests``, another rank's rows) and start sending
        ``rows[k + 1]`` while they render."""
        self.store.hold_rows(rows[k], changing, guests)
        if k + 1 < len(rows):
            self.store.send_ahead(rows[k + 1], changing)

    def _mask(self, group: int) -> Tensor:
        _, first, count = self.groups[group]
        mask = torch.zeros(self.store.num_leaves, dtype=torch.bool)
        mask[first : first + count] = True
        return mask

    def _cameras(self, views, visible: Tensor) -> Dict[int, List[int]]:
        """group -> the cameras that can see one of its leaves (and render its part)."""
        needed = [self.store.leaves_needed([v]) for v in views]
        out = {}
        for i, (s, first, count) in enumerate(self.groups):
            cams = [b for b, n in enumerate(needed) if bool(visible[b, s]) and bool(n[first : first + count].any())]
            if cams:
                out[i] = cams
        return out

    def _render(self, v, with_depth: bool, group: int) -> Partial:
        """The held rows' partial of ``group`` for view ``v``: plain, the held rows are the group's;
        clip, they include other groups' Gaussians that reach its leaves, and only copies in its
        leaves are drawn (the sharing rule decides over every leaf, as in the whole render)."""
        frame, model = self.frame, self.frame.model
        g = model.activated_gaussians()
        absgrad = model.strategy.absgrad
        if frame.clip:
            return render_partial_clipped(
                g, ClipLeaves(model.clip_boxes, v.positions), v.viewmat, v.K, v.width, v.height, frame.sh_degree(),
                frame.settings, with_depth=with_depth, backend=frame.backend, absgrad=absgrad, allow_fallback=True,
                leaf_mask=self._mask(group).to(model.device),
            )
        return render_partial(
            g, v.positions[model.leaf_ids], v.viewmat, v.K, v.width, v.height, frame.sh_degree(), frame.settings,
            with_depth=with_depth, backend=frame.backend, absgrad=absgrad, num_leaf_positions=2**model.config.tree_depth,
        )

    # ---- pass 1 -----------------------------------------------------------------------------
    def render_parts(self, views, visible: Tensor, with_depth: bool, training: bool) -> Dict[Tuple[int, int], Partial]:
        """(camera, part) -> the part's partial, composited from its groups' crops (module doc, 1)."""
        cameras = self._cameras(views, visible)
        if self.frame.clip:
            batch = reach(self, views, visible, cameras, with_depth)
        else:
            batch = StreamedBatch(views, with_depth, cameras, {i: self.store.rows_of(self._mask(i)) for i in cameras})
        order = list(batch.cameras)
        rows = [batch.rows[i] for i in order]
        for k, (i, cams) in enumerate(batch.cameras.items()):
            self._hold(rows, k, guests=batch.guests.held(i) if batch.guests is not None else None)
            with torch.no_grad():
                for b in cams:
                    p = self._render(views[b], with_depth, i)
                    x0, y0, x1, y1 = content_rect(p.color, p.transmittance)
                    if x1 <= x0:
                        continue
                    color, trans = p.color[y0:y1, x0:x1].clone(), p.transmittance[y0:y1, x0:x1].clone()
                    batch.crops[(i, b)] = GroupCrop((x0, y0, x1, y1), color.requires_grad_(training), trans.requires_grad_(training))
        self.pending = batch if training else None
        return {key: self._composite(batch, *key) for key in self._drawn(batch, visible)}

    def _drawn(self, batch: StreamedBatch, visible: Tensor) -> List[Tuple[int, int]]:
        return [(b, s) for b in range(len(batch.views)) for s in self.frame.my_parts if bool(visible[b, s])]

    def _composite(self, batch: StreamedBatch, b: int, s: int) -> Partial:
        v = batch.views[b]
        mine = [i for i, g in enumerate(self.groups) if g[0] == s and (i, b) in batch.crops]
        mine.sort(key=lambda i: int(v.positions[self.groups[i][1]]))  # a subtree is contiguous in the order
        like = self.frame.model.means
        channels = 4 if batch.with_depth else 3
        if not mine:
            color = like.new_zeros(v.height, v.width, channels)
            return Partial(color, like.new_ones(v.height, v.width, 1), like.new_zeros(1, 0, 2), like.new_zeros(1, 0))
        pasted = [paste_partial(c.color, c.trans, c.rect, v.width, v.height) for c in (batch.crops[(i, b)] for i in mine)]
        color, trans = composite([p[0] for p in pasted], [p[1] for p in pasted])
        return Partial(color, trans, like.new_zeros(1, 0, 2), like.new_zeros(1, 0))

    @torch.no_grad()
    def visibility(self, views) -> Tensor:
        """[P, S] whether this rank's part s draws something for view p (radius > 0), group by group;
        in clip mode whether a copy of this rank's Gaussians lands in part s."""
        frame = self.frame
        if frame.clip:
            return clip_visibility(self, views)
        visible = torch.zeros(len(views), len(frame.parts), dtype=torch.int64)
        everything = torch.ones(len(views), len(frame.parts), dtype=torch.bool)
        groups = self._cameras(views, everything)
        rows = [self.store.rows_of(self._mask(i)) for i in groups]
        for k, (i, cams) in enumerate(groups.items()):
            self._hold(rows, k)
            g = frame.model.activated_gaussians()
            for b in cams:
                v = views[b]
                if bool((project(g, v.viewmat, v.K, v.width, v.height, frame.settings, frame.backend).radii > 0).any()):
                    visible[b, self.groups[i][0]] = 1
        return visible

    # ---- pass 2 -----------------------------------------------------------------------------
    def backward_step_(self, step: int) -> bool:
        """Re-render each group with autograd, take its crops' gradients, gather its statistics
        and step its rows (module doc, 2).  False when the last forward left nothing to step."""
        batch, self.pending = self.pending, None
        if batch is None:
            return False
        if batch.own is not None:
            backward_clip(self, batch, step)
            self.streamed_batches += 1
            return True
        model = self.frame.model
        views = batch.views
        adam_step = None
        # Backward walks the groups in reverse: the forward's last group is still held.
        order = list(reversed(list(batch.cameras)))
        rows = [batch.rows[i] for i in order]
        for k, i in enumerate(order):
            cams = batch.cameras[i]
            # Every camera the cull keeps, also where the partial is empty: a Gaussian with a
            # radius there counts for densification and takes visible Adam's step, as in memory.
            self._hold(rows, k, changing=True)
            n = model.num_points
            record = StepRecord(num_cameras=len(views), width=views[0].width, height=views[0].height,
                                sizes=[(v.width, v.height) for v in views], training=True)
            outs, grads = [], []
            with torch.enable_grad():
                for b in cams:
                    p = self._render(views[b], batch.with_depth, i)
                    note_render(record, model, p, torch.arange(n, device=model.device), b, n)
                    crop = batch.crops.get((i, b))
                    if crop is not None and crop.color.grad is not None:
                        x0, y0, x1, y1 = crop.rect
                        outs += [p.color[y0:y1, x0:x1], p.transmittance[y0:y1, x0:x1]]
                        grads += [crop.color.grad, crop.trans.grad]
                if outs:
                    torch.autograd.backward(outs, grads)
            if nonfinite_group_(model, step, f"subtree at leaf {self.groups[i][1]}"):
                self.nonfinite_groups += 1
                continue
            gather_statistics(model, record, step)
            adam_step = visible_adam_group_(model, visible_rows(record, model), adam_step)
        self.streamed_batches += 1
        return True
