"""The one retina-gs frame, for every world size: view -> partial per part -> exchange -> composite.

``RetinaFrame`` wraps a ``RetinaGSModel`` that holds the Gaussians of this rank's parts (whole
subtrees, ``core.schedule.Parts``); one process is a ``Comm`` of size 1 with one part holding
every leaf.  The model's ``get_outputs`` (ns-render, ns-eval, the viewer), the pipeline's
training batches and evaluation all render through it.  Per batch of cameras:

1. (batches of more than one camera) which part draws something for which camera: plain mode
   from the projection's cull (a part draws iff one of its Gaussians has a non-zero radius),
   clip mode from the sharing copies (``sharing.parts_reached``), summed over ranks;
2. ``pack_cameras`` / ``assign_owners`` fix the batch and the owner of every camera;
3. clip mode on several ranks: Gaussians that reach other ranks' leaves travel there
   (``sharing.share_rows``, one exchange per batch);
4. every rank renders one partial per (camera, own visible part): plain, its Gaussians sorted
   by (leaf position, depth); clip, its own and received Gaussians clipped to the part's
   leaves, except that one part (one process) has no boundary to clip at and renders ordinarily
   (``RetinaFrame.clips``).  Partials for another rank are cropped to ``content_rect`` (outside
   it a partial is exactly empty), and the rectangles are summed over ranks into the plan;
5. ``exchange_partials`` moves the crops to the owners (autograd-aware); an owner pastes them
   into full frames, composites them in the camera's part order with ``composite``, adds the
   background and computes splatfacto's loss.

The composite equals the whole model's render sorted by (leaf order, depth) in plain mode and
the unpartitioned render in clip mode: images, loss and gradients do not depend on the world
size.  Per-Gaussian appearance recolours each camera's Gaussians, received copies included.

Edits and the crop box (eval mode) are applied by every rank to its own Gaussians (an edit
decides each Gaussian's fate from its own position); a copy that lands in another rank's leaf is
sent there by ``render_set`` (one ``all_to_all_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from jaxtyping import Bool
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import get_viewmat
from torch import Tensor

from landmark_plugin.core.composite import composite, expected_depth, paste_partial
from landmark_plugin.core.edits import edit_gaussians
from landmark_plugin.core.order import camera_leaf_order, order_positions
from landmark_plugin.core.raster_ref import RasterSettings
from landmark_plugin.core.render import Gaussians, camera_center, project, render_partial, resolve_backend
from landmark_plugin.core.render_clip import ClipLeaves, render_partial_clipped
from landmark_plugin.core.schedule import Parts, assign_owners, content_rect, pack_cameras, part_order
from landmark_plugin.distributed.collectives import (
    ExchangePlan,
    Task,
    all_reduce_ints,
    all_reduce_sum,
    all_to_all_rows,
    broadcast_tensor,
    exchange_partials,
)
from landmark_plugin.distributed.groups import Comm
from landmark_plugin.gaussians.appearance import apply_appearance, image_index, tv_loss, with_appearance
from landmark_plugin.gaussians.frame_stats import StepRecord, note_render, strategy_info, visible_rows
from landmark_plugin.gaussians.mcmc import regularisation
from landmark_plugin.gaussians.sharing import join, parts_reached, share_rows


@dataclass
class View:
    """One camera as the rasteriser sees it (after pose correction and downscaling)."""

    viewmat: Tensor  # [4, 4]
    K: Tensor  # [3, 3]
    width: int
    height: int
    positions: Tensor  # [L] place of every leaf in the camera's front-to-back order
    part_order: List[int]  # parts front to back


class RetinaFrame:
    """The frame path of a (possibly sharded) ``RetinaGSModel`` (see module docstring)."""

    def __init__(self, comm: Comm, model, settings: Optional[RasterSettings] = None):
        """``settings``: the rasterisation constants; default gsplat's (which splatfacto uses)
        with the model's ``rasterize_mode``."""
        self.comm = comm
        self.model = model
        self.settings = settings if settings is not None else RasterSettings(rasterize_mode=model.config.rasterize_mode)
        self.parts = Parts.of(model.config.tree_depth, comm.world_size)
        self.my_parts = self.parts.of_rank(comm.rank)
        self.leaf_part = self.parts.leaf_part()
        self._leaf_part_device = self.leaf_part
        self._part_index: Optional[Tuple[tuple, Dict[int, Tensor]]] = None
        self._orders: Dict[tuple, Tuple[Tensor, Tensor]] = {}
        self._orders_tree = None
        self.record = StepRecord()

    @property
    def backend(self) -> str:
        return resolve_backend(self.model.config.backend, self.model.means.device)

    @property
    def clip(self) -> bool:
        return self.model.render_mode(self.backend) == "clip"

    @property
    def one_part(self) -> bool:
        """One part (one process): its region is all of space, with no boundary to clip at, so its
        clipped render is the ordinary render of its Gaussians (DESIGN.md section 3)."""
        return len(self.parts) == 1

    @property
    def clips(self) -> bool:
        """Whether partials are clipped: clip mode with several parts."""
        return not self.one_part and self.clip

    # ---- the Gaussians this rank renders ----------------------------------------------------
    def local_part_index(self, leaf_ids: Tensor) -> Dict[int, Tensor]:
        """Part -> [n] rows of the local Gaussians it owns (``leaf_ids``: [N] their leaves).

        Kept until ``leaf_ids`` changes (densification, repartition, edits make a new tensor or
        bump its version): finding the rows reads their count back from the device.
        """
        key = (leaf_ids, leaf_ids._version)
        cached = self._part_index
        if cached is not None and cached[0][0] is key[0] and cached[0][1] == key[1]:
            return cached[1]
        if len(self.my_parts) == 1:  # one part holds every local row: no search
            index = {self.my_parts[0]: torch.arange(leaf_ids.shape[0], device=leaf_ids.device)}
        else:
            part = self.leaf_part_on(leaf_ids.device)[leaf_ids]
            index = {s: torch.nonzero(part == s).flatten() for s in self.my_parts}
        self._part_index = (key, index)
        return index

    def leaf_part_on(self, device: torch.device) -> Tensor:
        """[L] part of every leaf, on ``device`` (copied there once)."""
        if self._leaf_part_device.device != torch.device(device):
            self._leaf_part_device = self.leaf_part.to(device)
        return self._leaf_part_device

    def stream(self):
        """The ``LeafStream`` of ``offload stream`` while the store streams this rank's Gaussians
        (``gaussians/stream.py``), else None."""
        store = self.model.offload_store
        if store is None or store.stream is None or not store.staged:
            return None
        return store.stream

    def render_set(self) -> Tuple[Gaussians, Tensor]:
        """The activated Gaussians this rank renders and [N] their leaves.

        Training: the local shard.  Eval mode: layout edits applied (collective on several
        ranks: copies that landed in another rank's leaves are received from it), then the
        crop box.
        """
        model = self.model
        gaussians, leaf_ids = model.activated_gaussians(), model.leaf_ids
        if model.training:
            return gaussians, leaf_ids
        if model.layout_edits:
            gaussians, leaf_ids = edit_gaussians(gaussians, leaf_ids, model.layout_edits, model.tree)
            if not self.comm.is_single:
                gaussians, leaf_ids = self._send_to_owners(gaussians, leaf_ids)
        if model.crop_box is not None:
            keep = model.crop_box.within(gaussians.means).squeeze(-1)
            gaussians, leaf_ids = gaussians.take(keep), leaf_ids[keep]
        return gaussians, leaf_ids

    def _send_to_owners(self, gaussians: Gaussians, leaf_ids: Tensor) -> Tuple[Gaussians, Tensor]:
        part_rank = torch.as_tensor(self.parts.rank, device=leaf_ids.device)
        dest = part_rank[self.leaf_part_on(leaf_ids.device)[leaf_ids]]
        rows = torch.cat([gaussians.rows(), leaf_ids[:, None].to(gaussians.means)], dim=1)
        received, _ = all_to_all_rows(self.comm, rows, dest)
        return gaussians.from_rows(received[:, :-1]), received[:, -1].round().long()

    # ---- cameras --------------------------------------------------------------------------
    def view(self, camera: Cameras) -> View:
        """Pose (camera optimiser applied in training), intrinsics and leaf order of one camera.

        Worked out on the host copy of the camera (the pipeline keeps its cameras there): the
        image size and the tree walk need host values, which a device camera would give only
        through a synchronisation; the matrices then travel to the device without one.
        """
        model = self.model
        dtype = model.means.dtype
        host = camera if camera.device.type == "cpu" else camera.to("cpu")
        c2w = model.camera_optimizer.apply_to_camera(host) if model.training else host.camera_to_worlds
        downscale = model._get_downscale_factor() if model.training else 1
        if downscale != 1:
            if host is camera:
                host = camera.to("cpu")  # a new object: rescaling it leaves ``camera`` as it was
            host.rescale_output_resolution(1 / downscale)
        K = host.get_intrinsics_matrices()[0].to(dtype)
        width, height = int(host.width.reshape(-1)[0]), int(host.height.reshape(-1)[0])
        viewmat = get_viewmat(c2w.to(dtype))[0]
        order, positions = self._leaf_order(camera_center(viewmat).detach())
        device = model.device
        return View(
            viewmat.to(device, non_blocking=True), K.to(device, non_blocking=True), width, height,
            positions.to(device, non_blocking=True), part_order(order, self.parts),
        )

    def _leaf_order(self, centre: Tensor) -> Tuple[Tensor, Tensor]:
        """(leaf order, leaf positions) for a camera centre, kept per centre and tree: training
        revisits the same cameras, and the walk is many tiny host ops."""
        tree = self.model.cpu_tree
        if tree is not self._orders_tree or len(self._orders) >= 4096:
            self._orders, self._orders_tree = {}, tree
        key = tuple(centre.tolist())
        found = self._orders.get(key)
        if found is None:
            order = camera_leaf_order(tree, centre)
            found = self._orders[key] = (order, order_positions(order))
        return found

    def sh_degree(self) -> Optional[int]:
        """The SH degree the model renders with at its current step."""
        cfg = self.model.config
        return min(self.model.step // cfg.sh_degree_interval, cfg.sh_degree) if cfg.sh_degree > 0 else None

    @torch.no_grad()
    def visibility(self, cameras: Cameras) -> Bool[Tensor, "P S"]:
        """Which part draws something for which camera (collective)."""
        views = [self.view(cameras[p : p + 1]) for p in range(len(cameras))]
        stream = self.stream()
        if stream is not None:
            return all_reduce_ints(self.comm, stream.visibility(views), "visibility") > 0
        g, leaf_ids = self.render_set()
        if self.clips:
            return parts_reached(self, g, views)
        visible = torch.zeros(len(cameras), len(self.parts), dtype=torch.int64)
        for p, v in enumerate(views):
            radii = project(g, v.viewmat, v.K, v.width, v.height, self.settings, self.backend).radii
            for s, index in self.local_part_index(leaf_ids).items():
                visible[p, s] = int(bool((radii[index] > 0).any()))
        return all_reduce_ints(self.comm, visible, "visibility") > 0

    # ---- one batch ------------------------------------------------------------------------
    def plan_batch(self, cameras: Cameras, max_batch_size: int, max_load: int) -> Tuple[int, Tensor, Tensor]:
        """Batch size B, [B, S] visibility and [B] owners for the queued ``cameras``."""
        if max_batch_size == 1 or len(cameras) == 1:
            # One camera: nothing to balance, and every part is rendered (an invisible part
            # gives an empty partial that is never sent), so no projection pass is needed.
            visible = torch.ones(1, len(self.parts), dtype=torch.bool)
            return 1, visible, assign_owners(visible, self.parts.rank, self.comm.world_size)
        visible = self.visibility(cameras[:max_batch_size])
        size = pack_cameras(visible, self.parts.rank, self.comm.world_size, max_batch_size, max_load)
        return size, visible[:size], assign_owners(visible[:size], self.parts.rank, self.comm.world_size)

    def forward(
        self, cameras: Cameras, visible: Tensor, owners: Tensor, with_depth: bool
    ) -> Tuple[Dict[int, Dict[str, Tensor]], Tensor]:
        """Render, exchange and composite a batch.

        Args:
            cameras: B cameras (the same on every rank).
            visible: [B, S] parts to render per camera.
            owners: [B] owner rank of every camera.

        Returns:
            camera -> splatfacto-style outputs for every camera this rank owns, and the
            exchange anchor (a scalar that must enter the loss, see ``exchange_partials``).
        """
        if not self.model.training:  # training batches are staged by the pipeline, before planning
            self.model.stage_for_render(cameras)
        views = [self.view(cameras if len(cameras) == 1 else cameras[b : b + 1]) for b in range(len(cameras))]
        anchor = self.model.means.new_zeros((), requires_grad=True)
        images = [image_index(cameras, b) for b in range(len(cameras))]
        local, rects, anchor = self._render_local(views, images, visible, owners, with_depth, anchor)
        summed = all_reduce_ints(self.comm, rects, "partial rectangles")  # [B, S, 4]
        channels = (4 if with_depth else 3) + 1
        tasks = []
        for b in range(len(cameras)):
            for s in range(len(self.parts)):
                x0, y0, x1, y1 = summed[b, s].tolist()
                if x1 > x0 and y1 > y0:
                    tasks.append(Task(b, s, self.parts.rank[s], int(owners[b]), (x0, y0, x1, y1), channels))
        plan = ExchangePlan(tuple(tasks), self.comm.world_size)
        index = {(t.camera, t.part): i for i, t in enumerate(tasks)}
        sent = {index[k]: crop for k, crop in local.items() if k in index}
        received, anchor = exchange_partials(self.comm, plan, sent, anchor)
        outputs = {}
        for b in range(len(cameras)):
            if int(owners[b]) == self.comm.rank:
                crops = {tasks[i].part: (received[i], tasks[i].rect) for i in received if tasks[i].camera == b}
                outputs[b] = self._composite(views[b], crops, with_depth)
                outputs[b]["rgb"] = apply_appearance(self.model, outputs[b]["rgb"], images[b])
        return outputs, anchor

    def _render_local(self, views: List[View], images: List[Optional[int]], visible: Tensor, owners: Tensor,
                      with_depth: bool, anchor: Tensor):
        """Every visible own part of every camera (``images``: their training images, for
        per-Gaussian appearance), cropped when it travels; rectangles in a [B, S, 4] table."""
        model = self.model
        model._note_backend(self.backend)
        clip, backend, ordinary = self.clips, self.backend, self.one_part and self.clip
        stream = self.stream()
        record = StepRecord(
            num_cameras=len(views), width=views[0].width, height=views[0].height, sizes=[(v.width, v.height) for v in views],
            training=model.training and torch.is_grad_enabled() and stream is None,
        )
        if stream is not None:  # offload stream: the parts' partials come group by group
            streamed = stream.render_parts(views, visible, with_depth, model.training and torch.is_grad_enabled())
            g, leaf_ids = model.activated_gaussians(), model.leaf_ids
        else:
            streamed = None
            g, leaf_ids = self.render_set()
        n = g.means.shape[0]
        drawn = g
        if clip and not self.comm.is_single:
            record.shared = share_rows(self, g, views, anchor)
            anchor = record.shared.anchor
            drawn = join(g, record.shared.received)
        rects = torch.zeros(len(views), len(self.parts), 4, dtype=torch.int64)
        local: Dict[Tuple[int, int], Tensor] = {}
        absgrad = model.strategy.absgrad
        plain_colors = self.sh_degree() is None
        for b, v in enumerate(views):
            seen = with_appearance(model, drawn, images[b], plain_colors) if streamed is None else drawn
            for s, index in self.local_part_index(leaf_ids).items():
                if streamed is not None:
                    partial = streamed.get((b, s))
                    if partial is None:
                        continue
                elif not bool(visible[b, s]) or (index.numel() == 0 and drawn is g):
                    continue
                elif clip:
                    mask = None if len(self.parts) == 1 else self.leaf_part_on(g.means.device) == s
                    partial = render_partial_clipped(
                        seen, ClipLeaves(model.clip_boxes, v.positions), v.viewmat, v.K, v.width, v.height,
                        self.sh_degree(), self.settings, with_depth=with_depth, backend=backend, absgrad=absgrad,
                        allow_fallback=True, leaf_mask=mask,
                    )
                    rows = torch.arange(n, device=g.means.device)
                else:
                    whole = index.numel() == n  # one part per rank: no gather needed
                    part = seen if whole else seen.take(index)
                    positions = torch.zeros_like(index) if ordinary else v.positions[leaf_ids[index]]
                    partial = render_partial(
                        part, positions, v.viewmat, v.K, v.width, v.height, self.sh_degree(), self.settings,
                        with_depth=with_depth, backend=backend, absgrad=absgrad,
                        num_leaf_positions=1 if ordinary else 2**model.config.tree_depth,
                    )
                    rows = index
                if streamed is None:
                    note_render(record, self.model, partial, rows, b, n)
                packed = torch.cat([partial.color, partial.transmittance], dim=-1)  # [H, W, D + 1]
                if int(owners[b]) == self.comm.rank:  # stays here: no crop, no device sync
                    rects[b, s] = torch.tensor([0, 0, v.width, v.height])
                    local[(b, s)] = packed
                    continue
                x0, y0, x1, y1 = content_rect(partial.color, partial.transmittance)
                if x1 > x0:
                    rects[b, s] = torch.tensor([x0, y0, x1, y1])
                    local[(b, s)] = packed[y0:y1, x0:x1]
        self.record = record
        return local, rects, anchor

    def strategy_info(self) -> Optional[Dict]:
        """The last training batch as gsplat's strategies read it (``frame_stats.strategy_info``)."""
        return strategy_info(self.record, self.model)

    def visible_rows(self) -> Optional[Tensor]:
        """[N] local Gaussians the last training batch saw (``frame_stats.visible_rows``)."""
        return visible_rows(self.record, self.model)

    def _composite(self, v: View, crops: Dict[int, Tuple[Tensor, tuple]], with_depth: bool) -> Dict[str, Tensor]:
        """Owner side: paste the parts' crops and composite them front to back."""
        model = self.model
        background = model._get_background_color().to(model.means.dtype)
        channels = 4 if with_depth else 3
        colors, trans = [], []
        for s in v.part_order:
            if s in crops:
                crop, window = crops[s]
                if window == (0, 0, v.width, v.height):
                    c, t = crop[..., :channels], crop[..., channels:]
                else:
                    c, t = paste_partial(crop[..., :channels], crop[..., channels:], window, v.width, v.height)
                colors.append(c)
                trans.append(t)
        if not colors:  # nothing visible: an empty partial keeps composite's contract
            colors = [model.means.new_zeros(v.height, v.width, channels)]
            trans = [model.means.new_ones(v.height, v.width, 1)]
        full_background = torch.cat([background, background.new_zeros(channels - 3)])
        image, transmittance = composite(colors, trans, full_background)
        alpha = 1.0 - transmittance
        out = {"rgb": torch.clamp(image[..., :3], 0.0, 1.0), "accumulation": alpha, "background": background, "depth": None}
        if with_depth:
            # The depth channel composites like colour, over a zero background.
            depth = expected_depth(image[..., 3:4], transmittance)
            out["depth"] = torch.where(alpha > 0, depth, depth.detach().max())
        return out

    # ---- whole frames -----------------------------------------------------------------------
    def render_camera(self, camera: Cameras, to_every_rank: bool = True) -> Optional[Dict[str, Tensor]]:
        """One camera in the model's current mode (collective): every rank renders its parts,
        rank 0 composites.  Returns splatfacto's outputs on rank 0, and with ``to_every_rank``
        on every rank (so that ns-render's loop runs in lockstep on every rank); else None."""
        owners = torch.zeros(1, dtype=torch.int64)
        visible = torch.ones(1, len(self.parts), dtype=torch.bool)
        with_depth = self.model.config.output_depth_during_training or not self.model.training
        outputs, anchor = self.forward(camera, visible, owners, with_depth)
        out = outputs.get(0)
        if out is not None and self.model.training:
            out["rgb"] = out["rgb"] + 0.0 * anchor  # the backward collectives run on every rank
        if to_every_rank and not self.comm.is_single:
            out = self._broadcast_view(out, int(camera.height.reshape(-1)[0]), int(camera.width.reshape(-1)[0]))
        return out

    def _broadcast_view(self, out: Optional[Dict[str, Tensor]], height: int, width: int) -> Dict[str, Tensor]:
        """Rank 0's composite (rgb, accumulation, depth, background) on every rank, in one broadcast."""
        like = self.model.means.detach()
        packed = like.new_zeros(height * width * 5 + 3)
        if out is not None:
            image = torch.cat([out["rgb"], out["accumulation"], out["depth"]], dim=-1).detach()
            packed = torch.cat([image.reshape(-1), out["background"].reshape(-1)]).to(like)
        packed = broadcast_tensor(self.comm, packed, what="composite of a one-camera render")
        image = packed[:-3].view(height, width, 5)
        return {"rgb": image[..., :3], "accumulation": image[..., 3:4], "depth": image[..., 4:5], "background": packed[-3:]}

    # ---- loss -----------------------------------------------------------------------------
    def batch_loss(self, cameras: Cameras, visible: Tensor, owners: Tensor, batch_of: Callable[[int], Dict[str, Tensor]]
                   ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Dict[int, Dict[str, Tensor]]]:
        """Loss of a batch: mean over its B cameras of splatfacto's per-camera loss.  Each owner
        sums its cameras' losses; ``main_loss`` carries the global value (summed over ranks) for
        logging and the local graph for backward.  ``batch_of``: camera -> nerfstudio batch dict
        ({"image": [H, W, 3|4], ...}), called only for the cameras this rank owns.  Returns the
        loss dict, the metrics dict (reduced over ranks) and the owned cameras' outputs."""
        model = self.model
        with_depth = model.config.output_depth_during_training or not model.training
        outputs, anchor = self.forward(cameras, visible, owners, with_depth)
        size = len(cameras)
        local = 0.0 * anchor
        psnr = model.means.new_zeros(())
        for b, out in outputs.items():
            data = batch_of(b)
            local = local + model.get_loss_dict(out, data)["main_loss"] / size
            psnr = psnr + model.get_metrics_dict(out, data)["psnr"].detach().to(psnr) / size
        total_loss, total_psnr, count = all_reduce_sum(
            self.comm, [local.detach(), psnr, psnr.new_full((), float(model.total_points))], "loss and metrics")
        main_loss = local + (total_loss - local.detach())  # value: global; gradient: local
        losses = {"main_loss": main_loss}
        tv = tv_loss(model)
        if tv is not None:
            losses["tv_loss"] = tv
        if model.training and model.config.strategy.kind == "mcmc":
            losses["mcmc_reg"] = regularisation(model, count)
        return losses, {"psnr": total_psnr, "gaussian_count": count}, outputs
