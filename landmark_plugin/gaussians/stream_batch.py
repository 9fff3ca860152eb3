"""What a streamed batch carries between its passes (``gaussians/stream.py`` and
``gaussians/stream_clip.py``), and the visible Adam step of one held group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.core.visible_adam import visible_adam_step_
from landmark_plugin.step_guard import find_nonfinite


@dataclass
class GroupCrop:
    """One group's partial for one camera, cropped to where it is not empty."""

    rect: Tuple[int, int, int, int]
    color: Tensor  # [h, w, D]; a leaf tensor in training (its .grad is what backward_step_ reads)
    trans: Tensor  # [h, w, 1]


@dataclass
class StreamedBatch:
    """What the forward pass leaves for ``backward_step_``."""

    views: list
    with_depth: bool
    cameras: Dict[int, List[int]]  # group -> the cameras it renders for
    rows: Dict[int, Tensor]  # group -> the host rows its renders draw (clip: copies from other groups too)
    own: Optional[Dict[int, Tuple[Tensor, Tensor]]] = None  # clip: group -> (own rows, [B, n] their radii)
    guests: Optional[Any] = None  # ``stream_clip.Guests``  # clip on several ranks: other ranks' Gaussians drawn here
    crops: Dict[Tuple[int, int], GroupCrop] = field(default_factory=dict)  # (group, camera) -> crop, if not empty

    def image_gradients(self) -> List[Tensor]:
        """The crops' gradients after the trainer's backward: what the Gaussians' gradients are
        made from in ``backward_step_``, so the trainer's non-finite check reads these."""
        return [t.grad for c in self.crops.values() for t in (c.color, c.trans) if t.grad is not None]


def nonfinite_group_(model, step: int, group: str) -> bool:
    """Whether the held group's Gaussian gradients hold a NaN / Inf; if so they are dropped, so
    the group is not stepped (its rows keep their values and moments).  The trainer's check ran
    before any group was re-rendered and saw only the image gradients (``image_gradients``): a
    NaN born in a group's own backward is caught here, group by group, since earlier groups
    are already written back."""
    found = find_nonfinite({}, {name: model.optimizers[name] for name in model.gauss_params})
    if not found.any:
        return False
    for param in model.gauss_params.values():
        param.grad = None
    CONSOLE.print(f"[bold yellow]step {step}: streamed {group}: {found.describe()}; its rows are not stepped")
    return True


def visible_adam_group_(model, visible: Tensor, step: Optional[int]) -> int:
    """Visible Adam on the held group's Gaussian parameters, as ``VisibleAdam.step`` would take it
    for the whole batch: one step count per batch (``step``: the count of this batch, None on its
    first group), the gradients then dropped so that the trainer's step has none to take."""
    optimizers = model.optimizers
    for name, param in model.gauss_params.items():
        if param.grad is None:  # nothing drawn: the visible rows still take their momentum step
            param.grad = torch.zeros_like(param)
        optimizer = optimizers[name]
        state = optimizer.state[param]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        if step is None:
            step = int(state["step"].item()) + 1
        state["step"] = torch.full((), float(step), dtype=torch.float32)
        group = optimizer.param_groups[0]
        visible_adam_step_(param, param.grad, state["exp_avg"], state["exp_avg_sq"], visible.to(param.device),
                           step, group["lr"], group["betas"], group["eps"])
        param.grad = None
    return step
