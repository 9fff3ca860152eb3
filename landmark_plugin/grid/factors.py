"""BlockFactors: the parameters of a multi-branch plane x line grid, blocks as the leading
dimension of every plane and line, with growth (upsampling) that keeps the optimiser's state.

Sampling and routing are ``core.grid_features``'s pure functions; ``grid/field.py`` builds the
nerfstudio fields on top.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from landmark_plugin.core.grid_features import (
    FactorAxes,
    average_seams,
    block_features,
    factor_shapes,
    factors_l1,
    plane_tv,
    resample_factor,
    tie_seams,
)
from landmark_plugin.core.grid_parallel import FactorShard


class BlockFactors(nn.Module):
    """One set of block planes and lines (e.g. the density components) over all levels.

    Factor k = (level, mode pair); planes[k] is [B, Rv, Ru, C] and lines[k] is [B, Rl, C] (or
    [1, Rl, C] when shared).  Seam copies are tied (see core/grid_features.py): values are
    averaged at construction and after every resize, and each parameter's gradient goes
    through ``tie_seams`` in a tensor hook, so Adam sees one gradient per shared texel.

    Under model parallelism (``grid/parallel.py``) a BlockFactors may hold one rank's share of
    the model's factors: ``shard`` then says which (for the regularisers' shares), and when the
    blocks of a seam live on different ranks (``local_ties`` False) the plan ties the seam
    gradients across ranks instead of the hooks.
    """

    def __init__(
        self,
        blocks: Tuple[int, int],
        axes: Sequence[FactorAxes],
        cells_per_factor: Sequence[Sequence[int]],
        channels: int,
        shared_line: bool,
        init_scale: float,
        backend: str = "auto",
    ) -> None:
        """
        Args:
            blocks: (bx, by).
            axes: per factor, world axes (u, v, line).
            cells_per_factor: per factor, cells along x, y, z of one block.
            channels: components per factor.
            shared_line: one line for all blocks instead of one per block.
            init_scale: std of the normal initial values.
            backend: who samples features (``core.grid_features.block_features``): auto, cuda, torch.
        """
        super().__init__()
        self.blocks = tuple(blocks)
        self.axes = [tuple(a) for a in axes]
        self.backend = backend
        self.local_ties = True
        """Seam gradients are tied by tensor hooks (False: by the model-parallel plan)."""
        self.shard: Optional[FactorShard] = None
        """This rank's share of the model's factors (model parallel), or None: all of them."""
        num_blocks = blocks[0] * blocks[1]
        self.planes = nn.ParameterList()
        self.lines = nn.ParameterList()
        for factor_axes, cells in zip(self.axes, cells_per_factor):
            (rows, cols), size = factor_shapes(cells, [factor_axes])[0]
            self.planes.append(nn.Parameter(init_scale * torch.randn(num_blocks, rows, cols, channels)))
            line_blocks = 1 if shared_line else num_blocks
            self.lines.append(nn.Parameter(init_scale * torch.randn(line_blocks, size, channels)))
        for param, spatial in self._spatial_axes():
            self._tie(param, spatial)
        self.sync_seams()

    def _tie(self, param: nn.Parameter, spatial: Tuple[int, ...]) -> None:
        if not self.local_ties:
            return
        param.register_hook(functools.partial(tie_seams, blocks=self.blocks, spatial_axes=spatial))

    def _spatial_axes(self) -> List[Tuple[nn.Parameter, Tuple[int, ...]]]:
        pairs: List[Tuple[nn.Parameter, Tuple[int, ...]]] = []
        for plane, line, (u, v, w) in zip(self.planes, self.lines, self.axes):
            pairs += [(plane, (v, u)), (line, (w,))]
        return pairs

    @torch.no_grad()
    def sync_seams(self) -> None:
        """Make every seam copy equal to the mean of its copies (after init, resize, edits)."""
        if not self.local_ties:
            raise RuntimeError("the seam copies of these factors live on several ranks; sync them before sharding")
        for param, spatial in self._spatial_axes():
            param.copy_(average_seams(param, self.blocks, spatial))

    def forward(self, local: Float[Tensor, "N 3"], block_index: Int[Tensor, " N"]) -> Float[Tensor, "N F"]:
        """Features [N, num_factors * channels] of points given in block-local coordinates."""
        return block_features(list(self.planes), list(self.lines), local, block_index, self.axes, self.backend)

    @torch.no_grad()
    def upsample(
        self, factor: int = 2, optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> Dict[nn.Parameter, nn.Parameter]:
        """Grow every factor to ``factor`` times the cells, carrying optimiser state.

        Each plane and line is replaced by a new Parameter (resizing ``.data`` in place would
        leave autograd's cached accumulator, still referenced by the previous step's graph, with
        the old shape).  The new parameter takes the old one's place in the optimisers' param
        groups, and state tensors shaped like it (Adam's moments) are resampled the same way.
        Integer factors reproduce the represented function exactly.

        Returns:
            old parameter -> new parameter, for other holders of parameter lists.
        """
        optimizers = list(optimizers)
        replaced: Dict[nn.Parameter, nn.Parameter] = {}
        for index, (u, v, w) in enumerate(self.axes):
            for store, spatial in ((self.planes, (v, u)), (self.lines, (w,))):
                old = store[index]
                size = [(s - 1) * factor + 1 for s in old.shape[1:-1]]
                new = nn.Parameter(resample_factor(old.detach(), size))
                self._tie(new, spatial)
                store[index] = new
                replaced[old] = new
                for optimizer in optimizers:
                    _swap_parameter(optimizer, old, new, functools.partial(resample_factor, size=size))
        return replaced

    def resize_like(self, shapes: Dict[str, torch.Size]) -> None:
        """Give parameters named in ``shapes`` (e.g. 'planes.0') those shapes (values undefined)."""
        for name, param in self.named_parameters():
            if name in shapes and shapes[name] != param.shape:
                param.data = param.data.new_empty(shapes[name])
                param.grad = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint saved after upsampling holds larger grids than a fresh model: take its shapes
        shapes = {k[len(prefix) :]: v.shape for k, v in state_dict.items() if k.startswith(prefix)}
        self.resize_like(shapes)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def tv(self) -> Float[Tensor, ""]:
        """Mean total variation over all planes (a model-parallel shard: this rank's share)."""
        if self.shard is not None:
            return sum(self.shard.plane_tv(p) for p in self.planes) / len(self.planes)  # type: ignore[return-value]
        return sum(plane_tv(p) for p in self.planes) / len(self.planes)  # type: ignore[return-value]

    def l1(self) -> Float[Tensor, ""]:
        """Mean absolute value over all planes and lines (a model-parallel shard: this rank's share)."""
        if self.shard is not None:
            return self.shard.l1(list(self.planes), list(self.lines))
        return factors_l1([*self.planes, *self.lines])

    def cells(self) -> List[int]:
        """Cells along x, y, z of one block at the finest level."""
        plane, line, (u, v, w) = self.planes[0], self.lines[0], self.axes[0]
        cells = [0, 0, 0]
        cells[u], cells[v], cells[w] = plane.shape[2] - 1, plane.shape[1] - 1, line.shape[1] - 1
        return cells


def _swap_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, resize) -> None:
    """Put ``new`` where ``old`` is in ``optimizer``; state tensors shaped like ``old`` go through ``resize``."""
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if param is old:
                group["params"][i] = new
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        optimizer.state[new] = {
            key: resize(value) if torch.is_tensor(value) and value.shape == old.shape else value
            for key, value in state.items()
        }
