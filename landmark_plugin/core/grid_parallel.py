"""Model-parallel layouts of the multi-branch grid: pure tensor functions, nothing communicates.

Vocabulary (DESIGN.md section 4, Strategies).  The *model* is the single-process grid: ``B = bx
* by`` blocks of planes ``[B, Rv, Ru, C]`` and lines ``[B, Rl, C]`` (or one shared line ``[1, Rl,
C]``), see ``core/grid_features.py``.  A *layout* says which part of every factor tensor each of
the ``M`` ranks of a model-parallel group holds:

- ``branch``: whole blocks; rank r holds a run of consecutive blocks, ``B / M`` of them when M
  divides B, else ``ceil(B / M)`` on the first ``B % M`` ranks and ``floor(B / M)`` on the others
  (``block_counts``); a shared line is replicated;
- ``plane``: the x-y plane of every block is cut into ``sx * sy`` sub-planes of whole cells that
  share their border texels (the seam scheme of ``grid_features``, one level down), giving a
  *fine* block grid ``(bx * sx, by * sy)``; ranks hold consecutive fine blocks as in ``branch``
  (``choose_split``: ``sx * sy = M`` where the cells allow it, every rank then holds an equal
  share of every block; else the split whose largest rank share is smallest); the (shared) z
  line is replicated.  Stitching the sub-planes back gives the model's planes exactly: a
  sub-plane texel is a model texel, and bilinear interpolation inside a cell reads the same four
  texels;
- ``channel``: every block at full resolution, a run of consecutive channels of every plane and
  line, ``C / M`` of them when M divides C, else one more on the first ``C % M`` ranks;
- ``none``: everything (M = 1).

``shard_factor`` / ``merge_factor`` move a factor tensor (a parameter, its gradient or an Adam
moment) between the model's layout and a rank's; they are exact inverses.  ``FactorShard`` gives a
rank's share of the TV and L1 regularisers so that the shares of all ranks add up to the model's
values: normalised by the model's element counts, a replicated line counted ``1 / M`` on every
rank, and the duplicated border texels of sub-planes (which are one texel in the model) counted
once.  ``channels_to_factor_major`` orders channels gathered rank by rank the way the model lays
them out (factor by factor).  ``even_counts`` is the one rule for uneven shares (blocks, channels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

Strategy = Literal["none", "branch", "plane", "channel"]
STRATEGIES: Tuple[str, ...] = ("none", "branch", "plane", "channel")
FactorKind = Literal["plane", "line"]

XY_PLANE = (1, 0)
"""World axes of the spatial dims of an x-y plane ``[B, Rv, Ru, C]``: rows along y, columns along x
(the only plane the ``plane`` strategy cuts)."""


def even_counts(total: int, parts: int) -> List[int]:
    """``total`` things over ``parts`` ranks as evenly as whole things allow: the first
    ``total % parts`` ranks hold one more."""
    base, extra = divmod(total, parts)
    return [base + (rank < extra) for rank in range(parts)]


@dataclass(frozen=True)
class GridLayout:
    """How one model-parallel group of ``parts`` ranks holds the grid.

    Attributes:
        strategy: none, branch, plane or channel.
        blocks: (bx, by) blocks of the model.
        parts: M, ranks of the model-parallel group.
        split: (sx, sy) sub-planes per block along x and y (``plane``; (1, 1) otherwise).
    """

    strategy: str
    blocks: Tuple[int, int]
    parts: int
    split: Tuple[int, int] = (1, 1)

    @property
    def fine_blocks(self) -> Tuple[int, int]:
        """The block grid ranks hold: the model's, or its sub-planes (``plane``)."""
        return (self.blocks[0] * self.split[0], self.blocks[1] * self.split[1])

    @property
    def num_fine_blocks(self) -> int:
        return self.fine_blocks[0] * self.fine_blocks[1]

    @property
    def shards_blocks(self) -> bool:
        """Whether ranks hold different blocks (branch, plane) rather than all of them."""
        return self.strategy in ("branch", "plane") and self.parts > 1

    def block_counts(self) -> List[int]:
        """Fine blocks per rank: as even as whole blocks allow, the first ``Bf % M`` ranks one more."""
        return even_counts(self.num_fine_blocks, self.parts) if self.shards_blocks else [self.num_fine_blocks]

    def block_range(self, rank: int) -> Tuple[int, int]:
        """[start, stop) of the fine blocks ``rank`` holds (all of them unless blocks are sharded)."""
        if not self.shards_blocks:
            return 0, self.num_fine_blocks
        counts = self.block_counts()
        start = sum(counts[:rank])
        return start, start + counts[rank]

    def block_owner(self, device: Optional[torch.device] = None) -> Tensor:
        """[Bf] int64 rank holding every fine block (0 everywhere unless blocks are sharded)."""
        if not self.shards_blocks:
            return torch.zeros(self.num_fine_blocks, dtype=torch.int64, device=device)
        counts = torch.tensor(self.block_counts(), device=device)
        return torch.repeat_interleave(torch.arange(self.parts, device=device), counts)

    def channel_range(self, channels: int, rank: int) -> Tuple[int, int]:
        """[start, stop) of the channels ``rank`` holds of a factor with ``channels`` channels."""
        if self.strategy != "channel":
            return 0, channels
        counts = even_counts(channels, self.parts)
        start = sum(counts[:rank])
        return start, start + counts[rank]

    def to_dict(self) -> Dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict) -> "GridLayout":
        return cls(data["strategy"], tuple(data["blocks"]), int(data["parts"]), tuple(data.get("split", (1, 1))))


