"""The relocation rule of MCMC densification (3DGS-MCMC, Kheradmand et al. 2024, equation 9).

When one Gaussian of opacity o is replaced by n that sit at the same place (a dead Gaussian
moved onto it, or new ones added), each gets opacity 1 - (1 - o)^(1/n) and its scale times
o / sum_{i=1..n} sum_{k<i} C(i-1, k) (-1)^k o_new^(k+1) / sqrt(k+1), so that the rendered
density stays the same.  gsplat computes it in a CUDA kernel (``compute_relocation``); this is
the same function in torch (float64, any device), which retina-gs uses everywhere.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

def relocation(
    opacities: Float[Tensor, " N"], scales: Float[Tensor, "N 3"], ratios: Int[Tensor, " N"]
) -> tuple[Float[Tensor, " N"], Float[Tensor, "N 3"]]:
    """Opacity and scale of each of ``ratios`` Gaussians that replace one (equation 9):
    1 - (1 - o)^(1/n), and the scale times o / sum_{i=1..n} sum_{k<i} C(i-1, k) (-1)^k
    o_new^(k+1) / sqrt(k+1).  The double sum is sum_k C(n, k+1) (-1)^k o_new^(k+1) / sqrt(k+1)
    (sum_{i>k} C(i-1, k) = C(n, k+1)); ratios are clamped to [1, 51] as gsplat does."""
    n = ratios.clamp(1, 51).to(torch.float64)
    o = opacities.to(torch.float64)
    new_o = 1.0 - torch.pow(1.0 - o, 1.0 / n)
    k = torch.arange(51, dtype=torch.float64, device=o.device)
    binom = torch.exp(torch.lgamma(n[:, None] + 1) - torch.lgamma(k + 2) - torch.lgamma(n[:, None] - k))
    binom = torch.where(k[None] < n[:, None], binom, 0.0)
    terms = binom * torch.where(k % 2 == 0, 1.0, -1.0) / torch.sqrt(k + 1) * new_o[:, None] ** (k + 1)
    factor = o / terms.sum(dim=1)
    return new_o.to(opacities.dtype), (scales.to(torch.float64) * factor[:, None]).to(scales.dtype)
