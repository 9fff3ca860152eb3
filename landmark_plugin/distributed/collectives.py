"""Collectives of the distributed retina-gs step; each takes its ``Comm`` explicitly.

- ``exchange_partials``: every rank's cropped partials travel to the owners of their cameras
  in one ``all_to_all_single``, inside an autograd Function whose backward sends the
  gradients back the same way (reverse splits).  Sizes come from the ``ExchangePlan`` that
  every rank builds identically, so no size exchange is needed.
- ``all_reduce_sum`` / ``all_reduce_grads_``: replicated values and gradients, packed into
  one buffer per call.
- ``all_to_all_rows`` / ``all_gather_rows``: variable-length row exchanges (migration of
  Gaussians with their optimiser moments, gathering means for a tree rebuild, tests).
- ``exchange_rows``: copies of rows to other ranks inside an autograd Function whose backward
  returns (and sums) the copies' gradients, plus an optional per-row payload.
- ``broadcast_object`` / ``all_gather_objects``: small picklable values (a run's timestamp,
  evaluation metrics).
- ``all_gather_cat``: pieces of a tensor that a model-parallel group consumes identically
  (landmark-grid's per-sample outputs or feature channels), autograd-aware with a local backward.

Each returns early when ``world_size == 1``.  Every call is wrapped in ``groups.guard`` so a
dead or hung peer surfaces as ``RankFailure`` with a clear message.  NCCL reduces CUDA tensors
only: bookkeeping tensors that live on the CPU (schedules, counts) travel through the current
CUDA device and come back (``_to_comm`` / ``_from_comm``); with gloo, CUDA tensors are staged
through host memory the same way, so several ranks can share one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor

from landmark_plugin.distributed.groups import Comm, guard

Rect = Tuple[int, int, int, int]  # (x0, y0, x1, y1), half open (raster_ref.Window)


@dataclass(frozen=True)
class Task:
    """One (camera, part) partial: rendered by ``source``, composited by ``owner``."""

    camera: int
    part: int
    source: int
    owner: int
    rect: Rect
    channels: int

    @property
    def shape(self) -> Tuple[int, int, int]:
        x0, y0, x1, y1 = self.rect
        return (y1 - y0, x1 - x0, self.channels)

    @property
    def numel(self) -> int:
        h, w, c = self.shape
        return h * w * c


@dataclass(frozen=True)
class ExchangePlan:
    """Who sends which cropped partial to whom; identical on every rank.

    Attributes:
        tasks: every non-empty task of the batch, in one global order.
        world_size: R.
    """

    tasks: Tuple[Task, ...]
    world_size: int

    def sends(self, rank: int) -> List[int]:
        """Task ids ``rank`` sends, grouped by destination rank (the all_to_all layout)."""
        return sorted((i for i, t in enumerate(self.tasks) if t.source == rank), key=lambda i: (self.tasks[i].owner, i))

    def recvs(self, rank: int) -> List[int]:
        """Task ids ``rank`` receives, grouped by source rank."""
        return sorted((i for i, t in enumerate(self.tasks) if t.owner == rank), key=lambda i: (self.tasks[i].source, i))

    def splits(self, rank: int) -> Tuple[List[int], List[int]]:
        """Element counts ``rank`` sends to / receives from every rank."""
        send, recv = [0] * self.world_size, [0] * self.world_size
        for t in self.tasks:
            if t.source == rank:
                send[t.owner] += t.numel
            if t.owner == rank:
                recv[t.source] += t.numel
        return send, recv


def _to_comm(comm: Comm, value: Tensor) -> Tensor:
    """``value`` on a device the backend can communicate: CUDA for NCCL; host memory for gloo,
    whose all_to_all takes no CUDA tensors (several ranks sharing one GPU, ``shared_gpu``)."""
    if comm.backend == "nccl" and not value.is_cuda:
        return value.to(torch.device("cuda", torch.cuda.current_device()))
    if comm.backend == "gloo" and value.is_cuda:
        return value.cpu()
    return value


def _from_comm(value: Tensor, like: Tensor) -> Tensor:
    return value if value.device == like.device else value.to(like.device)


def _all_to_all_flat(comm: Comm, flat: Tensor, send: List[int], recv: List[int], what: str) -> Tensor:
    source = _to_comm(comm, flat.contiguous())
    out = source.new_empty(sum(recv))
    with guard(comm, what):
        dist.all_to_all_single(out, source, recv, send, group=comm.group)
    return _from_comm(out, flat)


class _ExchangePartials(torch.autograd.Function):
    """Forward: local partials -> owners.  Backward: owners' gradients -> renderers."""

    @staticmethod
    def forward(ctx, comm: Comm, plan: ExchangePlan, anchor: Tensor, *local: Tensor):  # type: ignore[override]
        ctx.comm, ctx.plan = comm, plan
        ctx.local_shapes = [x.shape for x in local]
        send, recv = plan.splits(comm.rank)
        flat = torch.cat([x.reshape(-1) for x in local]) if local else anchor.new_zeros(0)
        received = _all_to_all_flat(comm, flat, send, recv, "exchange partials (forward)")
        ids = plan.recvs(comm.rank)
        pieces = torch.split(received, [plan.tasks[i].numel for i in ids]) if ids else []
        outs = tuple(p.view(plan.tasks[i].shape) for p, i in zip(pieces, ids))
        return (anchor.clone(), *outs)

    @staticmethod
    def backward(ctx, anchor_grad: Tensor, *grads: Tensor):  # type: ignore[override]
        comm, plan = ctx.comm, ctx.plan
        send, recv = plan.splits(comm.rank)
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else anchor_grad.new_zeros(0)
        # The reverse exchange: what we received, we send back, and vice versa.
        returned = _all_to_all_flat(comm, flat, recv, send, "exchange partials (backward)")
        pieces = torch.split(returned, [s.numel() for s in ctx.local_shapes]) if ctx.local_shapes else []
        local_grads = tuple(p.view(s) for p, s in zip(pieces, ctx.local_shapes))
        return (None, None, anchor_grad, *local_grads)