def check_layout(
    strategy: str, blocks: Tuple[int, int], parts: int, channels: Sequence[int] = (), shared_lines: bool = False
) -> None:
    """Refuse a layout that cannot give every rank a share of the model, naming what to change.

    Args:
        strategy: none, branch, plane or channel.
        blocks: (bx, by) of the model.
        parts: M.
        channels: components per factor of every factor set (density, appearance, proposals).
        shared_lines: whether the model's lines are shared (``plane`` needs it).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel must be one of {STRATEGIES}, got {strategy!r}")
    if parts < 1:
        raise ValueError(f"model-parallel size must be at least 1, got {parts}")
    if strategy == "none" and parts != 1:
        raise ValueError(f"--pipeline.model.parallel none keeps the whole model on every rank: model-parallel size "
                         f"must be 1, got {parts} (pick branch, plane or channel to split the model)")
    num_blocks = blocks[0] * blocks[1]
    if strategy == "branch" and num_blocks < parts:  # fewer: some rank would hold nothing
        raise ValueError(f"branch parallel over {parts} ranks: only {blocks[0]}x{blocks[1]} = {num_blocks} blocks, fewer "
                         f"than the ranks; raise --pipeline.model.field.blocks or lower the model-parallel size")
    if strategy == "channel":
        few = sorted({c for c in channels if c < parts})  # fewer: some rank would hold nothing
        if few:
            raise ValueError(f"channel parallel over {parts} ranks: components {few} are fewer than the ranks; raise "
                             "--pipeline.model.field.density-components / appearance-components / "
                             "--pipeline.model.proposal-components or lower the model-parallel size")
    if strategy == "plane" and not shared_lines:
        raise ValueError("plane parallel needs one shared z line (the model's field.shared_line)")


def equal_splits(parts: int, plane_cells: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Every (sx, sy) with ``sx * sy = parts`` that cuts each x-y plane into sub-planes of whole
    cells (``plane_cells``: per plane, its cells along x and y): the splits that give every rank
    an equal share of every block."""
    return [
        (sx, parts // sx) for sx in range(1, parts + 1)
        if parts % sx == 0 and all(cx % sx == 0 and cy % (parts // sx) == 0 for cx, cy in plane_cells)
    ]


def choose_split(parts: int, blocks: Tuple[int, int], plane_cells: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """(sx, sy) that cuts every x-y plane into sub-planes of whole cells for ``parts`` ranks.

    A split into ``sx * sy = parts`` sub-planes where the cells of every plane allow one (every
    rank then holds an equal share of every block), the closest to square sub-planes of the first
    (finest) plane among them.  Else any split of whole cells into at least ``parts`` fine blocks
    in all, spread over the ranks as evenly as whole sub-planes allow (``GridLayout.block_counts``):
    the one whose largest rank holds the fewest texels (seam copies included), then the squarest.

    Args:
        parts: M.
        blocks: (bx, by) of the model.
        plane_cells: per plane, its cells along x and y (texels - 1).
    """
    cx0, cy0 = plane_cells[0]
    squareness = lambda s: abs(math.log((cx0 / s[0]) / (cy0 / s[1])))  # noqa: E731
    exact = equal_splits(parts, plane_cells)
    if exact:
        return min(exact, key=squareness)
    gx = math.gcd(*[cx for cx, _ in plane_cells])
    gy = math.gcd(*[cy for _, cy in plane_cells])
    splits = [(sx, sy) for sx in range(1, gx + 1) if gx % sx == 0 for sy in range(1, gy + 1) if gy % sy == 0]
    splits = [s for s in splits if blocks[0] * blocks[1] * s[0] * s[1] >= parts]
    if not splits:
        raise ValueError(
            f"plane parallel over {parts} ranks: the x-y planes' cells (x, y) = {sorted(set(map(tuple, plane_cells)))} "
            f"cut into at most {blocks[0] * blocks[1] * gx * gy} sub-planes of whole cells over the "
            f"{blocks[0]}x{blocks[1]} blocks, fewer than the ranks; raise --pipeline.model.field.cells and "
            "--pipeline.model.proposal-cells (or lower the level divisors) or the model-parallel size"
        )

    def largest_share(split: Tuple[int, int]) -> int:
        most = max(GridLayout("plane", blocks, parts, split).block_counts())
        return most * sum((cx // split[0] + 1) * (cy // split[1] + 1) for cx, cy in plane_cells)

    return min(splits, key=lambda s: (largest_share(s), squareness(s)))


# ---- sub-planes ----------------------------------------------------------------------------
def subdivide_planes(
    planes: Float[Tensor, "B Rv Ru C"], blocks: Tuple[int, int], split: Tuple[int, int]
) -> Float[Tensor, "Bf Rvs Rus C"]:
    """Cut every block's x-y plane into ``sx * sy`` sub-planes sharing their border texels.

    Fine block ``FX * (by * sy) + FY`` with ``FX = ix * sx + i``, ``FY = iy * sy + j`` holds texels
    ``i * cx .. (i + 1) * cx`` (x) and ``j * cy .. (j + 1) * cy`` (y) of block ``ix * by + iy``,
    where ``cx = (Ru - 1) / sx`` and ``cy = (Rv - 1) / sy`` cells.
    """
    (bx, by), (sx, sy) = blocks, split
    _, rows, cols, channels = planes.shape
    cx, cy = (cols - 1) // sx, (rows - 1) // sy
    if cx * sx != cols - 1 or cy * sy != rows - 1:
        raise ValueError(f"a plane of {cols - 1}x{rows - 1} cells does not split into {sx}x{sy} sub-planes")
    grid = planes.reshape(bx, by, rows, cols, channels)
    pieces = [
        torch.stack([grid[:, :, j * cy : (j + 1) * cy + 1, i * cx : (i + 1) * cx + 1] for j in range(sy)], dim=2)
        for i in range(sx)
    ]  # per i: [bx, by, sy, rows_s, cols_s, C]
    fine = torch.stack(pieces, dim=1)  # [bx, sx, by, sy, rows_s, cols_s, C]
    return fine.reshape(bx * sx * by * sy, cy + 1, cx + 1, channels)


def stitch_planes(
    fine: Float[Tensor, "Bf Rvs Rus C"], blocks: Tuple[int, int], split: Tuple[int, int]
) -> Float[Tensor, "B Rv Ru C"]:
    """Inverse of ``subdivide_planes``: the border texels shared by sub-planes appear once (the
    copies are equal: tied gradients and element-wise optimiser updates keep them so)."""
    (bx, by), (sx, sy) = blocks, split
    _, rows_s, cols_s, channels = fine.shape
    cy, cx = rows_s - 1, cols_s - 1
    view = fine.reshape(bx, sx, by, sy, rows_s, cols_s, channels)
    out = fine.new_empty(bx, by, cy * sy + 1, cx * sx + 1, channels)
    for i in range(sx):
        for j in range(sy):
            out[:, :, j * cy : (j + 1) * cy + 1, i * cx : (i + 1) * cx + 1] = view[:, i, :, j]
    return out.reshape(bx * by, cy * sy + 1, cx * sx + 1, channels)


# ---- shard / merge ---------------------------------------------------------------------------
def shard_factor(full: Tensor, kind: FactorKind, layout: GridLayout, rank: int) -> Tensor:
    """The part of a model factor tensor (plane [B, Rv, Ru, C] or line [B, Rl, C]) ``rank`` holds.

    Only tensors that are sharded come here: a shared line under branch / plane is replicated.
    """
    if layout.strategy == "channel":
        start, stop = layout.channel_range(full.shape[-1], rank)
        return full[..., start:stop].contiguous()
    if not layout.shards_blocks:
        return full.clone()
    if layout.strategy == "plane":
        if kind != "plane":
            raise ValueError("plane parallel shards planes only (its line is shared and replicated)")
        full = subdivide_planes(full, layout.blocks, layout.split)
    start, stop = layout.block_range(rank)
    return full[start:stop].contiguous()


def merge_factor(pieces: Sequence[Tensor], kind: FactorKind, layout: GridLayout) -> Tensor:
    """Inverse of ``shard_factor``: the model tensor from every rank's part, in rank order."""
    if len(pieces) != layout.parts:
        raise ValueError(f"{len(pieces)} shards for a layout of {layout.parts} ranks")
    if layout.strategy == "channel":
        return torch.cat(list(pieces), dim=-1)
    if not layout.shards_blocks:
        return pieces[0].clone()
    fine = torch.cat(list(pieces), dim=0)
    return stitch_planes(fine, layout.blocks, layout.split) if layout.strategy == "plane" else fine


def channels_to_factor_major(pieces: Sequence[Float[Tensor, "N W"]], num_factors: int) -> Float[Tensor, "N F"]:
    """Channels gathered rank by rank (per rank [N, F * c_r], its factor-major slice) in the
    model's order: factor by factor, each factor's channels in rank order."""
    n = pieces[0].shape[0]
    return torch.cat([p.reshape(n, num_factors, -1) for p in pieces], dim=2).reshape(n, -1)


# ---- regularisers ----------------------------------------------------------------------------
def first_texel_copies(layout: GridLayout, rank: int) -> Bool[Tensor, "Bl 2"]:
    """Per fine block ``rank`` holds, whether its first texel column (x, index 0) and first texel
    row (y, index 1) are copies of a neighbouring sub-plane's last one within the same model
    block (``plane``: sub-plane i > 0 along x, j > 0 along y); all False otherwise."""
    start, stop = layout.block_range(rank)
    fine = torch.arange(start, stop)
    fine_y = layout.fine_blocks[1]
    along_x = (fine // fine_y) % layout.split[0] > 0
    along_y = (fine % fine_y) % layout.split[1] > 0
    return torch.stack([along_x, along_y], dim=-1)


def _texel_weights(plane: Tensor, copies: Optional[Tensor]) -> Optional[Tensor]:
    """[Bl, Rv, Ru, 1] 0 on duplicated first columns / rows of sub-planes, else 1 (None: all 1)."""
    if copies is None or not bool(copies.any()):
        return None
    weight = plane.new_ones(plane.shape[0], plane.shape[1], plane.shape[2], 1)
    copies = copies.to(plane.device)
    weight[copies[:, 0], :, 0] = 0
    weight[copies[:, 1], 0, :] = 0
    return weight


@dataclass(frozen=True)
class FactorShard:
    """One rank's share of a factor set (BlockFactors) under a layout, for the regularisers.

    Attributes:
        layout: the model-parallel layout.
        rank: this rank in the model-parallel group.
        replicated_lines: the lines are replicated (a shared line under branch / plane).
        channels: the model's components per factor (``channel``: its ranks hold uneven shares).
    """

    layout: GridLayout
    rank: int
    replicated_lines: bool
    channels: int

    def _model_plane_shape(self, local: torch.Size) -> Tuple[int, int, int, int]:
        layout = self.layout
        blocks, rows, cols, channels = local
        if layout.strategy == "channel":
            return blocks, rows, cols, self.channels
        if layout.shards_blocks:
            sx, sy = layout.split
            blocks = layout.blocks[0] * layout.blocks[1]
            rows, cols = (rows - 1) * sy + 1, (cols - 1) * sx + 1
        return blocks, rows, cols, channels

    def _model_line_numel(self, local: torch.Size) -> int:
        blocks, size, channels = local
        if self.layout.strategy == "channel":
            return blocks * size * self.channels
        if self.replicated_lines or not self.layout.shards_blocks:
            return blocks * size * channels
        return self.layout.blocks[0] * self.layout.blocks[1] * size * channels  # branch: one line per block

    def _copies(self) -> Optional[Tensor]:
        return first_texel_copies(self.layout, self.rank) if self.layout.strategy == "plane" else None

    def plane_tv(self, plane: Float[Tensor, "Bl Rv Ru C"]) -> Float[Tensor, ""]:
        """This rank's share of ``grid_features.plane_tv`` of the model's plane.

        Differences along a shared sub-plane border (the first column / row of a copy) are the
        neighbour's: counted there only.
        """
        blocks, rows, cols, channels = self._model_plane_shape(plane.shape)
        weight = _texel_weights(plane, self._copies())
        dv = (plane[:, 1:] - plane[:, :-1]).square()
        du = (plane[:, :, 1:] - plane[:, :, :-1]).square()
        if weight is not None:  # a difference between two texels of a copied column / row is a copy
            dv = dv * weight[:, 1:]
            du = du * weight[:, :, 1:]
        return dv.sum() / (blocks * (rows - 1) * cols * channels) + du.sum() / (blocks * rows * (cols - 1) * channels)

    def l1(self, planes: Sequence[Tensor], lines: Sequence[Tensor]) -> Float[Tensor, ""]:
        """This rank's share of ``grid_features.factors_l1`` over the model's planes and lines."""
        copies = self._copies()
        total, count = 0.0, 0
        for plane in planes:
            weight = _texel_weights(plane, copies)
            total = total + (plane.abs() if weight is None else plane.abs() * weight).sum()
            count += int(torch.tensor(self._model_plane_shape(plane.shape)).prod())
        line_share = 1.0 / self.layout.parts if self.replicated_lines and self.layout.shards_blocks else 1.0
        for line in lines:
            total = total + line.abs().sum() * line_share
            count += self._model_line_numel(line.shape)
        return total / max(count, 1)  # type: ignore[return-value]


# ---- seams across ranks ------------------------------------------------------------------------
def seam_dims(spatial_axes: Sequence[Optional[int]], axis: int) -> List[int]:
    """Dims of a [B, *spatial, C] tensor that run along world ``axis`` (0 = x, 1 = y)."""
    return [1 + d for d, a in enumerate(spatial_axes) if a == axis]


def border_index(size: int, device: Optional[torch.device] = None) -> Tensor:
    """[2] the first and last texel along a dim of ``size`` texels (where seam copies live)."""
    return torch.tensor([0, size - 1], device=device)


def only_axis(spatial_axes: Sequence[Optional[int]], axis: int) -> Tuple[Optional[int], ...]:
    """``spatial_axes`` with every other split axis hidden, for ``tie_seams`` of one axis only."""
    return tuple(a if a == axis or a not in (0, 1) else None for a in spatial_axes)
