"""retina-gs out of core (``--pipeline.model.offload host``): this rank's Gaussians live in host
memory, and each training batch stages only the leaves its cameras can draw.

The store keeps every row of the shard (parameters, Adam moments, densification statistics: the
``rows.gaussian_rows`` columns, held per layout entry by ``host_rows.HostRows`` so that the shard
is never in host memory twice) and the leaf of every row.  Before a
batch renders, ``stage`` writes the rows the model holds back to the store and gives the model the
rows of the leaves ``core.frustum.leaves_in_view`` keeps for any camera of the batch.  A leaf
left behind holds no Gaussian the projection keeps, so the image, the loss and every gradient are
the in-memory run's; with visible Adam (which offload requires) a Gaussian no camera drew is not
stepped, so the rows left on the host are exactly what the in-memory run has too.

While a batch renders, ``prefetch`` copies the next batch's leaves that are not held to the GPU on
a second CUDA stream (through a pinned buffer of those rows); ``stage`` then takes them from there.  Rows a batch lets
go travel back the same way: their copy to pinned memory is queued on that stream and lands in
the store at the next ``stage`` (or before anything else reads the store), so neither direction
waits for the GPU.

With ``offload stream`` the store does not stage batches: ``gaussians/stream.py`` holds one subtree
at a time through ``hold_leaves`` / ``send_ahead`` (the same upload, write-back and copy stream).

Steps that need every Gaussian (refinement, opacity reset, ownership refresh, tree rebuild) and
checkpoints ``materialize`` the store in host memory: the model holds every row there (gsplat's
strategy and the row helpers are device-agnostic torch) until the next batch stages; the
statistics of that step's batch are gathered on the staged rows first.  Renders outside training
(eval, ns-render, the viewer) stage their camera's leaves the same way.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.core.frustum import LeafBounds, leaves_in_view
from landmark_plugin.config_checks import check_offload
from landmark_plugin.gaussians.host_rows import HostRows
from landmark_plugin.gaussians.rows import gaussian_rows, layout_columns, set_gaussian_rows_


class OffloadStore:
    """Host copy of one rank's Gaussians and which of its rows the model holds (see module doc)."""

    def __init__(self, model):
        self.model = model
        self.rows: Optional[HostRows] = None  # [N, D] host, every row of the shard while staged
        self.layout = None
        self.leaf_ids: Optional[Tensor] = None  # [N] host
        self.bounds: Optional[LeafBounds] = None
        self.index: Optional[Tensor] = None  # [n] host rows the model holds, in its order; None: all
        self.step = 0  # stage calls so far
        self.last_needed = torch.zeros(2**model.config.tree_depth, dtype=torch.int64)  # per leaf: the last stage that needed it
        self.staged_rows: list = []  # (rows held, rows in all) per batch (for the benchmark and the tests)
        self.uploaded_rows: list = []  # rows uploaded per batch
        self.prefetched_rows: list = []  # of those, rows a prefetch had already sent
        self.written_back_rows: list = []  # rows let go per batch (their write-back overlaps the next)
        self.held_back_rows: list = []  # rows a prefetch left to the next stage (write-back on its way)
        self._prefetched: Optional[tuple] = None  # (host rows, their copy on the device, copy done event)
        self._pending: list = []  # write-backs on their way: (host rows, their values, copy done event)
        self._stream = None  # CUDA: the copy stream of prefetches and write-backs
        self._changed = False  # stream: a step changed the held rows since they were uploaded
        self._stale = False  # stream: ... and their leaves' bounds since
        self._render_only = False  # stream: the held rows came without moments and statistics
        self._guests = 0  # stream, clip on several ranks: other ranks' rows held after this rank's
        self.stream = None  # offload stream: the frame's passes (``gaussians/stream.py``)

    @property
    def staged(self) -> bool:
        return self.index is not None

    def reset(self) -> None:
        """Forget the host copy (the model's rows were replaced, e.g. by loading a checkpoint)."""
        self.rows = self.layout = self.leaf_ids = self.bounds = self.index = self._prefetched = None
        self._pending = []
        self._changed = self._stale = self._render_only = False
        self._guests = 0

    # ---- moving rows ------------------------------------------------------------------------
    def _optimizers(self) -> Optional[Dict]:
        return getattr(self.model, "optimizers", None)

    def _capture(self) -> None:
        """The model holds every row: copy them all to the host."""
        model = self.model
        self.rows = HostRows.capture(model, self._optimizers(), model.strategy_state)
        self.layout = self.rows.layout
        self.leaf_ids = model.leaf_ids.detach().cpu()
        self.bounds = self._bounds_of(self.rows, self.leaf_ids)

    def _held_rows(self) -> Tensor:
        """[n, D] the rows the model holds (in ``self.index`` order), checked against the store."""
        model = self.model
        rows, layout = gaussian_rows(model, self._optimizers(), model.strategy_state)
        if rows.shape[0] != self.index.numel() or layout != self.layout:
            raise RuntimeError("offload: the staged Gaussians changed outside a materialized step")
        return rows

    def _write_back(self) -> None:
        """Every held row replaces its host copy (rows held for rendering only are the store's)."""
        self._flush()
        if not self._render_only:
            self.rows[self.index] = self._held_rows().to(self.rows.device)

    def _copy_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _write_back_later(self, index: Tensor, rows: Tensor) -> None:
        """Queue the host rows ``index`` to take ``rows`` (on the model's device): on CUDA copied
        into pinned memory on the copy stream; ``_flush`` writes them into the store."""
        if rows.device.type != "cuda":
            self._pending.append((index, rows, None))  # the same bookkeeping on the CPU (rows: an indexed copy)
            return
        buffer = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        stream = self._copy_stream(rows.device)
        stream.wait_stream(torch.cuda.current_stream(rows.device))  # the rows' last optimiser step
        with torch.cuda.stream(stream):
            buffer.copy_(rows, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        rows.record_stream(stream)  # made on the main stream, read on the copy stream
        self._pending.append((index, buffer, done))

    def _flush(self) -> None:
        """Land the queued write-backs in the store (waiting for copies still on their way)."""
        for index, values, done in self._pending:
            if done is not None:
                done.synchronize()
            self.rows[index] = values
        self._pending = []

    def _pending_rows(self) -> Tensor:
        """[N] host rows with a write-back on its way."""
        mask = torch.zeros(self.rows.shape[0], dtype=torch.bool)
        for index, _, _ in self._pending:
            mask[index] = True
        return mask

    def _bounds_of(self, rows, leaf_ids: Tensor) -> LeafBounds:
        """Bounds of the leaves of ``rows`` (the store's ``HostRows`` or held [n, D] rows)."""
        columns = layout_columns(self.layout)
        take = rows.entry if isinstance(rows, HostRows) else (lambda span: rows[:, span])
        means, scales = take(columns[("means", "param")]), torch.exp(take(columns[("scales", "param")]))
        return LeafBounds.of(means, scales, leaf_ids, self.num_leaves)

    @property
    def num_leaves(self) -> int:
        return 2**self.model.config.tree_depth

    def _hold(self, index: Optional[Tensor], device: torch.device) -> None:
        """The model holds the rows ``index`` of the host copy (None: all of them) on ``device``."""
        if index is None:
            self.rows.hold_all(self.model, self._optimizers(), self.model.strategy_state, device)
            self.model.leaf_ids = self.leaf_ids.to(device)
        else:
            self._set(self.rows[index].to(device, non_blocking=True), self.leaf_ids[index].to(device))
        self.index = index
        self._guests = 0

    def _set(self, rows: Tensor, leaf_ids: Tensor) -> None:
        model = self.model
        set_gaussian_rows_(model, self._optimizers(), model.strategy_state, rows, self.layout)
        model.leaf_ids = leaf_ids

    # ---- the two operations -----------------------------------------------------------------
    def stage(self, views) -> None:
        """Hold the leaves that any of ``views`` (``frame.View``) can draw, keeping leaves already
        held while they fit ``offload_budget_gb`` (most recently needed first): only leaves that
        were not held are uploaded, only leaves let go are written back."""
        self.step += 1
        self._flush()  # the last stage's write-backs: copied while that batch trained
        if self.index is None or self._render_only:  # rows a stream held to render are the store's as they are
            if self.index is None:
                self._capture()
            held_rows, held = None, torch.zeros(self.num_leaves, dtype=torch.bool)
            self._render_only = False
        else:
            held_rows = self._held_rows()
            held_leaf, held = self.leaf_ids[self.index], self._held_leaves()
            device_leaf = held_leaf.to(held_rows.device)
            self.bounds.update_(_cpu_bounds(self._bounds_of(held_rows, device_leaf)), self._whole(held))  # they moved
        needed = self.leaves_needed(views)
        self.last_needed[needed] = self.step
        keep = needed | self._cached(held & ~needed, needed)
        upload = torch.nonzero(keep[self.leaf_ids] & ~held[self.leaf_ids]).flatten()
        if held_rows is None:
            self._prefetched = None
            self._hold(upload, self.model.device)
        elif bool((keep != held).any()):
            stay = keep[held_leaf]
            gone = ~stay
            if bool(gone.any()):  # not read before the next stage: uploads now are of other leaves
                self._write_back_later(self.index[gone], held_rows[gone.to(held_rows.device)])
                self.written_back_rows.append(int(gone.sum()))
            stay_dev = stay.to(held_rows.device)
            device = held_rows.device
            index, order = torch.sort(torch.cat([self.index[stay], upload]))
            # In host order, as the in-memory model holds them: renders then sum in the same order.
            rows = torch.cat([held_rows[stay_dev], self._upload(upload, device)])[order.to(device)]
            self._set(rows, self.leaf_ids[index].to(device))
            self.index = index
        self.staged_rows.append((int(self.index.numel()), int(self.rows.shape[0])))
        self.uploaded_rows.append(int(upload.numel()))

    def _held_leaves(self) -> Tensor:
        """[L] leaves whose rows the model holds."""
        held = torch.zeros(self.num_leaves, dtype=torch.bool)
        held[self.leaf_ids[self.index]] = True
        return held

    def leaves_needed(self, views) -> Tensor:
        """[L] leaves any of ``views`` can draw."""
        if self._stale:
            self._refresh_bounds()
        needed = torch.zeros(self.num_leaves, dtype=torch.bool)
        settings = self.model.frame.settings
        for v in views:
            needed |= leaves_in_view(self.bounds, v.viewmat, v.K, v.width, v.height, settings).cpu()
        return needed

    # ---- offload stream: one group of leaves at a time (``gaussians/stream.py``) -------------
    def begin_stream(self) -> None:
        """Streaming starts from what the model holds: every row, copied to the store."""
        if self.index is None:
            self._capture()
            self.index = torch.arange(self.rows.shape[0])

    def rows_of(self, leaves: Tensor) -> Tensor:
        """[n] host rows (ascending) of the leaves marked in ``leaves`` [L]."""
        self.begin_stream()
        return torch.nonzero(leaves[self.leaf_ids]).flatten()

    def hold_leaves(self, leaves: Tensor, changing: bool = False) -> None:
        self.hold_rows(self.rows_of(leaves), changing)

    def hold_rows(self, index: Tensor, changing: bool = False, guests: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        """Hold exactly the host rows ``index`` (ascending).  Rows a step changed go back to the
        store first (queued, as ``stage``'s); ``changing``: the new rows are about to be stepped.
        Rows held only to render travel without their moments and statistics (zeros on the
        device, never written back): a third of the bytes with SH degree 3.  ``guests``: (rows
        [M, D], leaves [M]) of another rank's Gaussians, held after this rank's to render only."""
        self.begin_stream()
        if guests is not None and changing:
            raise ValueError("another rank's Gaussians are held to render only")
        same = guests is None and not self._guests and index.numel() == self.index.numel() and torch.equal(index, self.index)
        if same and not (changing and self._render_only):
            self._changed |= changing
            self._stale |= changing
            return
        if self._changed:
            held_rows = self._held_rows()
            if self._stale:
                self._refresh_bounds(held_rows)
            self._write_back_later(self.index, held_rows)
        if self._pending and bool(self._pending_rows()[index].any()):
            self._flush()
        device = self.model.device
        columns = None if changing else self._param_columns()
        rows, leaves = self._upload(index, device, columns), self.leaf_ids[index].to(device)  # from ``send_ahead`` where it can
        if guests is not None:
            rows, leaves = torch.cat([rows, guests[0].to(rows)]), torch.cat([leaves, guests[1].to(leaves)])
        self._set(rows, leaves)
        self._guests = 0 if guests is None else int(guests[0].shape[0])
        self.index = index
        self._changed = self._stale = changing
        self._render_only = not changing

    def send_ahead(self, index: Tensor, changing: bool = False) -> None:
        """Start copying the host rows ``index`` to the device (``prefetch``'s copy), for the
        ``hold_rows(index, changing)`` after the one in progress."""
        if self._pending:
            index = index[~self._pending_rows()[index]]
        self._send(index, None if changing else self._param_columns())

    def _param_columns(self) -> Tensor:
        """The columns of the parameters in the store's rows (what a render reads)."""
        spans = [s for (_, kind), s in layout_columns(self.layout).items() if kind == "param"]
        return torch.cat([torch.arange(s.start, s.stop) for s in spans])

    def _refresh_bounds(self, held_rows: Optional[Tensor] = None) -> None:
        """The held leaves' bounds from their rows as they are now (a step moved them)."""
        held_rows = self._held_rows() if held_rows is None else held_rows
        device_leaf = self.leaf_ids[self.index].to(held_rows.device)
        self.bounds.update_(_cpu_bounds(self._bounds_of(held_rows, device_leaf)), self._whole(self._held_leaves()))
        self._stale = False

    def _whole(self, held: Tensor) -> Tensor:
        """[L] the leaves of ``held`` whose every row is held (a clip stream's render holds other
        leaves' rows too: their bounds would shrink to those few)."""
        count = torch.bincount(self.leaf_ids, minlength=self.num_leaves)
        return held & (torch.bincount(self.leaf_ids[self.index], minlength=self.num_leaves) == count)

    def prefetch(self, views) -> None:
        """Start uploading the rows of the leaves the next batch's ``views`` need that the model
        does not hold: on CUDA from a pinned buffer on a second stream, so the copy runs while
        the current batch renders.  Their host rows stay as they are until the next ``stage``
        (only held rows train; a refinement drops the prefetch).  Rows whose write-back is still on
        its way are left to that ``stage``, which lands the write-back first."""
        self._prefetched = None
        if self.index is None or self.stream is not None:
            return
        wanted = (self.leaves_needed(views) & ~self._held_leaves())[self.leaf_ids]
        if self._pending:
            pending = self._pending_rows()
            self.held_back_rows.append(int((wanted & pending).sum()))
            wanted &= ~pending
        self._send(torch.nonzero(wanted).flatten())

    def _host_rows(self, index: Tensor, columns: Optional[Tensor]) -> Tensor:
        return self.rows.gather(index, columns)

    def _send(self, index: Tensor, columns: Optional[Tensor] = None) -> None:
        """Copy the host rows ``index`` (their ``columns``; None: all) to the device ahead of
        their use (``_upload`` takes them)."""
        self._prefetched = None
        device = self.model.device
        if index.numel() == 0:
            return
        if device.type != "cuda":
            self._prefetched = (index, self._host_rows(index, columns), None, columns)
            return
        width = self.rows.shape[1] if columns is None else columns.numel()
        buffer = torch.empty((index.numel(), width), dtype=self.rows.dtype, pin_memory=True)
        self.rows.gather(index, columns, out=buffer)
        stream = self._copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            rows = buffer.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        rows.record_stream(torch.cuda.current_stream(device))  # read on the main stream at the next stage
        self._prefetched = (index, rows, done, columns)

    def _upload(self, upload: Tensor, device: torch.device, columns: Optional[Tensor] = None) -> Tensor:
        """[len(upload), D] the host rows ``upload`` on ``device``: from the prefetch where it has
        them, the rest copied now; with ``columns`` only those are copied (the rest are zeros)."""
        pre, self._prefetched = self._prefetched, None
        if pre is not None and (pre[3] is None) != (columns is None):
            pre = None  # sent for the other use (a render or a step)
        width = self.rows.shape[1] if columns is None else columns.numel()
        out = torch.empty((upload.numel(), width), dtype=self.rows.dtype, device=device)
        if pre is None:
            out.copy_(self._host_rows(upload, columns), non_blocking=True)
        else:
            index, rows, done, _ = pre
            if done is not None:
                torch.cuda.current_stream(device).wait_event(done)
            where = torch.full((self.rows.shape[0],), -1, dtype=torch.int64)
            where[index] = torch.arange(index.numel())
            at = where[upload]
            have = at >= 0
            out[have.to(device)] = rows[at[have].to(rows.device)].to(device)
            if not bool(have.all()):
                out[(~have).to(device)] = self._host_rows(upload[~have], columns).to(device)
            self.prefetched_rows.append(int(have.sum()))
        if columns is None:
            return out
        full = torch.zeros((upload.numel(), self.rows.shape[1]), dtype=self.rows.dtype, device=device)
        return full.index_copy_(1, columns.to(device), out)

    def _cached(self, candidates, needed) -> Tensor:
        """[L] leaves among ``candidates`` (held, not needed) that stay held: the most recently
        needed ones while every held row fits the budget."""
        keep = torch.zeros_like(candidates)
        budget = self.model.config.offload_budget_gb * 2**30
        if budget <= 0 or not bool(candidates.any()):
            return keep
        per_leaf = torch.bincount(self.leaf_ids, minlength=self.num_leaves) * self.rows.shape[1] * self.rows.element_size()
        used = float(per_leaf[needed].sum())
        for leaf in sorted(torch.nonzero(candidates).flatten().tolist(), key=lambda l: -int(self.last_needed[l])):
            if used + float(per_leaf[leaf]) > budget:
                break
            keep[leaf] = True
            used += float(per_leaf[leaf])
        return keep

    def materialize(self, on_host: bool = False) -> None:
        """Hold every row again, on the model's device or (``on_host``) in host memory, and drop
        the store's copy (the next batch makes a new one from what the model then holds)."""
        target = torch.device("cpu") if on_host else self.model.device
        self._flush()
        if self.index is None:
            if self.model.means.device == target:
                return
            self._capture()  # every row is held, on the other side: copy them over
        else:
            self._write_back()
        self._hold(None, target)
        self.reset()


def _cpu_bounds(bounds: LeafBounds) -> LeafBounds:
    return LeafBounds(bounds.lo.cpu(), bounds.hi.cpu(), bounds.max_scale.cpu())


def offload_store(model) -> Optional[OffloadStore]:
    """The model's store when offload is on (made at the first call; ``auto`` decided then),
    else None.  Raises ConfigError for the combinations offload cannot keep exact."""
    if model.offload_store is not None:
        return model.offload_store
    choice = model.config.offload
    if choice == "auto":
        choice = _auto_choice(model)
    if choice == "none":
        return None
    check_offload(model.config)  # auto decided host: the same conditions as asking for it
    store = model.offload_store = OffloadStore(model)
    if choice == "stream":
        from landmark_plugin.gaussians.stream import LeafStream

        store.stream = LeafStream(model.frame, store)
    return store


def _auto_choice(model) -> str:
    """``auto_offload`` for this rank's training footprint (parameters, gradients and two moments,
    and as much again for the render's intermediates) and the GPU's free memory."""
    model.config.offload = "none"  # decided once
    if model.device.type != "cuda":
        return "none"
    # Per Gaussian: each parameter's values, its gradient and two moments; twice that with the render's.
    per_row = sum(p[0].numel() * p.element_size() for p in model.gauss_params.values()) * 4 * 2
    predicted = model.num_points * per_row
    free, _ = torch.cuda.mem_get_info(model.device)
    choice = auto_offload(predicted, free)
    if choice != "none":
        CONSOLE.print(f"retina-gs: offload auto -> {choice} (predicted footprint {predicted / 2**30:.1f} GiB, "
                      f"GPU free {free / 2**30:.1f} GiB)")
    model.config.offload = choice
    return choice


def auto_offload(predicted: int, free: int) -> str:
    """none when the predicted footprint fits the free GPU memory, else stream (a city camera
    sees most of the city, so staging whole batches, host, gains little: BENCHMARKS.md)."""
    return "none" if predicted <= free else "stream"
