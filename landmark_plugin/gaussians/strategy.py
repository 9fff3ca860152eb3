"""Densification policy for retina-gs: gsplat's DefaultStrategy plus leaf ownership upkeep.

gsplat's strategy decides per Gaussian (gradient, scale, opacity), so running it on a set of
leaves is the same as running it per leaf; what a partition adds is ownership: a Gaussian
that moved, or a child created by a split, must belong to the leaf that holds its mean.  The
model re-assigns ownership after every refinement, and optionally rebuilds the tree from the
current means to rebalance leaf counts (what the distributed pipeline migrates across ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gsplat.strategy import DefaultStrategy

if TYPE_CHECKING:
    from landmark_plugin.gaussians.model import RetinaGSModelConfig


@dataclass
class RetinaStrategyConfig:
    """When leaf ownership is refreshed and the kd-tree rebuilt."""

    rebuild_tree_every: int = 0
    """Rebuild the kd-tree from the current means every this many steps (0: keep the initial
    tree).  Rebuilding rebalances the Gaussian count of every leaf."""

    def make_gsplat_strategy(self, model: "RetinaGSModelConfig", num_train_data: int) -> DefaultStrategy:
        """gsplat's DefaultStrategy with splatfacto's mapping of its config fields."""
        return DefaultStrategy(
            prune_opa=model.cull_alpha_thresh,
            grow_grad2d=model.densify_grad_thresh,
            grow_scale3d=model.densify_size_thresh,
            grow_scale2d=model.split_screen_size,
            prune_scale3d=model.cull_scale_thresh,
            prune_scale2d=model.cull_screen_size,
            refine_scale2d_stop_iter=model.stop_screen_size_at,
            refine_start_iter=model.warmup_length,
            refine_stop_iter=model.stop_split_at,
            reset_every=model.reset_alpha_every * model.refine_every,
            refine_every=model.refine_every,
            pause_refine_after_reset=num_train_data + model.refine_every,
            absgrad=model.use_absgrad,
            revised_opacity=False,
            verbose=False,
        )

    def refreshes_at(self, step: int, model: "RetinaGSModelConfig") -> bool:
        """Ownership is refreshed at every refinement step, when Gaussians are added or removed."""
        return step > 0 and step % model.refine_every == 0

    def rebuilds_at(self, step: int) -> bool:
        return self.rebuild_tree_every > 0 and step > 0 and step % self.rebuild_tree_every == 0
