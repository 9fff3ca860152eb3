"""retina-gs's adapter of layout edits (``landmark_plugin.edits``): blocks are kd-tree leaves."""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from landmark_plugin.edits import BlockStats, LayoutEdits, appearance_mix


class RetinaEditLayout:
    """retina-gs: blocks are kd-tree leaves; edits act on the Gaussians by their means."""

    kind = "leaf"
    item_name = "Gaussians"

    def __init__(self, model, means_extent: Optional[Float[Tensor, "2 3"]] = None) -> None:
        """``means_extent``: [2, 3] min / max corner of all the scene's means, where the model
        holds one rank's shard of them (default: the model's own means)."""
        self.model = model
        self.means_extent = means_extent

    @property
    def num_blocks(self) -> int:
        return 2**self.model.config.tree_depth

    @property
    def num_images(self) -> int:
        """Training images with an appearance (a bilateral grid or an embedding each)."""
        grids = getattr(self.model, "bil_grids", None)
        if getattr(self.model, "gaussian_appearance", None) is not None:
            return int(self.model.num_train_data)
        return 0 if grids is None else int(grids.grids.shape[0])

    def boxes(self) -> Float[Tensor, "L 2 3"]:
        """Leaf boxes cut from the tree's box grown to hold every mean (float64, CPU).

        The far faces move out by one float64 step, so half-open containment equals ownership.
        """
        tree = self.model.cpu_tree
        lo, hi = tree.bounds[0].clone(), tree.bounds[1].clone()
        extent = self.means_extent
        if extent is None and self.model.num_points > 0:
            means = self.model.means.detach().to("cpu", torch.float64)
            extent = torch.stack([means.min(0).values, means.max(0).values])
        if extent is not None:
            lo, hi = torch.minimum(lo, extent[0].to(lo)), torch.maximum(hi, extent[1].to(hi))
        hi = torch.nextafter(hi, torch.full_like(hi, math.inf))
        return tree.leaf_boxes(root=torch.stack([lo, hi]))

    def stats(self) -> List[BlockStats]:
        counts = self.model.leaf_counts().tolist()
        per_gaussian = sum(p[0].numel() * p.element_size() for p in self.model.gauss_params.values())
        return [BlockStats(int(n), int(n) * per_gaussian) for n in counts]

    def install(self, edits: LayoutEdits, source: str = "edits") -> None:
        missing = ("per-image appearance, which this retina-gs model does not have "
                   "(train with --pipeline.model.use-bilateral-grid True, --pipeline.model.affine-appearance True "
                   "or --pipeline.model.appearance-features 16)")
        mix = appearance_mix(edits, self.num_images, source, missing)
        self.model.layout_edits = tuple(edits.resolve(self.boxes(), self.kind, source))
        self.model.eval_appearance_mix = mix
