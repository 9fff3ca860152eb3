"""The ``splatfacto-mcmc`` variant of scripts/bench_gaussians.py (see ``splatfacto_mcmc_model_config``)."""

from __future__ import annotations

import copy

import torch

_SPLATFACTO_MCMC = None


def splatfacto_mcmc_model_config(splatfacto_config, cap: int):
    """BENCH ONLY: splatfacto with gsplat 1.4.0's MCMCStrategy in place of its DefaultStrategy,
    so retina-gs-mcmc has a splatfacto reference on the same recipe.  Not a product feature.

    nerfstudio 1.1.5's splatfacto calls ``strategy.step_post_backward(..., packed=False)`` and
    reads ``strategy.absgrad``; gsplat's MCMC wants ``lr`` (the means' current learning rate,
    as in gsplat's simple_trainer) and its state from ``initialize_state()``.  gsplat's
    simple_trainer adds ``0.01 * mean(sigmoid(opacities))`` and ``0.01 * mean(exp(scales))`` to
    the loss with MCMC; the adapter does too.  Refinement schedule: splatfacto's warmup_length /
    stop_split_at / refine_every, as retina-gs's MCMC (gaussians/mcmc.py refines_at).
    """
    global _SPLATFACTO_MCMC
    if _SPLATFACTO_MCMC is None:
        from dataclasses import dataclass, field
        from typing import Type

        from gsplat.strategy import MCMCStrategy
        from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig

        @dataclass
        class NerfstudioMCMCStrategy(MCMCStrategy):
            absgrad: bool = False  # splatfacto passes strategy.absgrad to rasterization()

        class SplatfactoMCMCModel(SplatfactoModel):
            config: "SplatfactoMCMCModelConfig"

            def populate_modules(self):
                super().populate_modules()
                c = self.config
                self.strategy = NerfstudioMCMCStrategy(
                    cap_max=c.mcmc_cap_max, noise_lr=5e5, refine_start_iter=c.warmup_length,
                    refine_stop_iter=c.stop_split_at, refine_every=c.refine_every, min_opacity=0.005)
                self.strategy_state = self.strategy.initialize_state()

            def step_post_backward(self, step):
                assert step == self.step
                self.strategy.step_post_backward(
                    params=self.gauss_params, optimizers=self.optimizers, state=self.strategy_state,
                    step=self.step, info=self.info, lr=self.optimizers["means"].param_groups[0]["lr"])

            def get_loss_dict(self, outputs, batch, metrics_dict=None):
                loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
                if self.training:
                    loss_dict["mcmc_opacity_reg"] = 0.01 * torch.sigmoid(self.opacities).mean()
                    loss_dict["mcmc_scale_reg"] = 0.01 * torch.exp(self.scales).mean()
                return loss_dict

        @dataclass
        class SplatfactoMCMCModelConfig(SplatfactoModelConfig):
            _target: Type = field(default_factory=lambda: SplatfactoMCMCModel)
            mcmc_cap_max: int = 1_000_000

        _SPLATFACTO_MCMC = SplatfactoModelConfig, SplatfactoMCMCModelConfig
    base_cls, mcmc_cls = _SPLATFACTO_MCMC
    from dataclasses import fields

    mcmc = mcmc_cls(mcmc_cap_max=cap)
    for f in fields(base_cls):
        if f.name != "_target":
            setattr(mcmc, f.name, copy.deepcopy(getattr(splatfacto_config, f.name)))
    return mcmc
