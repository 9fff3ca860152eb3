"""MultiBranchGridField: LandMark's multi-branch plane x line grid as a nerfstudio Field.

Thin adapters over ``landmark_plugin.core.grid_features``: parameters live in ``BlockFactors``
(blocks as the leading dimension of every plane and line), routing and sampling are the core's
pure functions, and the decoder is built from nerfstudio field components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type

import torch
from jaxtyping import Float, Int
from nerfstudio.cameras.rays import RaySamples
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.field_components.activations import trunc_exp
from nerfstudio.field_components.embedding import Embedding
from nerfstudio.field_components.encodings import NeRFEncoding
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.field_components.mlp import MLP
from nerfstudio.field_components.spatial_distortions import SceneContraction
from nerfstudio.fields.base_field import Field
from torch import Tensor, nn

from landmark_plugin.core.edits import BoxEdit, edit_points, mix_codes
from landmark_plugin.core.grid_features import (
    MODES,
    block_cells,
    route_points,
)
from landmark_plugin.grid.factors import BlockFactors


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
    contraction: Literal["none", "linf"] = "none"
    """none: the blocks tile the scene box and space outside it is empty (rays are clipped to the
    box).  linf: unbounded scenes (real captures with backgrounds beyond the box): mip-NeRF 360's
    contraction in the L-inf norm, as nerfacto's, with the box as the unit cube -- the box fills
    the middle half of the grid along every axis and all space outside it the rest, and rays run
    from the model's near_plane to its far_plane."""
    init_scale: float = 0.1
    """Std of the initial plane and line values."""
    density_bias: float = -1.0
    """Added to the summed density features before the exponential activation."""
    feature_backend: Literal["auto", "cuda", "torch"] = "auto"
    """Plane x line sampling: 'auto' = the fused CUDA kernel of csrc/ on GPU (the torch twin on CPU,
    under --deterministic, or when the kernel cannot be built, with a warning); 'cuda' = the kernel
    or an error; 'torch' = the twin everywhere."""


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
        # nerfstudio's contraction of box-normalised positions (the box is [-1, 1]^3) into [-2, 2]^3
        self.contraction = SceneContraction(order=float("inf")) if config.contraction == "linf" else None
        self.axes = [a for _ in config.level_divisors for a in MODES[config.mode]]
        self.density = self._make_factors(config.density_components)
        self.blocks: Tuple[int, int] = tuple(config.blocks)  # type: ignore[assignment]
        """The block grid points are routed on: the config's, or sub-planes under plane parallelism."""
        self.plan = None
        """The model-parallel plan (landmark_plugin.grid.parallel.GridPlan) or None: one process."""
        self.appearance_channels = 0
        """Appearance components per factor (0: a density-only field)."""
        self.layout_edits: Tuple[BoxEdit, ...] = ()
        """Render-time layout edits (set by landmark_plugin.edits.apply_edits; ignored in training)."""

    def _make_factors(self, channels: int) -> BlockFactors:
        extent = (self.aabb[1] - self.aabb[0]).tolist()
        base = block_cells(extent, self.config.blocks, self.config.cells)
        cells = [[max(1, c // d) for c in base] for d in self.config.level_divisors for _ in MODES[self.config.mode]]
        return BlockFactors(
            self.config.blocks, self.axes, cells, channels, self.config.shared_line, self.config.init_scale,
            backend=self.config.feature_backend,
        )

    def route(self, positions: Float[Tensor, "N 3"]) -> Tuple[Int[Tensor, " N"], Float[Tensor, "N 3"], Tensor]:
        """Block index, block-local coordinates and inside-the-box mask of world positions (with
        a contraction every position is inside the grid's domain)."""
        unit = (positions - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        if self.contraction is not None:
            unit = (self.contraction(2.0 * unit - 1.0) + 2.0) / 4.0
            inside = torch.ones(unit.shape[:-1], dtype=torch.bool, device=unit.device)
        else:
            inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        block_index, local = route_points(unit, self.blocks)
        return block_index, local, inside

    def edited_positions(self, flat: Float[Tensor, "N 3"]) -> Tuple[Float[Tensor, "N 3"], Optional[Tensor]]:
        """Where the trained grid is read for these points, and which are kept (None: all), under
        the layout edits; edits are a render-time view, so training reads the points themselves."""
        if not self.layout_edits or self.training:
            return flat, None
        return edit_points(self.layout_edits, flat)

    def _features(
        self, local: Float[Tensor, "n 3"], block_index: Int[Tensor, " n"], with_appearance: bool
    ) -> Tuple[Float[Tensor, " n"], Optional[Float[Tensor, "n A"]]]:
        """Summed density components and appearance channels (None here) of points in their blocks."""
        return self.density(local, block_index).sum(dim=-1), None

    def _decoder_context(self, ray_samples: RaySamples, positions: Tensor, flat: Tensor) -> Optional[Tuple]:
        """Per-sample decoder inputs besides the features ([N, ...] tensors or None)."""
        return None

    def _decode(
        self, density_sum: Float[Tensor, " n"], appearance: Optional[Tensor], keep: Float[Tensor, " n"], context
    ) -> Float[Tensor, "n K"]:
        """[n, 1] density of samples from their summed density components; ``keep`` is 0 where
        the scene is empty regardless (outside the box, removed boxes)."""
        return (trunc_exp((density_sum + self.config.density_bias).to(keep)) * keep)[:, None]

    def _evaluate(self, ray_samples: RaySamples, with_rgb: bool) -> Float[Tensor, "*bs K"]:
        """Density (K = 1) or density and colour (K = 4) of every sample.

        One process: all samples through ``_features`` then ``_decode``.  Model parallel: the
        ``plan`` picks the samples (blocks) or channels this rank evaluates and joins the ranks'
        results, so every rank of the model-parallel group returns the same [*bs, K].
        """
        positions = ray_samples.frustums.get_positions()
        flat, alive = self.edited_positions(positions.reshape(-1, 3))
        block_index, local, inside = self.route(flat)
        # points outside the box (collider slack) are empty space, and so are removed boxes
        keep = (inside if alive is None else inside & alive).to(flat)
        context = self._decoder_context(ray_samples, positions, flat) if with_rgb else None

        def features(rows: Optional[Tensor], blocks: Tensor):
            return self._features(local if rows is None else local[rows], blocks, with_rgb)

        def decode(rows: Optional[Tensor], density_sum: Tensor, appearance: Optional[Tensor]) -> Tensor:
            if rows is None:
                return self._decode(density_sum, appearance, keep, context)
            picked = None if context is None else tuple(None if t is None else t[rows] for t in context)
            return self._decode(density_sum, appearance, keep[rows], picked)

        if self.plan is None:
            out = decode(None, *features(None, block_index))
        else:
            out = self.plan.evaluate(block_index, features, decode, len(self.axes), self.appearance_channels)
        return out.view(*positions.shape[:-1], out.shape[-1])

    def get_density(self, ray_samples: RaySamples) -> Tuple[Float[Tensor, "*bs 1"], None]:
        return self._evaluate(ray_samples, with_rgb=False), None

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
    render_precision: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the colour decoder (basis, encodings, MLP) in renders outside training (eval,
    ns-render, the viewer), through torch.autocast: bfloat16 / float16 trade colour precision for
    speed.  Density stays float32 (it decides which samples count) and training is unaffected."""


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
        self.appearance_channels = config.appearance_components
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
        self.eval_appearance_mix: Optional[Tuple[int, Optional[int], float]] = None
        """(image, to_image, t): eval renders use the code between two training images' codes
        (landmark_plugin.edits.Appearance); takes precedence over eval_appearance_index."""
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
        if self.eval_appearance_mix is not None:
            code = mix_codes(self.embedding_appearance.embedding.weight, *self.eval_appearance_mix)
            return code.to(like).expand(count, -1)
        if self.eval_appearance_index is not None:
            index = torch.full((count,), self.eval_appearance_index, dtype=torch.long, device=like.device)
            return self.embedding_appearance(index).to(like)
        code = self.embedding_appearance.mean(dim=0)
        if not self.config.use_average_appearance_embedding:
            code = torch.zeros_like(code)
        return code.to(like).expand(count, -1)

    def _features(self, local, block_index, with_appearance):
        density = self.density(local, block_index).sum(dim=-1)
        return density, (self.appearance(local, block_index) if with_appearance else None)

    def _decoder_context(self, ray_samples: RaySamples, positions: Tensor, flat: Tensor) -> Optional[Tuple]:
        directions = torch.broadcast_to(ray_samples.frustums.directions, positions.shape).reshape(-1, 3)
        return directions, self._appearance_code(ray_samples.camera_indices, positions.shape[:-1], flat)

    def _decode(self, density_sum, appearance, keep, context):
        density = super()._decode(density_sum, None, keep, None)
        if appearance is None:
            return density
        precision = self.config.render_precision
        if self.training or precision == "float32":
            rgb = self._decode_rgb(appearance, context)
        else:
            with torch.autocast(device_type=appearance.device.type, dtype=getattr(torch, precision)):
                rgb = self._decode_rgb(appearance, context)
        return torch.cat([density, rgb.to(density)], dim=-1)

    def _decode_rgb(self, appearance: Tensor, context: Tuple) -> Tensor:
        """[n, 3] colour from the appearance features, view directions and appearance codes."""
        directions, code = context
        features = self.basis(appearance)
        decoder_in = [self.feature_encoding(features), self.direction_encoding(directions)]
        if code is not None:
            decoder_in.append(code.to(features))
        return self.decoder(torch.cat(decoder_in, dim=-1))

    def forward(self, ray_samples: RaySamples, compute_normals: bool = False) -> Dict[FieldHeadNames, Tensor]:
        """Density and colour in one pass (one join of the ranks' results under model parallelism)."""
        out = self._evaluate(ray_samples, with_rgb=True)
        return {FieldHeadNames.DENSITY: out[..., :1], FieldHeadNames.RGB: out[..., 1:]}

    def get_outputs(self, ray_samples: RaySamples, density_embedding: Optional[Tensor] = None) -> Dict:
        return {FieldHeadNames.RGB: self._evaluate(ray_samples, with_rgb=True)[..., 1:]}

    def factor_sets(self) -> List[BlockFactors]:
        return [self.density, self.appearance]

    def grid_parameters(self) -> List[nn.Parameter]:
        """Planes and lines (the 'grids' optimiser group)."""
        return [p for factors in self.factor_sets() for p in factors.parameters()]

    def decoder_parameters(self) -> List[nn.Parameter]:
        """Basis, decoder MLP and appearance embedding (the 'decoder' optimiser group)."""
        grid = {id(p) for p in self.grid_parameters()}
        return [p for p in self.parameters() if id(p) not in grid]
