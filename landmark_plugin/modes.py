"""A model's train / eval mode switched for one block and restored afterwards.

Renders outside training (eval, the viewer, held-out appearance fits) must run in eval mode
(no pose correction, full resolution, the evaluation appearance) whatever mode the caller left
the model in, and hand it back in that mode: nerfstudio's eval loop leaves models in eval mode
and the trainer does not switch them back before the next step.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode within the block, in its previous mode after it (also on errors)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
