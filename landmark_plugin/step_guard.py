"""Skipping training steps whose loss or gradients are NaN / Inf.

One bad batch (a degenerate camera, an overflow) should cost one step, not the run; a
persistent NaN (a poisoned parameter, a learning rate that diverged) should stop the run
with a message that says where to look.  The trainer asks ``find_nonfinite`` after the
backward pass; on a hit it drops the gradients, skips the optimiser and scheduler step, and
``SkippedStepCallback`` keeps the after-step callbacks (densification statistics, refinement)
from seeing the step.  ``NonFiniteSteps`` counts and raises once too many come in a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps had a NaN / Inf loss or gradient."""


@dataclass
class NonFinite:
    """What was not finite in one step."""

    loss_terms: List[str] = field(default_factory=list)
    """Names of the loss terms that are NaN / Inf."""
    param_groups: List[str] = field(default_factory=list)
    """Names of the optimiser (parameter) groups with a NaN / Inf gradient."""

    @property
    def any(self) -> bool:
        return bool(self.loss_terms or self.param_groups)

    def describe(self) -> str:
        parts = []
        if self.param_groups:
            parts.append(f"gradient of parameter group(s) {', '.join(map(repr, self.param_groups))}")
        if self.loss_terms:
            parts.append(f"loss term(s) {', '.join(map(repr, self.loss_terms))}")
        return " and ".join(parts) + " not finite (NaN / Inf)"


def find_nonfinite(
    loss_dict: Dict[str, torch.Tensor],
    optimizers: Dict[str, torch.optim.Optimizer],
    gradients: Optional[Dict[str, List[torch.Tensor]]] = None,
) -> NonFinite:
    """The loss terms and optimiser groups (by name) holding NaN / Inf; one device sync.

    The parameters are read from the optimisers themselves: densification replaces parameter
    tensors, and what the optimiser would step is what matters.  ``gradients`` names other
    gradients the step will be made from (retina-gs streaming: the image gradients its
    subtrees' parameter gradients come from after this check).
    """
    names, flags = [], []
    for name, value in loss_dict.items():
        names.append(("loss", name))
        flags.append(torch.isfinite(value.detach()).all())
    groups = [(name, [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None])
              for name, opt in optimizers.items()]
    for name, grads in groups + list((gradients or {}).items()):
        if grads:
            names.append(("grad", name))
            # One fused launch per group instead of two per tensor: an L1 norm is NaN / Inf
            # exactly when an entry is (barring overflow of a sum of finite magnitudes > 3e38).
            flags.append(torch.isfinite(torch.stack(torch._foreach_norm(grads, 1))).all())
    if not flags:
        return NonFinite()
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # the one sync
    found = NonFinite()
    for (kind, name), ok in zip(names, finite):
        if not ok:
            (found.loss_terms if kind == "loss" else found.param_groups).append(name)
    return found


@dataclass
class NonFiniteSteps:
    """Counts skipped steps; raises ``NonFiniteTrainingError`` at ``limit`` in a row."""

    limit: int
    consecutive: int = 0
    total: int = 0
    last_skipped: Optional[int] = None

    def passed(self) -> None:
        self.consecutive = 0

    def skipped(self, step: int, found: NonFinite) -> str:
        """Record a skipped step; return the report line, or raise at the limit."""
        self.consecutive += 1
        self.total += 1
        self.last_skipped = step
        if self.consecutive >= self.limit:
            raise NonFiniteTrainingError(
                f"step {step}: {found.describe()}; {self.consecutive} steps in a row were skipped, stopping "
                f"(--max-consecutive-nonfinite-steps {self.limit}). The last checkpoint holds the last good "
                "parameters: resume from it, e.g. with lower learning rates for that group"
            )
        return (f"step {step}: {found.describe()}; step skipped ({self.consecutive} in a row, "
                f"{self.total} in this run)")  # fmt: skip

    def was_skipped(self, step: int) -> bool:
        return self.last_skipped == step


class SkippedStepCallback(TrainingCallback):
    """A training callback that does not run after a skipped step."""

    def __init__(self, callback: TrainingCallback, was_skipped: Callable[[int], bool]):  # noqa: D107
        self.callback = callback
        self.was_skipped = was_skipped

    def __getattr__(self, name: str):  # where_to_run, func, ... of the wrapped callback
        return getattr(self.__dict__["callback"], name)

    def run_callback(self, step: int) -> None:
        self.callback.run_callback(step)

    def run_callback_at_location(self, step: int, location: TrainingCallbackLocation) -> None:
        if location == TrainingCallbackLocation.AFTER_TRAIN_ITERATION and self.was_skipped(step):
            return
        self.callback.run_callback_at_location(step, location)


def gradient_norms(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Per-parameter gradient norms and their sum, as nerfstudio's ``--log-gradients`` logs them."""
    norms = {f"Gradients/{name}": p.grad.norm() for name, p in model.named_parameters() if p.grad is not None}
    norms["Gradients/Total"] = sum(norms.values(), torch.tensor(0.0))
    return norms
