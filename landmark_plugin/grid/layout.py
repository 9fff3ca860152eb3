"""landmark-grid's adapter of layout edits (``landmark_plugin.edits``): blocks are the x-y blocks.

Not ``core.grid_parallel.GridLayout``, which lays the grid out over ranks."""

from __future__ import annotations

from typing import List

from jaxtyping import Float
from torch import Tensor

from landmark_plugin.core.edits import grid_block_boxes
from landmark_plugin.edits import BlockStats, LayoutEdits, appearance_mix


class GridEditLayout:
    """landmark-grid: blocks are the x-y blocks; edits act on every sample point of the field and
    of the proposal grids (so the sampler puts samples where the edited content is)."""

    kind = "block"
    item_name = "parameters"

    def __init__(self, model) -> None:
        self.model = model

    @property
    def num_blocks(self) -> int:
        bx, by = self.model.field.config.blocks
        return bx * by

    @property
    def num_images(self) -> int:
        embedding = self.model.field.embedding_appearance
        return 0 if embedding is None else embedding.in_dim

    def boxes(self) -> Float[Tensor, "B 2 3"]:
        field = self.model.field
        return grid_block_boxes(field.aabb, tuple(field.config.blocks))

    def stats(self) -> List[BlockStats]:
        """Planes and per-block lines of the field and proposal grids, per block (shared lines left out)."""
        items = [0] * self.num_blocks
        size = [0] * self.num_blocks
        fields = [self.model.field, *self.model.proposal_networks]
        for factors in (f for field in fields for f in field.factor_sets()):
            for param in [*factors.planes, *factors.lines]:
                if param.shape[0] != self.num_blocks:
                    continue  # a line shared by all blocks
                per_block = param[0].numel()
                for b in range(self.num_blocks):
                    items[b] += per_block
                    size[b] += per_block * param.element_size()
        return [BlockStats(n, s) for n, s in zip(items, size)]

    def install(self, edits: LayoutEdits, source: str = "edits") -> None:
        box_edits = tuple(edits.resolve(self.boxes(), self.kind, source))
        mix = appearance_mix(edits, self.num_images, source, "appearance codes; this model has appearance_embed_dim 0")
        for field in (self.model.field, *self.model.proposal_networks):
            field.layout_edits = box_edits
        self.model.field.eval_appearance_mix = mix
