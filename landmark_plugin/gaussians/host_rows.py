"""The host copy of a rank's Gaussians under offload (``gaussians/offload.py``): every row of the
shard, kept as one contiguous [N, w] block per entry of the row layout (each parameter, each of
its Adam moments, each densification statistic) instead of one [N, D] matrix.

The blocks are what a model on the host holds already: capturing a shard whose tensors live in
host memory takes them as they are, and holding every row again on the host gives them back,
so neither direction ever has two copies of the shard in host memory (at a few hundred bytes a
Gaussian, the shard is most of the host's memory at the counts offload exists for).  Rows are
gathered into, and written back from, ``gaussian_rows``' [n, D] form for the few rows a batch
moves; the store is pageable, and every copy to or from a GPU goes through a pinned buffer of
just those rows (``OffloadStore._send`` / ``_write_back_later``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from landmark_plugin.gaussians.rows import Layout, gaussian_blocks, layout_columns, set_gaussian_blocks_


class HostRows:
    """[N, D] rows (``gaussian_rows``' columns, same layout) stored as per-entry blocks."""

    def __init__(self, blocks: List[Tensor], layout: Layout):
        self.blocks = blocks
        self.layout = layout
        self.spans = list(layout_columns(layout).values())

    @classmethod
    def capture(cls, model, optimizers, strategy_state) -> "HostRows":
        """The shard's rows in host memory: the model's own tensors where they are there already,
        host copies of the others, zeros for moments / statistics that do not exist yet."""
        views, layout = gaussian_blocks(model, optimizers, strategy_state)
        n, dtype = model.num_points, model.means.dtype
        blocks = []
        for view, (_, _, tail) in zip(views, layout):
            if view is None:
                blocks.append(torch.zeros(n, math.prod(tail), dtype=dtype))
            else:
                blocks.append(view.detach().to("cpu", dtype).contiguous())
        return cls(blocks, layout)

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.blocks[0].shape[0], self.spans[-1].stop)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def element_size(self) -> int:
        return self.blocks[0].element_size()

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def _blocks_of(self, columns: Optional[Tensor]) -> List[int]:
        """The blocks whose columns make up ``columns`` (ascending, whole blocks), or all."""
        if columns is None:
            return list(range(len(self.blocks)))
        wanted = set(columns.tolist())
        chosen = [i for i, s in enumerate(self.spans) if s.start in wanted]
        if sum(self.spans[i].stop - self.spans[i].start for i in chosen) != len(wanted) or any(
            not wanted.issuperset(range(self.spans[i].start, self.spans[i].stop)) for i in chosen
        ):
            raise ValueError("HostRows gathers whole layout entries only")
        return chosen

    def gather(self, index: Tensor, columns: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
        """[len(index), D] rows ``index`` (only ``columns``, whole layout entries, if given), into
        ``out`` when given (e.g. a pinned buffer)."""
        parts = [self.blocks[i].index_select(0, index) for i in self._blocks_of(columns)]
        if out is not None:
            return torch.cat(parts, dim=1, out=out)
        return torch.cat(parts, dim=1)

    def __getitem__(self, index: Tensor) -> Tensor:
        return self.gather(index)

    def __setitem__(self, index: Tensor, rows: Tensor) -> None:
        """Rows ``index`` take ``rows`` [len(index), D]."""
        for block, span in zip(self.blocks, self.spans):
            block[index] = rows[:, span].to(block.dtype)

    def entry(self, span: slice) -> Tensor:
        """[N, w] the block of one layout entry (``layout_columns``' slice)."""
        return self.blocks[self.spans.index(span)]

    def hold_all(self, model, optimizers, strategy_state, device: torch.device) -> None:
        """The model holds every row on ``device``: on the host the blocks themselves (no copy;
        the store gives them up to the model)."""
        set_gaussian_blocks_(model, optimizers, strategy_state, [b.to(device, non_blocking=True) for b in self.blocks], self.layout)