def exchange_partials(
    comm: Comm, plan: ExchangePlan, local: Dict[int, Float[Tensor, "h w C"]], anchor: Tensor
) -> Tuple[Dict[int, Float[Tensor, "h w C"]], Tensor]:
    """Send every local cropped partial to its camera's owner; receive the partials we own.

    Args:
        plan: the batch's tasks (the same object on every rank).
        local: task id -> [h, w, C] partial (colour channels then transmittance) for every
            task this rank sends, cropped to ``task.rect``.
        anchor: a scalar that requires grad; the returned anchor must enter the loss (e.g.
            ``0 * anchor``) so that every rank runs the backward collective even when it
            renders or owns nothing this step.

    Returns:
        task id -> received [h, w, C] partial for every task this rank owns, and the anchor.
    """
    if comm.is_single:
        return {i: local[i] for i in plan.recvs(0)}, anchor
    ids = plan.sends(comm.rank)
    for i in ids:
        if tuple(local[i].shape) != plan.tasks[i].shape:
            raise ValueError(f"task {i}: partial has shape {tuple(local[i].shape)}, plan says {plan.tasks[i].shape}")
    outs = _ExchangePartials.apply(comm, plan, anchor, *[local[i] for i in ids])
    return dict(zip(plan.recvs(comm.rank), outs[1:])), outs[0]


