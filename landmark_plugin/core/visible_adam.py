"""Adam that steps only the rows (Gaussians) a batch saw: "visible Adam".

Standard Adam moves a Gaussian the batch did not see: its gradient is zero, but its first moment
is not, so it keeps drifting for many steps after it left the view.  gsplat's ``SelectiveAdam``
(Taming 3DGS) updates only the visible rows: their moments and parameters step, every other row
is left exactly as it was.  That is also the rule a Gaussian streamed from host memory can honour
(a leaf that is not uploaded cannot be stepped), so in-memory and streamed training agree.

Unlike gsplat's kernel, the bias correction of ``torch.optim.Adam`` is kept (one step count per
optimiser, as torch keeps it): with every row visible this is exactly ``torch.optim.Adam``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from jaxtyping import Bool
from torch import Tensor


@torch.no_grad()
def visible_adam_step_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, visible: Bool[Tensor, " N"],
    step: int, lr: float, betas: tuple, eps: float,
) -> None:
    """One Adam update (``step`` counts from 1) of the rows ``visible`` of ``param`` [N, ...] in place.

    Rows outside ``visible`` keep their parameter and both moments bit for bit.  Masked
    arithmetic over all rows (no gather of the visible ones) keeps it free of host-device
    synchronisation.
    """
    beta1, beta2 = betas
    mask = visible.reshape((-1,) + (1,) * (param.dim() - 1))
    new_avg = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (new_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    new_param = param.addcdiv(new_avg, denom, value=-step_size)
    exp_avg.copy_(torch.where(mask, new_avg, exp_avg))
    exp_avg_sq.copy_(torch.where(mask, new_avg_sq, exp_avg_sq))
    param.copy_(torch.where(mask, new_param, param))


class VisibleAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose step, while ``visibility`` gives a mask, moves only the rows the
    mask marks (``visible_adam_step_``); with no mask (``visibility`` unset or returning None) it
    is ``torch.optim.Adam``.  Its state dict is Adam's, so checkpoints do not depend on the choice.
    """

    visibility: Optional[Callable[[], Optional[Tensor]]] = None
    """Set by the model: [N] rows of the parameter seen by the last training batch."""

    def __init__(self, params, **kwargs):
        for unsupported in ("weight_decay", "amsgrad", "maximize"):
            if kwargs.get(unsupported):
                raise ValueError(f"VisibleAdam does not support {unsupported}")
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        visible = self.visibility() if self.visibility is not None else None
        if visible is None:
            return super().step(closure)
        if closure is not None:
            raise ValueError("VisibleAdam with a visibility mask takes no closure")
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if visible.shape[0] != param.shape[0]:
                    raise ValueError(f"visibility has {visible.shape[0]} rows, the parameter {param.shape[0]}")
                state = self.state[param]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                visible_adam_step_(
                    param, param.grad, state["exp_avg"], state["exp_avg_sq"], visible.to(param.device),
                    int(state["step"].item()), group["lr"], group["betas"], group["eps"],
                )
        return None
