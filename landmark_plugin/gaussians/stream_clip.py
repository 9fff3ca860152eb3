"""``offload stream`` in clip mode (``gaussians/stream.py``): the reach pass and the two-phase backward.

A group's leaves also draw copies of Gaussians held elsewhere: in other groups of this rank, and
on several ranks in other ranks' groups.  The reach pass runs the sharing rule
(``reached_leaves``) group by group, so that every group's renders hold its own rows, this
rank's rows whose copies land in it, and the guests: rows other ranks sent because their copies
land in this rank's leaves (one ``all_to_all_rows`` per batch, parameters only).  A Gaussian's
gradient is complete only after every group that draws it did its backward, so backward splits:
each group's renders backpropagate into host accumulators (parameter gradients, screen
gradients per camera), the guests' sums travel back to their owners (one ``all_to_all_rows``),
and then each group's own rows take their statistics and visible Adam step from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from landmark_plugin.core.render_clip import reached_leaves
from landmark_plugin.distributed.collectives import all_to_all_rows
from landmark_plugin.gaussians.frame_stats import StepRecord, gather_statistics, visible_rows
from landmark_plugin.gaussians.stream_batch import StreamedBatch, nonfinite_group_, visible_adam_group_


@dataclass
class Guests:
    """Other ranks' Gaussians whose copies land in this rank's groups, for one batch."""

    rows: Tensor  # [M, D] store-layout rows (parameters; zeros elsewhere), in the order received
    leaves: Tensor  # [M] their leaves
    source: Tensor  # [M] the rank that sent each
    groups: Dict[int, Tensor]  # group -> indices (into ``rows``) of the guests it draws
    sent_rows: Tensor  # [K] this rank's host rows it sent, in the order they travelled
    sent_dest: Tensor  # [K] and to which rank

    def held(self, group: int) -> Optional[Tuple[Tensor, Tensor]]:
        index = self.groups.get(group)
        return None if index is None else (self.rows[index], self.leaves[index])


def _note_copies(group_of_leaf, leaf: Tensor, rows: Tensor, b: int, visible: Tensor, groups, reached, drawn) -> None:
    """Copies (their leaves, their rows) of camera ``b`` into ``reached`` / ``drawn`` by group."""
    target = group_of_leaf[leaf]
    for i in torch.unique(target).tolist():
        if i >= 0 and bool(visible[b, groups[i][0]]):
            drawn.setdefault(i, set()).add(b)
            reached.setdefault(i, []).append(rows[target == i])


@torch.no_grad()
def reach(stream, views, visible: Tensor, cameras: Dict[int, List[int]], with_depth: bool):
    """The batch of a clip-mode stream: per group, the cameras it renders for, this rank's rows
    it draws, its own rows' projection radii (what densification and visible Adam count), and
    on several ranks the guests (module doc)."""
    frame, model, store = stream.frame, stream.frame.model, stream.store
    group_of_leaf = torch.full((store.num_leaves,), -1, dtype=torch.int64)
    for i, (_, first, count) in enumerate(stream.groups):
        group_of_leaf[first : first + count] = i
    leaf_rank = torch.as_tensor(frame.parts.rank, dtype=torch.int64)[frame.leaf_part]
    reached: Dict[int, List[Tensor]] = {}
    drawn: Dict[int, set] = {}
    order = list(cameras)
    own = [store.rows_of(stream._mask(i)) for i in order]
    radii, sent_rows, sent_dest = {}, [], []
    for k, j in enumerate(order):
        stream._hold(own, k)
        g = model.activated_gaussians()
        radii[j] = (own[k], torch.zeros(len(views), own[k].numel(), dtype=torch.int32))
        for b in cameras[j]:
            v = views[b]
            copies, r = reached_leaves(g, model.clip_boxes, v.viewmat, v.K, v.width, v.height, frame.settings, frame.backend)
            radii[j][1][b] = r.cpu().to(torch.int32)
            leaf, rows = copies.leaf.cpu(), own[k][copies.gaussian.cpu()]
            _note_copies(group_of_leaf, leaf, rows, b, visible, stream.groups, reached, drawn)
            away = leaf_rank[leaf] != frame.comm.rank
            sent_rows.append(rows[away])
            sent_dest.append(leaf_rank[leaf[away]])
    guests = None
    if not frame.comm.is_single:
        guests = _exchange_guests(stream, views, visible, group_of_leaf, leaf_rank, sent_rows, sent_dest, drawn)
    groups = sorted(drawn)
    empty = torch.zeros(0, dtype=torch.int64)
    rows = {i: torch.unique(torch.cat(reached[i])) if i in reached else empty for i in groups}
    return StreamedBatch(views, with_depth, {i: sorted(drawn[i]) for i in groups}, rows, radii, guests)


def _exchange_guests(stream, views, visible, group_of_leaf, leaf_rank, sent_rows, sent_dest, drawn) -> Guests:
    """Send this rank's rows whose copies land in other ranks' leaves (once per destination),
    receive theirs, and find which of this rank's groups each guest's copies land in (collective)."""
    frame, model, store = stream.frame, stream.frame.model, stream.store
    world = frame.comm.world_size
    rows = torch.cat(sent_rows) if sent_rows else torch.zeros(0, dtype=torch.int64)
    dest = torch.cat(sent_dest) if sent_dest else torch.zeros(0, dtype=torch.int64)
    pairs = torch.unique(rows * world + dest)  # one row per (Gaussian, destination)
    rows, dest = pairs // world, pairs % world
    order = torch.argsort(dest, stable=True)  # the order ``all_to_all_rows`` sends them in
    rows, dest = rows[order], dest[order]
    columns = store._param_columns()
    payload = torch.cat([store.rows.gather(rows, columns), store.leaf_ids[rows, None].to(store.rows.dtype)], dim=1)
    received, source = all_to_all_rows(frame.comm, payload.to(model.device), dest.to(model.device))
    received, source = received.cpu(), source.cpu()
    full = torch.zeros(received.shape[0], store.rows.shape[1], dtype=store.rows.dtype)
    full[:, columns] = received[:, :-1].to(full)
    leaves = received[:, -1].round().long()
    reached: Dict[int, List[Tensor]] = {}
    if received.shape[0]:
        store.hold_rows(torch.zeros(0, dtype=torch.int64), guests=(full, leaves))
        g = model.activated_gaussians()
        for b, v in enumerate(views):
            copies, _ = reached_leaves(g, model.clip_boxes, v.viewmat, v.K, v.width, v.height, frame.settings, frame.backend)
            leaf, index = copies.leaf.cpu(), copies.gaussian.cpu()
            mine = leaf_rank[leaf] == frame.comm.rank
            _note_copies(group_of_leaf, leaf[mine], index[mine], b, visible, stream.groups, reached, drawn)
    groups = {i: torch.unique(torch.cat(parts)) for i, parts in reached.items()}
    stream.guests_received += int(received.shape[0])
    return Guests(full, leaves, source, groups, rows, dest)


def backward_clip(stream, batch, step: int) -> None:
    """Clip mode's backward (module doc): accumulate every group's gradients, return the guests'
    to their owners, then step each group's own rows."""
    model, store, views = stream.frame.model, stream.store, batch.views
    guests = batch.guests
    extra = [guests.sent_rows] if guests is not None else []
    touched = torch.unique(torch.cat(list(batch.rows.values()) + extra))  # accumulators only for these rows
    widths = {name: p[0].numel() for name, p in model.gauss_params.items()}
    grads = {name: torch.zeros(touched.numel(), w, dtype=model.means.dtype) for name, w in widths.items()}
    screen = torch.zeros(touched.numel(), len(views), 4, dtype=model.means.dtype)
    count = guests.rows.shape[0] if guests is not None else 0
    guest_grads = {name: torch.zeros(count, w, dtype=model.means.dtype) for name, w in widths.items()}
    guest_screen = torch.zeros(count, len(views), 4, dtype=model.means.dtype)
    order = list(reversed(list(batch.cameras)))
    rows = [batch.rows[i] for i in order]
    for k, i in enumerate(order):
        stream._hold(rows, k, guests=guests.held(i) if guests is not None else None)
        held = store.index
        at = torch.searchsorted(touched, held)
        mine = guests.groups.get(i) if guests is not None else None
        renders, outs, wanted = [], [], []
        with torch.enable_grad():
            for b in batch.cameras[i]:
                crop = batch.crops.get((i, b))
                if crop is None or crop.color.grad is None:
                    continue
                p = stream._render(views[b], batch.with_depth, i)
                p.means2d.retain_grad()
                x0, y0, x1, y1 = crop.rect
                outs += [p.color[y0:y1, x0:x1], p.transmittance[y0:y1, x0:x1]]
                wanted += [crop.color.grad, crop.trans.grad]
                renders.append((p.means2d, b))
            if outs:
                torch.autograd.backward(outs, wanted)
        n = held.numel()
        for name, param in model.gauss_params.items():
            if param.grad is not None:
                value = param.grad.detach().reshape(param.shape[0], -1).cpu().to(model.means.dtype)
                grads[name].index_add_(0, at, value[:n])
                if mine is not None:
                    guest_grads[name].index_add_(0, mine, value[n:])
            param.grad = None
        for means2d, b in renders:
            for half, value in ((0, means2d.grad), (2, getattr(means2d, "absgrad", None))):
                if value is not None:
                    value = value[0].detach().cpu().to(screen)
                    screen[at, b, half : half + 2] += value[:n]
                    if mine is not None:
                        guest_screen[mine, b, half : half + 2] += value[n:]
    if guests is not None:
        _return_guests(stream, guests, touched, grads, screen, guest_grads, guest_screen)
    _step_clip(stream, batch, step, touched, grads, screen)


