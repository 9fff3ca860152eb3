"""MultiBranchGridField: LandMark's multi-branch plane x line grid as a nerfstudio Field.

Thin adapters over ``landmark_plugin.core.grid_features``: parameters live in ``BlockFactors``
(blocks as the leading dimension of every plane and line), routing and sampling are the core's
pure functions, and the decoder is built from nerfstudio field components.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Type

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from nerfstudio.cameras.rays import RaySamples
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.field_components.activations import trunc_exp
from nerfstudio.field_components.embedding import Embedding
from nerfstudio.field_components.encodings import NeRFEncoding
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.field_components.mlp import MLP
from nerfstudio.fields.base_field import Field

from landmark_plugin.core.grid_features import (
    MODES,
    FactorAxes,
    average_seams,
    block_cells,
    factor_shapes,
    factors_l1,
    plane_tv,
    resample_factor,
    route_points,
    sample_block_features,
    tie_seams,
)


class BlockFactors(nn.Module):
    """One set of block planes and lines (e.g. the density components) over all levels.

    Factor k = (level, mode pair); planes[k] is [B, Rv, Ru, C] and lines[k] is [B, Rl, C] (or
    [1, Rl, C] when shared).  Seam copies are tied (see core/grid_features.py): values are
    averaged at construction and after every resize, and each parameter's gradient goes
    through ``tie_seams`` in a tensor hook, so Adam sees one gradient per shared texel.
    """

    def __init__(
        self,
        blocks: Tuple[int, int],
        axes: Sequence[FactorAxes],
        cells_per_factor: Sequence[Sequence[int]],
        channels: int,
        shared_line: bool,
        init_scale: float,
    ) -> None:
        """
        Args:
            blocks: (bx, by).
            axes: per factor, world axes (u, v, line).
            cells_per_factor: per factor, cells along x, y, z of one block.
            channels: components per factor.
            shared_line: one line for all blocks instead of one per block.
            init_scale: std of the normal initial values.
        """
        super().__init__()
        self.blocks = tuple(blocks)
        self.axes = [tuple(a) for a in axes]
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
        param.register_hook(functools.partial(tie_seams, blocks=self.blocks, spatial_axes=spatial))

    def _spatial_axes(self) -> List[Tuple[nn.Parameter, Tuple[int, ...]]]:
        pairs: List[Tuple[nn.Parameter, Tuple[int, ...]]] = []
        for plane, line, (u, v, w) in zip(self.planes, self.lines, self.axes):
            pairs += [(plane, (v, u)), (line, (w,))]
        return pairs

    @torch.no_grad()
    def sync_seams(self) -> None:
        """Make every seam copy equal to the mean of its copies (after init, resize, edits)."""
        for param, spatial in self._spatial_axes():
            param.copy_(average_seams(param, self.blocks, spatial))

    def forward(self, local: Float[Tensor, "N 3"], block_index: Int[Tensor, " N"]) -> Float[Tensor, "N F"]:
        """Features [N, num_factors * channels] of points given in block-local coordinates."""
        return sample_block_features(list(self.planes), list(self.lines), local, block_index, self.axes)

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
        """Mean total variation over all planes."""
        return sum(plane_tv(p) for p in self.planes) / len(self.planes)  # type: ignore[return-value]

    def l1(self) -> Float[Tensor, ""]:
        """Mean absolute value over all planes and lines."""
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


@dataclass
class GridDensityFieldConfig(InstantiateConfig):
    """A density-only multi-branch grid (used for the proposal fields)."""

    _target: Type = field(default_factory=lambda: GridDensityField)
    """target class to instantiate"""
    blocks: Tuple[int, int] = (2, 2)
    """Blocks (branches) along x and y; each owns its own planes and lines."""
    mode: Literal["xy-z", "vm"] = "xy-z"
    """Factorisation: 'xy-z' = ground plane times height line (city scenes); 'vm' = TensoRF's
    three plane x line pairs (objects)."""
    cells: int = 64
    """Texel cells along a block's longest axis at the start (texels = cells + 1, seams shared)."""
    level_divisors: Tuple[int, ...] = (1,)
    """One level per entry, each with cells // divisor: (1, 4) adds a 4x coarser level."""
    density_components: int = 16
    """Density components per factor and level."""
    shared_line: bool = False
    """One line shared by all blocks (continuous features across seams) instead of one per block."""
    init_scale: float = 0.1
    """Std of the initial plane and line values."""
    density_bias: float = -1.0
    """Added to the summed density features before the exponential activation."""