class _GatherCat(torch.autograd.Function):
    """Forward: every rank's piece, concatenated.  Backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, comm: Comm, dim: int, sizes: Tuple[int, ...], what: str, local: Tensor):  # type: ignore[override]
        ctx.dim, ctx.start, ctx.size = dim, sum(sizes[: comm.rank]), sizes[comm.rank]
        moved = local.movedim(dim, 0)
        padded = moved.new_zeros((max(sizes),) + tuple(moved.shape[1:]))
        padded[: moved.shape[0]] = moved
        padded = _to_comm(comm, padded)
        gathered = [torch.empty_like(padded) for _ in range(comm.world_size)]
        with guard(comm, what):
            dist.all_gather(gathered, padded, group=comm.group)
        out = torch.cat([g[:n] for g, n in zip(gathered, sizes)]).movedim(0, dim)
        return _from_comm(out, local).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return None, None, None, None, grad.narrow(ctx.dim, ctx.start, ctx.size)


def all_gather_cat(comm: Comm, local: Tensor, dim: int, sizes: Sequence[int], what: str = "all_gather pieces") -> Tensor:
    """Every rank's ``local`` concatenated along ``dim`` in rank order, for a replicated consumer.

    Args:
        local: this rank's piece; ``local.shape[dim] == sizes[comm.rank]``, other dims equal on
            every rank.
        sizes: every rank's length along ``dim`` (known to every rank, so nothing is exchanged
            to learn them; pieces are padded to the longest for the gather).

    The backward is local: it hands this rank the slice of the gradient at its own piece.  That
    is exact when every rank of ``comm`` computes the same loss from the result (a model-parallel
    group evaluating the same rays): each rank then holds the whole loss's gradient of the
    concatenation, and a reduction would count it ``world_size`` times.
    """
    sizes = tuple(int(s) for s in sizes)
    if local.shape[dim] != sizes[comm.rank]:
        raise ValueError(f"rank {comm.rank}: piece has {local.shape[dim]} entries along dim {dim}, sizes say {sizes[comm.rank]}")
    if comm.is_single:
        return local
    if max(sizes) == 0:  # every rank knows the sizes: all skip the collective together
        return local
    return _GatherCat.apply(comm, dim, sizes, what, local)


def all_reduce_sum(comm: Comm, tensors: Sequence[Tensor], what: str = "all_reduce") -> List[Tensor]:
    """Sums of every tensor over ranks (one packed all_reduce; inputs are not modified)."""
    if comm.is_single or not tensors:
        return [t.clone() for t in tensors]
    flat = _to_comm(comm, torch.cat([t.detach().reshape(-1) for t in tensors]))
    with guard(comm, what):
        dist.all_reduce(flat, group=comm.group)
    pieces = torch.split(_from_comm(flat, tensors[0]), [t.numel() for t in tensors])
    return [p.view(t.shape) for p, t in zip(pieces, tensors)]


def all_reduce_grads_(comm: Comm, params: Sequence[Tensor]) -> None:
    """Sum the gradients of replicated parameters over ranks, in place.

    Every rank must pass the same parameters in the same order; a missing gradient counts
    as zero (a rank that did not see a camera contributes nothing to its pose correction).
    """
    if comm.is_single or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    summed = all_reduce_sum(comm, grads, "all_reduce replicated gradients")
    for p, g in zip(params, summed):
        p.grad = g


def all_reduce_ints(comm: Comm, values: Int[Tensor, "..."], what: str = "all_reduce ints") -> Int[Tensor, "..."]:
    """Sum an integer tensor over ranks (schedules, counts)."""
    if comm.is_single:
        return values.clone()
    out = _to_comm(comm, values.clone())
    with guard(comm, what):
        dist.all_reduce(out, group=comm.group)
    return _from_comm(out, values)


def all_to_all_rows(comm: Comm, rows: Float[Tensor, "N D"], dest: Int[Tensor, " N"]) -> Tuple[Tensor, Tensor]:
    """Send every row to rank ``dest[row]``.

    Returns:
        The [M, D] rows this rank receives, grouped by source rank (each source's rows in its
        original order), and [M] the source rank of every received row.
    """
    if comm.is_single:
        return rows[torch.argsort(dest, stable=True)], torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    order = torch.argsort(dest, stable=True)
    counts = _to_comm(comm, torch.bincount(dest, minlength=comm.world_size).to(torch.int64))
    recv_counts = torch.empty_like(counts)
    with guard(comm, "all_to_all row counts"):
        dist.all_to_all_single(recv_counts, counts, group=comm.group)
    counts, recv_counts = counts.cpu(), recv_counts.cpu()
    width = rows.shape[1]
    out = _all_to_all_flat(
        comm,
        rows[order].reshape(-1),
        [int(c) * width for c in counts.tolist()],
        [int(c) * width for c in recv_counts.tolist()],
        "all_to_all rows",
    )
    source = torch.repeat_interleave(torch.arange(comm.world_size, device=rows.device), recv_counts.to(rows.device))
    return out.view(-1, width), source


class RowPayload:
    """Per-row values that travel back with the gradients of ``exchange_rows``.

    The receiver's ``collect`` (called inside the backward, once the received rows' consumers
    have run their backward) returns one [M, width] row per received row; the sender's
    ``deliver`` gets them per sent row and sums them where it likes (e.g. densification
    statistics of copies rendered elsewhere, summed into their owner's).
    """

    width: int = 0

    def collect(self, num_received: int) -> Float[Tensor, "M E"]:
        raise NotImplementedError

    def deliver(self, sent_rows: Int[Tensor, " K"], values: Float[Tensor, "K E"]) -> None:
        raise NotImplementedError


class _ExchangeRows(torch.autograd.Function):
    """Forward: rows to other ranks.  Backward: their gradients (and payload) come back, summed."""

    @staticmethod
    def forward(ctx, comm: Comm, index: Tensor, send: List[int], recv: List[int], payload: Optional[RowPayload],
                anchor: Tensor, rows: Tensor):  # type: ignore[override]
        width = rows.shape[1]
        ctx.comm, ctx.index, ctx.send, ctx.recv, ctx.payload = comm, index, send, recv, payload
        ctx.num_rows, ctx.width = rows.shape[0], width
        flat = rows.detach()[index].reshape(-1)
        out = _all_to_all_flat(comm, flat, [c * width for c in send], [c * width for c in recv], "exchange rows (forward)")
        return anchor.clone(), out.view(-1, width)

    @staticmethod
    def backward(ctx, anchor_grad: Tensor, grad: Tensor):  # type: ignore[override]
        comm, payload, width = ctx.comm, ctx.payload, ctx.width
        extra = payload.width if payload is not None else 0
        back = grad
        if extra:
            back = torch.cat([grad, payload.collect(grad.shape[0]).to(grad)], dim=1)
        returned = _all_to_all_flat(
            comm, back.reshape(-1), [c * (width + extra) for c in ctx.recv], [c * (width + extra) for c in ctx.send],
            "exchange rows (backward)",
        ).view(-1, width + extra)
        grad_rows = grad.new_zeros(ctx.num_rows, width).index_add_(0, ctx.index, returned[:, :width])
        if extra:
            payload.deliver(ctx.index, returned[:, width:])
        return None, None, None, None, None, anchor_grad, grad_rows


def exchange_rows(
    comm: Comm,
    rows: Float[Tensor, "N D"],
    dests: Sequence[Int[Tensor, " K"]],
    anchor: Tensor,
    payload: Optional[RowPayload] = None,
) -> Tuple[Float[Tensor, "M D"], Int[Tensor, " M"], Tensor]:
    """Send copies of rows to other ranks, autograd-aware: gradients of the received copies
    return to the sender and are summed into the rows they copy.

    Args:
        rows: [N, D] this rank's rows (may require grad).
        dests: per rank r, the [K_r] indices of the rows to send to r (``dests[comm.rank]``
            is ignored: a rank keeps its own rows).
        anchor: a scalar that requires grad; the returned anchor must enter the loss, after
            every later collective of the step (chain it into them), so that every rank runs
            this backward, in the same order, even when it used nothing it received.
        payload: optional per-row values to return with the gradients (``RowPayload``).

    Returns:
        [M, D] received rows grouped by source rank, [M] the source of each, and the anchor.
    """
    if comm.is_single:
        return rows[:0], torch.zeros(0, dtype=torch.int64, device=rows.device), anchor
    empty = torch.zeros(0, dtype=torch.int64, device=rows.device)
    per_rank = [empty if r == comm.rank else d.to(rows.device, torch.int64) for r, d in enumerate(dests)]
    counts = torch.tensor([d.numel() for d in per_rank], dtype=torch.int64)
    recv_counts = _to_comm(comm, torch.empty_like(counts))
    with guard(comm, "exchange rows (counts)"):
        dist.all_to_all_single(recv_counts, _to_comm(comm, counts), group=comm.group)
    send, recv = counts.tolist(), [int(c) for c in recv_counts.cpu().tolist()]
    index = torch.cat(per_rank)
    anchor, received = _ExchangeRows.apply(comm, index, send, recv, payload, anchor, rows)
    source = torch.repeat_interleave(torch.arange(comm.world_size, device=rows.device), torch.tensor(recv, device=rows.device))
    return received, source, anchor


def all_gather_rows(comm: Comm, rows: Float[Tensor, "N D"], what: str = "all_gather rows") -> Float[Tensor, "M D"]:
    """Concatenate every rank's rows in rank order (ranks may hold different counts)."""
    if comm.is_single:
        return rows.clone()
    count = _to_comm(comm, torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device))
    counts = [torch.zeros_like(count) for _ in range(comm.world_size)]
    with guard(comm, what + " (counts)"):
        dist.all_gather(counts, count, group=comm.group)
    sizes = [int(c) for c in counts]
    padded = _to_comm(comm, rows.new_zeros((max(sizes),) + tuple(rows.shape[1:])))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(comm.world_size)]
    with guard(comm, what):
        dist.all_gather(gathered, padded.contiguous(), group=comm.group)
    return _from_comm(torch.cat([g[:n] for g, n in zip(gathered, sizes)]), rows)