def _return_guests(stream, guests: Guests, touched, grads, screen, guest_grads, guest_screen) -> None:
    """The guests' gradients back to their owners, summed into theirs (collective)."""
    names = list(grads)
    payload = torch.cat([guest_grads[name] for name in names] + [guest_screen.reshape(guest_screen.shape[0], -1)], dim=1)
    device = stream.frame.model.device
    back, _ = all_to_all_rows(stream.frame.comm, payload.to(device), guests.source.to(device))
    back = back.cpu()  # grouped by the rank that drew them, each in the order this rank sent them
    at = torch.searchsorted(touched, guests.sent_rows)
    col = 0
    for name in names:
        width = grads[name].shape[1]
        grads[name].index_add_(0, at, back[:, col : col + width].to(grads[name]))
        col += width
    screen.index_add_(0, at, back[:, col:].reshape(-1, *screen.shape[1:]).to(screen))


def _step_clip(stream, batch, step: int, touched: Tensor, grads: Dict[str, Tensor], screen: Tensor) -> None:
    """Each group's own rows: statistics from the accumulated screen gradients (rows of
    ``touched``) and the reach pass's radii, then visible Adam on the accumulated gradients."""
    model, store, views = stream.frame.model, stream.store, batch.views
    seen = [(rows, radii) for rows, radii in batch.own.values() if bool((radii > 0).any())]
    own = [rows for rows, _ in seen]
    adam_step = None
    for k, (_, radii) in enumerate(seen):
        stream._hold(own, k, changing=True)
        held, device, n = store.index, model.device, store.index.numel()
        at = torch.searchsorted(touched, held).clamp(max=max(touched.numel() - 1, 0))
        hit = (touched[at] == held)[:, None] if touched.numel() else torch.zeros(n, 1, dtype=torch.bool)
        for name, param in model.gauss_params.items():
            value = torch.where(hit, grads[name][at], 0.0) if touched.numel() else grads[name].new_zeros(n, grads[name].shape[1])
            param.grad = value.to(device).reshape(param.shape).to(param.dtype)
        if nonfinite_group_(model, step, f"group {k} of this rank's own rows"):
            stream.nonfinite_groups += 1
            continue
        record = StepRecord(num_cameras=len(views), width=views[0].width, height=views[0].height,
                            sizes=[(v.width, v.height) for v in views], training=True)
        for b in range(len(views)):
            stand_in = model.means.new_zeros(1, n, 2)
            values = torch.where(hit, screen[at, b], 0.0) if touched.numel() else screen.new_zeros(n, 4)
            stand_in.grad = values[None, :, :2].to(device, stand_in.dtype)
            stand_in.absgrad = values[None, :, 2:].to(device, stand_in.dtype)
            record.means2d.append((stand_in, torch.arange(n, device=device), b))
            record.radii[b] = radii[b].to(device)
        gather_statistics(model, record, step)
        adam_step = visible_adam_group_(model, visible_rows(record, model), adam_step)


@torch.no_grad()
def clip_visibility(stream, views) -> Tensor:
    """[P, S] whether a copy of this rank's Gaussians lands in part s for view p (to be summed
    over ranks, as ``sharing.parts_reached``)."""
    frame, model, store = stream.frame, stream.frame.model, stream.store
    met = torch.zeros(len(views), len(frame.parts), dtype=torch.int64)
    everything = torch.ones(len(views), len(frame.parts), dtype=torch.bool)
    groups = stream._cameras(views, everything)
    rows = [store.rows_of(stream._mask(i)) for i in groups]
    for k, (i, cams) in enumerate(groups.items()):
        stream._hold(rows, k)
        g = model.activated_gaussians()
        for b in cams:
            v = views[b]
            copies, _ = reached_leaves(g, model.clip_boxes, v.viewmat, v.K, v.width, v.height, frame.settings, frame.backend)
            met[b, torch.unique(frame.leaf_part[copies.leaf.cpu()])] = 1
    return met
