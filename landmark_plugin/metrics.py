"""Image metrics that survive offline machines.

nerfstudio's models build torchmetrics' LPIPS in ``populate_modules``; LPIPS downloads AlexNet
weights on construction, so offline every model crashes at start-up (nerfstudio 1.1.5).  We
build it when the weights can be had and otherwise skip LPIPS with one warning: PSNR and SSIM
are still computed, and the ``lpips`` entries are left out of the metrics rather than faked.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Dict, Iterator

import torch
import torchmetrics.image.lpip as tm_lpip

_RealLPIPS = tm_lpip.LearnedPerceptualImagePatchSimilarity


class UnavailableLPIPS:
    """Stands in for LPIPS when its weights cannot be loaded: returns NaN, which callers drop."""

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(float("nan"))

    def to(self, *args, **kwargs) -> "UnavailableLPIPS":
        return self


def build_lpips(**kwargs):
    """torchmetrics LPIPS (normalize=True by default), or ``UnavailableLPIPS`` with a warning."""
    kwargs.setdefault("normalize", True)
    try:
        return _RealLPIPS(**kwargs)
    except Exception as err:  # URLError / HTTPError / OSError offline, RuntimeError on bad weights
        warnings.warn(
            f"LPIPS is skipped: its AlexNet weights could not be loaded ({type(err).__name__}: {err}). "
            "Put alexnet-owt-7be5be79.pth under $TORCH_HOME/hub/checkpoints to enable it.",
            stacklevel=2,
        )
        return UnavailableLPIPS()


@contextlib.contextmanager
def offline_safe_lpips(*modules) -> Iterator[None]:
    """Within the block, constructing LPIPS gives ``build_lpips()`` instead of raising offline.

    nerfstudio's models import the class inside ``populate_modules`` from torchmetrics, so the
    torchmetrics module attribute is what must be swapped; ``modules`` names any further module
    that imported the class at its top level.
    """
    targets = [tm_lpip, *modules]
    saved = [getattr(m, "LearnedPerceptualImagePatchSimilarity") for m in targets]
    for m in targets:
        m.LearnedPerceptualImagePatchSimilarity = build_lpips  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m, cls in zip(targets, saved):
            m.LearnedPerceptualImagePatchSimilarity = cls  # type: ignore[attr-defined]


def without_unavailable_lpips(metrics: Dict[str, float]) -> Dict[str, float]:
    """Drop LPIPS entries that could not be computed (NaN from ``UnavailableLPIPS``)."""
    return {k: v for k, v in metrics.items() if not ("lpips" in k and isinstance(v, float) and math.isnan(v))}


def lpips_or_nan(lpips, pred: torch.Tensor, gt: torch.Tensor) -> float:
    """LPIPS of [1,3,H,W] images in [0,1], NaN when LPIPS is unavailable."""
    return float(lpips(pred, gt))