def broadcast_tensor(comm: Comm, value: Tensor, src: int = 0, what: str = "broadcast") -> Tensor:
    """``value`` of rank ``src`` on every rank (same shape and dtype everywhere)."""
    if comm.is_single:
        return value
    out = _to_comm(comm, value.clone())
    with guard(comm, what):
        dist.broadcast(out, src=src, group=comm.group)
    return _from_comm(out, value)


def broadcast_object(comm: Comm, value: Any, src: int = 0, what: str = "broadcast object") -> Any:
    """Rank ``src``'s picklable ``value`` on every rank (``value`` is ignored elsewhere)."""
    if comm.is_single:
        return value
    box = [value if comm.rank == src else None]
    with guard(comm, what):
        dist.broadcast_object_list(box, src=src, group=comm.group, device=_object_device(comm))
    return box[0]


def all_gather_objects(comm: Comm, value: Any, what: str = "all_gather objects") -> List[Any]:
    """Every rank's picklable ``value``, in rank order."""
    if comm.is_single:
        return [value]
    out: List[Any] = [None] * comm.world_size
    with guard(comm, what):
        dist.all_gather_object(out, value, group=comm.group)
    return out


def _object_device(comm: Comm) -> Optional[torch.device]:
    return torch.device("cuda", torch.cuda.current_device()) if comm.backend == "nccl" else None


def barrier(comm: Comm, what: str = "barrier", device: Optional[torch.device] = None) -> None:
    """A barrier that fails with ``RankFailure`` instead of hanging (an all_reduce of one int:
    gloo's barrier does not take the group timeout on every version)."""
    if comm.is_single:
        return
    all_reduce_ints(comm, torch.zeros(1, dtype=torch.int64, device=device), what)
