"""retina-gs out of core (``--pipeline.model.offload host``): this rank's Gaussians live in host
memory, and each training batch stages only the leaves its cameras can draw.

The store keeps every row of the shard (parameters, Adam moments, densification statistics: the
``rows.gaussian_rows`` matrix, in pinned memory on CUDA) and the leaf of every row.  Before a
batch renders, ``stage`` writes the rows the model holds back to the store and gives the model the
rows of the leaves ``core.frustum.leaves_in_view`` keeps for any camera of the batch.  A leaf
left behind holds no Gaussian the projection keeps, so the image, the loss and every gradient are
the in-memory run's; with visible Adam (which offload requires) a Gaussian no camera drew is not
stepped, so the rows left on the host are exactly what the in-memory run has too.

Steps that need every Gaussian (refinement, opacity reset, ownership refresh, tree rebuild),
checkpoints and renders outside training (eval, ns-render, the viewer) ``materialize`` the store:
the model holds every row again, on its device, until the next batch stages.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.core.frustum import LeafBounds, leaves_in_view
from landmark_plugin.errors import ConfigError
from landmark_plugin.gaussians.rows import gaussian_rows, layout_columns, set_gaussian_rows_


class OffloadStore:
    """Host copy of one rank's Gaussians and which of its rows the model holds (see module doc)."""

    def __init__(self, model):
        self.model = model
        self.rows: Optional[Tensor] = None  # [N, D] host, every row of the shard while staged
        self.layout = None
        self.leaf_ids: Optional[Tensor] = None  # [N] host
        self.bounds: Optional[LeafBounds] = None
        self.index: Optional[Tensor] = None  # [n] host rows the model holds; None: the model holds all
        self.staged_rows: list = []  # rows staged per batch (for the benchmark and the tests)

    @property
    def staged(self) -> bool:
        return self.index is not None

    def reset(self) -> None:
        """Forget the host copy (the model's rows were replaced, e.g. by loading a checkpoint)."""
        self.rows = self.layout = self.leaf_ids = self.bounds = self.index = None

    # ---- moving rows ------------------------------------------------------------------------
    def _optimizers(self) -> Optional[Dict]:
        return getattr(self.model, "optimizers", None)

    def _capture(self) -> None:
        """The model holds every row: copy them all to the host."""
        model = self.model
        rows, self.layout = gaussian_rows(model, self._optimizers(), model.strategy_state)
        self.rows = _to_host(rows)
        self.leaf_ids = model.leaf_ids.detach().cpu()
        self.bounds = self._bounds_of(self.rows, self.leaf_ids)

    def _write_back(self) -> None:
        """The model's (staged) rows replace theirs in the host copy; their leaves' bounds follow."""
        model = self.model
        rows, layout = gaussian_rows(model, self._optimizers(), model.strategy_state)
        if rows.shape[0] != self.index.numel() or layout != self.layout:
            raise RuntimeError("offload: the staged Gaussians changed outside a materialized step")
        self.rows[self.index] = rows.to(self.rows.device)
        leaves = torch.zeros(self.bounds.lo.shape[0], dtype=torch.bool)
        leaves[self.leaf_ids[self.index]] = True
        self.bounds.update_(self._bounds_of(self.rows[self.index], self.leaf_ids[self.index]), leaves)

    def _bounds_of(self, rows: Tensor, leaf_ids: Tensor) -> LeafBounds:
        columns = layout_columns(self.layout)
        means, scales = rows[:, columns[("means", "param")]], torch.exp(rows[:, columns[("scales", "param")]])
        return LeafBounds.of(means, scales, leaf_ids, 2**self.model.config.tree_depth)

    def _hold(self, index: Optional[Tensor]) -> None:
        """The model holds the rows ``index`` of the host copy (None: all of them)."""
        model = self.model
        rows = self.rows if index is None else self.rows[index]
        set_gaussian_rows_(model, self._optimizers(), model.strategy_state, rows.to(model.device, non_blocking=True), self.layout)
        leaf_ids = self.leaf_ids if index is None else self.leaf_ids[index]
        model.leaf_ids = leaf_ids.to(model.device)
        self.index = index

    # ---- the two operations -----------------------------------------------------------------
    def stage(self, views) -> None:
        """Hold only the leaves that any of ``views`` (``frame.View``) can draw."""
        if self.index is None:
            self._capture()
        else:
            self._write_back()
        frame = self.model.frame
        needed = torch.zeros(self.bounds.lo.shape[0], dtype=torch.bool)
        for v in views:
            needed |= leaves_in_view(self.bounds, v.viewmat, v.K, v.width, v.height, frame.settings).cpu()
        index = torch.nonzero(needed[self.leaf_ids]).flatten()
        self._hold(index)
        self.staged_rows.append(int(index.numel()))

    def materialize(self) -> None:
        """Hold every row again (and free the host copy)."""
        if self.index is None:
            return
        self._write_back()
        self._hold(None)
        self.reset()


def offload_store(model) -> Optional[OffloadStore]:
    """The model's store when offload is on (made at the first call; ``auto`` decided then),
    else None.  Raises ConfigError for the combinations offload cannot keep exact."""
    if model.offload_store is not None:
        return model.offload_store
    choice = model.config.offload
    if choice == "auto":
        choice = _auto_choice(model)
    if choice == "none":
        return None
    if not model.config.visible_adam:
        raise ConfigError(
            "--pipeline.model.offload host needs --pipeline.model.visible-adam True: a Gaussian left "
            "in host memory cannot take Adam's momentum step that standard Adam gives every Gaussian"
        )
    if model.config.strategy.kind != "default":
        raise ConfigError("--pipeline.model.offload host works with the default strategy only (MCMC moves every "
                          "Gaussian at every step)")
    model.offload_store = OffloadStore(model)
    return model.offload_store


def _auto_choice(model) -> str:
    """host when this rank's training footprint (parameters, gradients and two moments, and as
    much again for the render's intermediates) would pass the GPU's free memory."""
    model.config.offload = "none"  # decided once
    if model.device.type != "cuda":
        return "none"
    rows, _ = gaussian_rows(model, None, None)
    predicted = rows.shape[0] * rows.shape[1] * rows.element_size() * 4 * 2
    free, _ = torch.cuda.mem_get_info(model.device)
    if predicted <= free:
        return "none"
    CONSOLE.print(f"retina-gs: offload auto -> host (predicted footprint {predicted / 2**30:.1f} GiB, "
                  f"GPU free {free / 2**30:.1f} GiB)")
    model.config.offload = "host"
    return "host"


def _to_host(rows: Tensor) -> Tensor:
    host = rows.detach().cpu()
    return host.pin_memory() if rows.is_cuda else host.clone()


def expand_info(info: Dict, index: Tensor, num_rows: int) -> Dict:
    """gsplat's ``info`` of a batch over staged rows ``index``, as over all ``num_rows`` rows
    (Gaussians that were not staged were not drawn: radius 0, no gradient)."""
    index = index.to(info["radii"].device)

    def spread(t: Tensor) -> Tensor:
        out = t.new_zeros((t.shape[0], num_rows) + tuple(t.shape[2:]))
        out[:, index] = t
        return out

    means2d = info["means2d"]
    stand_in = spread(means2d.detach())
    stand_in.grad = spread(means2d.grad)
    stand_in.absgrad = spread(means2d.absgrad)
    return {**info, "means2d": stand_in, "radii": spread(info["radii"])}
