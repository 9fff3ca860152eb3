"""Visible Adam for retina-gs (``--pipeline.model.visible-adam``): the nerfstudio side of
``core.visible_adam``.

The method configs give the Gaussian groups ``VisibleAdamOptimizerConfig``: exactly Adam until
the model binds a visibility to it.  With the option on, the model binds its frame's
``visible_rows`` (the Gaussians any camera of the last training batch drew, on this rank, copies
drawn on other ranks included) before every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Type

import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig

from landmark_plugin.core.visible_adam import VisibleAdam
from landmark_plugin.errors import ConfigError

GAUSSIAN_GROUPS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities", "appearance_features")


@dataclass
class VisibleAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam that can step only the Gaussians a batch saw (``--pipeline.model.visible-adam``);
    without that option it is torch.optim.Adam."""

    _target: Type = VisibleAdam


def bind_visibility(model, optimizers: Dict[str, torch.optim.Optimizer]) -> None:
    """Point the Gaussian groups' optimisers at the model's visibility, or unbind them."""
    wanted = model.config.visible_adam
    for name in GAUSSIAN_GROUPS:
        optimizer = optimizers.get(name)
        if optimizer is None:
            continue
        if isinstance(optimizer, VisibleAdam):
            optimizer.visibility = model.visible_rows if wanted else None
        elif wanted:
            raise ConfigError(
                f"--pipeline.model.visible-adam True needs the Gaussian groups' optimizer to be "
                f"VisibleAdamOptimizerConfig (the retina-gs method configs use it); group '{name}' "
                f"has {type(optimizer).__name__}"
            )