class GridDensityField(Field):
    """Density from block planes x lines: sum of the density components, exp-activated.

    Args:
        config: field configuration.
        aabb: [2, 3] scene box (min, max) the blocks tile.
    """

    config: GridDensityFieldConfig

    def __init__(self, config: GridDensityFieldConfig, aabb: Float[Tensor, "2 3"], **kwargs) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("aabb", aabb.detach().clone().float())
        self.axes = [a for _ in config.level_divisors for a in MODES[config.mode]]
        self.density = self._make_factors(config.density_components)

    def _make_factors(self, channels: int) -> BlockFactors:
        extent = (self.aabb[1] - self.aabb[0]).tolist()
        base = block_cells(extent, self.config.blocks, self.config.cells)
        cells = [[max(1, c // d) for c in base] for d in self.config.level_divisors for _ in MODES[self.config.mode]]
        return BlockFactors(
            self.config.blocks, self.axes, cells, channels, self.config.shared_line, self.config.init_scale
        )

    def route(self, positions: Float[Tensor, "N 3"]) -> Tuple[Int[Tensor, " N"], Float[Tensor, "N 3"], Tensor]:
        """Block index, block-local coordinates and inside-the-box mask of world positions."""
        unit = (positions - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        block_index, local = route_points(unit, self.config.blocks)
        return block_index, local, inside

    def get_density(self, ray_samples: RaySamples) -> Tuple[Float[Tensor, "*bs 1"], None]:
        positions = ray_samples.frustums.get_positions()
        flat = positions.reshape(-1, 3)
        block_index, local, inside = self.route(flat)
        raw = self.density(local, block_index).sum(dim=-1) + self.config.density_bias
        # points outside the box (collider slack) are empty space
        density = trunc_exp(raw.to(flat)) * inside.to(flat)
        return density.view(*positions.shape[:-1], 1), None

    def get_outputs(self, ray_samples: RaySamples, density_embedding: Optional[Tensor] = None) -> Dict:
        return {}

    def factor_sets(self) -> List[BlockFactors]:
        """All BlockFactors of this field (for regularisers, upsampling and seam checks)."""
        return [self.density]


@dataclass
class MultiBranchGridFieldConfig(GridDensityFieldConfig):
    """The landmark-grid field: density and appearance block grids and a shared decoder."""

    _target: Type = field(default_factory=lambda: MultiBranchGridField)
    """target class to instantiate"""
    level_divisors: Tuple[int, ...] = (1, 4)
    """One level per entry, each with cells // divisor: (1, 4) adds a 4x coarser level."""
    appearance_components: int = 48
    """Appearance components per factor and level."""
    appearance_dim: int = 27
    """Width of the linear basis that maps appearance components to decoder features."""
    feature_frequencies: int = 2
    """Positional-encoding frequencies of the decoder features."""
    direction_frequencies: int = 2
    """Positional-encoding frequencies of the view direction."""
    appearance_embed_dim: int = 16
    """Per-image appearance embedding width (0 disables it)."""
    use_average_appearance_embedding: bool = True
    """At eval, use the mean embedding of the training images (else zeros)."""
    mlp_num_layers: int = 2
    """Decoder MLP layers."""
    mlp_layer_width: int = 128
    """Decoder MLP width."""


class MultiBranchGridField(GridDensityField):
    """Multi-branch grid NeRF field: block planes x lines, a shared decoder, appearance codes.

    Args:
        config: field configuration.
        aabb: [2, 3] scene box (min, max) the blocks tile.
        num_images: training images (size of the appearance embedding table).
    """

    config: MultiBranchGridFieldConfig

    def __init__(
        self, config: MultiBranchGridFieldConfig, aabb: Float[Tensor, "2 3"], num_images: int = 1, **kwargs
    ) -> None:
        super().__init__(config, aabb)
        self.appearance = self._make_factors(config.appearance_components)
        self.basis = nn.Linear(len(self.axes) * config.appearance_components, config.appearance_dim, bias=False)
        self.feature_encoding = NeRFEncoding(
            config.appearance_dim, config.feature_frequencies, 0, config.feature_frequencies - 1, include_input=True
        )
        self.direction_encoding = NeRFEncoding(
            3, config.direction_frequencies, 0, config.direction_frequencies - 1, include_input=True
        )
        self.embedding_appearance = (
            Embedding(max(num_images, 1), config.appearance_embed_dim) if config.appearance_embed_dim > 0 else None
        )
        self.eval_appearance_index: Optional[int] = None
        """When set, eval renders use this training image's appearance (lighting edits)."""
        in_dim = (
            self.feature_encoding.get_out_dim()
            + self.direction_encoding.get_out_dim()
            + config.appearance_embed_dim
        )
        self.decoder = MLP(
            in_dim=in_dim,
            num_layers=config.mlp_num_layers,
            layer_width=config.mlp_layer_width,
            out_dim=3,
            activation=nn.ReLU(),
            out_activation=nn.Sigmoid(),
        )

    def _appearance_code(
        self, camera_indices: Optional[Tensor], batch_shape: torch.Size, like: Tensor
    ) -> Optional[Tensor]:
        """[N, D] appearance codes for the N samples of a [*batch_shape] sample grid."""
        if self.embedding_appearance is None:
            return None
        count = like.shape[0]
        if self.training:
            assert camera_indices is not None, "ray samples need camera indices for appearance codes"
            # camera indices come per ray ([R, 1, 1]) or per sample ([R, S, 1])
            indices = torch.broadcast_to(camera_indices, (*batch_shape, 1)).reshape(-1)
            return self.embedding_appearance(indices.long())
        if self.eval_appearance_index is not None:
            index = torch.full((count,), self.eval_appearance_index, dtype=torch.long, device=like.device)
            return self.embedding_appearance(index).to(like)
        code = self.embedding_appearance.mean(dim=0)
        if not self.config.use_average_appearance_embedding:
            code = torch.zeros_like(code)
        return code.to(like).expand(count, -1)

    def get_outputs(self, ray_samples: RaySamples, density_embedding: Optional[Tensor] = None) -> Dict:
        positions = ray_samples.frustums.get_positions()
        flat = positions.reshape(-1, 3)
        block_index, local, _ = self.route(flat)
        features = self.basis(self.appearance(local, block_index))
        directions = torch.broadcast_to(ray_samples.frustums.directions, positions.shape).reshape(-1, 3)
        decoder_in = [self.feature_encoding(features), self.direction_encoding(directions)]
        code = self._appearance_code(ray_samples.camera_indices, positions.shape[:-1], features)
        if code is not None:
            decoder_in.append(code.to(features))
        rgb = self.decoder(torch.cat(decoder_in, dim=-1))
        return {FieldHeadNames.RGB: rgb.view(*positions.shape[:-1], 3)}

    def factor_sets(self) -> List[BlockFactors]:
        return [self.density, self.appearance]

    def grid_parameters(self) -> List[nn.Parameter]:
        """Planes and lines (the 'grids' optimiser group)."""
        return [p for factors in self.factor_sets() for p in factors.parameters()]

    def decoder_parameters(self) -> List[nn.Parameter]:
        """Basis, decoder MLP and appearance embedding (the 'decoder' optimiser group)."""
        grid = {id(p) for p in self.grid_parameters()}
        return [p for p in self.parameters() if id(p) not in grid]
