"""Densification policy for retina-gs: gsplat's DefaultStrategy plus leaf ownership upkeep.

gsplat's strategy decides per Gaussian (gradient, scale, opacity), so running it on a set of
leaves is the same as running it per leaf; what a partition adds is ownership: a Gaussian
that moved, or a child created by a split, must belong to the leaf that holds its mean.  The
model re-assigns ownership after every refinement, and optionally rebuilds the tree from the
current means to rebalance leaf counts (what the distributed pipeline migrates across ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import duplicate, reset_opa, split
from gsplat.utils import normalized_quat_to_rotmat
from nerfstudio.models.splatfacto import SplatfactoModelConfig
from torch import Tensor


@dataclass
class RetinaStrategyConfig:
    """When leaf ownership is refreshed and the kd-tree rebuilt."""

    rebuild_tree_every: int = 0
    """Rebuild the kd-tree from the current means every this many steps (0: keep the initial
    tree).  Rebuilding rebalances the Gaussian count of every leaf."""
    kind: Literal["default", "mcmc"] = "default"
    """default: gsplat's DefaultStrategy (clone, split, prune on screen gradients, splatfacto's
    thresholds).  mcmc: 3DGS-MCMC (gsplat's MCMCStrategy; ``gaussians/mcmc.py``): a fixed
    growth of 5 % per refinement up to cap_max, low-opacity Gaussians relocated, position noise,
    opacity and scale regularisers."""
    max_gaussians: int = 0
    """default strategy: a Gaussian budget for the whole model, all ranks together (0: none).  A
    growth step that would pass it grows only the candidates (duplicates and splits) with the
    largest screen gradients that fit; the same ones on every world size."""
    cap_max: int = 1_000_000
    """mcmc: the most Gaussians of the whole model (all ranks together)."""
    noise_lr: float = 5e5
    """mcmc: position noise, times the means' current learning rate (gsplat's default)."""
    min_opacity: float = 0.005
    """mcmc: Gaussians at or below this opacity are relocated at refinement steps."""
    opacity_reg: float = 0.01
    """mcmc: weight of the mean opacity in the loss."""
    scale_reg: float = 0.01
    """mcmc: weight of the mean scale in the loss."""
    seed: int = 0
    """mcmc: seed of the relocation draws and the noise (per step and rank)."""

    def make_gsplat_strategy(self, model: SplatfactoModelConfig, num_train_data: int) -> "KeyedSplitStrategy":
        """gsplat's DefaultStrategy with splatfacto's mapping of its config fields (retina-gs
        keeps splatfacto's densification fields)."""
        return KeyedSplitStrategy(
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
            max_gaussians=self.max_gaussians,
        )

    def refreshes_at(self, step: int, model: SplatfactoModelConfig) -> bool:
        """Ownership is refreshed at every refinement step, when Gaussians are added or removed."""
        return step > 0 and step % model.refine_every == 0

    def rebuilds_at(self, step: int) -> bool:
        return self.rebuild_tree_every > 0 and step > 0 and step % self.rebuild_tree_every == 0


SplitNormals = Callable[[Tensor, int], Tensor]
"""(means [n, 3] of the Gaussians a step splits, step) -> standard normals [2, n, 3]."""
Gather = Callable[[Tensor], Tensor]
"""[n, D] rows of this rank -> every rank's rows, concatenated in rank order (collective)."""


@dataclass
class KeyedSplitStrategy(DefaultStrategy):
    """gsplat's DefaultStrategy whose splits take their random offsets from ``split_normals``.

    gsplat draws one ``randn(2, n, 3)`` over the Gaussians a process splits, so the children
    depend on how the Gaussians are spread over ranks.  ``split_normals`` (set by the model)
    draws them from the step and the Gaussians themselves in an order every partition agrees
    on, so one process and several ranks add the same children.  It is called at every
    growth step on every rank, also with no Gaussian to split, since it may be collective.
    """

    split_normals: Optional[SplitNormals] = None
    """The offsets' normals; None keeps gsplat's global-RNG draw."""
    max_gaussians: int = 0
    """The whole model's budget (``RetinaStrategyConfig.max_gaussians``); 0: none."""
    gather: Optional[Gather] = None
    """Every rank's rows (set by the model); None: this process holds the whole model."""

    def step_post_backward(self, params, optimizers, state, step: int, info, packed: bool = False):
        """gsplat's: the statistics of this batch, then ``refine``."""
        self.gather_statistics(params, state, step, info, packed)
        self.refine(params, optimizers, state, step)

    def gather_statistics(self, params, state, step: int, info, packed: bool = False) -> None:
        """The first half of gsplat's ``step_post_backward``: this batch's screen gradients,
        counts and radii added to ``state`` (until ``refine_stop_iter``)."""
        if step < self.refine_stop_iter:
            self._update_state(params, state, info, packed=packed)

    def touches_every_row(self, step: int) -> bool:
        """Whether ``refine`` at ``step`` reads or edits every Gaussian (growth, pruning, the
        opacity reset), not only those the batch drew."""
        if step >= self.refine_stop_iter:
            return False
        return self._grows_at(step) or step % self.reset_every == 0

    def _grows_at(self, step: int) -> bool:
        return step > self.refine_start_iter and step % self.refine_every == 0 and step % self.reset_every >= self.pause_refine_after_reset

    def refine(self, params, optimizers, state, step: int) -> None:
        """The half of gsplat's ``step_post_backward`` after the statistics: grow and prune at
        refinement steps (then clear the statistics), reset opacities every ``reset_every``.
        Apart so that streamed training can gather the statistics on the staged Gaussians and
        refine with every Gaussian in host memory."""
        if step >= self.refine_stop_iter:
            return
        if self._grows_at(step):
            self._grow_gs(params, optimizers, state, step)
            self._prune_gs(params, optimizers, state, step)
            state["grad2d"].zero_()
            state["count"].zero_()
            if self.refine_scale2d_stop_iter > 0:
                state["radii"].zero_()
        if step % self.reset_every == 0:
            reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)

    @torch.no_grad()
    def _grow_gs(self, params, optimizers, state, step: int):
        if self.split_normals is None:
            return super()._grow_gs(params, optimizers, state, step)
        grads = state["grad2d"] / state["count"].clamp_min(1)
        is_grad_high = grads > self.grow_grad2d
        is_small = torch.exp(params["scales"]).max(dim=-1).values <= self.grow_scale3d * state["scene_scale"]
        is_dupli = is_grad_high & is_small
        is_split = is_grad_high & ~is_small
        if step < self.refine_scale2d_stop_iter:
            is_split |= state["radii"] > self.grow_scale2d
        within = self._within_budget(is_dupli, is_split, grads, params["means"].shape[0])
        is_dupli, is_split = is_dupli & within, is_split & within
        n_dupli = int(is_dupli.sum())
        if n_dupli > 0:
            duplicate(params=params, optimizers=optimizers, state=state, mask=is_dupli)
        # Copies made by duplication are not split (gsplat's order).
        is_split = torch.cat([is_split, is_split.new_zeros(n_dupli)])
        sel = torch.where(is_split)[0]
        parents = params["means"][sel].detach().clone()
        normals = self.split_normals(parents, step).to(parents)
        if sel.numel() > 0:
            scales = torch.exp(params["scales"][sel])
            rotmats = normalized_quat_to_rotmat(torch.nn.functional.normalize(params["quats"][sel], dim=-1))
            split(params=params, optimizers=optimizers, state=state, mask=is_split, revised_opacity=self.revised_opacity)
            # gsplat appends the children as [first of every parent, second of every parent].
            offsets = torch.einsum("nij,nj,bnj->bni", rotmats, scales, normals)
            params["means"].data[-2 * sel.numel() :] = (parents[None] + offsets).reshape(-1, 3)
        return n_dupli, int(sel.numel())

    def _within_budget(self, is_dupli: Tensor, is_split: Tensor, grads: Tensor, count: int) -> Tensor:
        """Which growth candidates keep the model at ``max_gaussians`` or fewer: every rank's
        candidates ranked by screen gradient, each costing the Gaussians it adds (a duplicate
        one, a split one more, a Gaussian that is both two), and the longest ranked prefix that
        fits is kept -- as a cut on the gradient, so ties at the cut all stay out.  The cut
        depends only on the multiset of all candidates, so every partition grows the same."""
        if self.max_gaussians <= 0:
            return torch.ones_like(is_dupli)
        gather = self.gather if self.gather is not None else (lambda rows: rows)
        total = int(gather(torch.tensor([[count]], dtype=torch.float64, device=grads.device)).sum())
        cost = is_dupli.to(torch.float64) + is_split.to(torch.float64)
        grow = cost > 0
        everyone = gather(torch.stack([grads[grow].to(torch.float64), cost[grow]], dim=1))
        room = max(self.max_gaussians - total, 0)
        if float(everyone[:, 1].sum()) <= room:
            return torch.ones_like(is_dupli)
        order = torch.argsort(everyone[:, 0], descending=True)
        fits = int((torch.cumsum(everyone[order, 1], 0) <= room).sum())
        return grads.to(torch.float64) > everyone[order[fits], 0]
