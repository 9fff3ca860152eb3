"""MCMC densification for retina-gs (``strategy.kind mcmc``): the relocation rule, one process,
and 2 ranks against one process.

On 2 ranks the Gaussian COUNT equals one process's at every step, but not the Gaussians
themselves: each rank draws the dead Gaussians' new places and the added Gaussians' sources
among its own Gaussians (torch.multinomial's role, here an inverse-CDF draw), and the position
noise, from a generator seeded by (seed, step, rank).  A draw over all ranks would need every
Gaussian's opacity on every rank at each refinement; ``gaussians/mcmc.py`` says why it is not
done.  So the test asserts the counts and the invariants, not equal parameters.
"""

from __future__ import annotations

import math

import pytest
import torch

from _retina_dist_helpers import batch_losses, make_optimizers, no_termination, step_optimizers, stress_cameras, stress_model

from landmark_plugin.core.mcmc import relocation
from landmark_plugin.distributed.launch import run_ranks

FAST_START = dict(start_method="forkserver", preload=("landmark_plugin.gaussians.frame", "_retina_dist_helpers"))
STEPS, BATCH, CAMERAS, CAP = 22, 2, 6, 290


def _loop_relocation(o: float, scale: torch.Tensor, n: int):
    """Equation (9) written as the paper's double sum (gsplat's kernel), in float64."""
    new_o = 1.0 - (1.0 - o) ** (1.0 / n)
    denom = sum(math.comb(i - 1, k) * (-1) ** k / math.sqrt(k + 1) * new_o ** (k + 1) for i in range(1, n + 1) for k in range(i))
    return new_o, scale * o / denom


def test_relocation_is_equation_nine():
    g = torch.Generator().manual_seed(0)
    opacity = torch.rand(40, generator=g, dtype=torch.float64) * 0.98 + 0.01
    scales = torch.rand(40, 3, generator=g, dtype=torch.float64)
    ratios = torch.randint(1, 12, (40,), generator=g)
    new_o, new_s = relocation(opacity, scales, ratios)
    for i in range(40):
        want_o, want_s = _loop_relocation(float(opacity[i]), scales[i], int(ratios[i]))
        assert abs(float(new_o[i]) - want_o) < 1e-12
        torch.testing.assert_close(new_s[i], want_s, rtol=1e-9, atol=0)
    one_o, one_s = relocation(opacity, scales, torch.ones(40, dtype=torch.int64))
    torch.testing.assert_close(one_o, opacity, rtol=0, atol=1e-15)  # one Gaussian replaces itself
    torch.testing.assert_close(one_s, scales, rtol=1e-12, atol=0)


def _mcmc(model):
    model.config.strategy.kind = "mcmc"
    model.config.strategy.cap_max = CAP
    model.config.warmup_length, model.config.refine_every, model.config.stop_split_at = 4, 5, 100
    with torch.no_grad():  # some dead Gaussians to relocate
        model.gauss_params["opacities"][::17] = -8.0
    return model


def _worker(comm):
    from landmark_plugin.core.schedule import Parts
    from landmark_plugin.gaussians.frame import RetinaFrame
    from landmark_plugin.gaussians.mcmc import refines_at
    from landmark_plugin.gaussians.rows import shard_

    torch.set_default_dtype(torch.float64)
    model, cameras = _mcmc(stress_model(2)), stress_cameras()
    shard_(comm, model, Parts.of(2, comm.world_size))
    frame = RetinaFrame(comm, model, no_termination())
    model.frame = frame
    model.optimizers = make_optimizers(model)
    counts, dead_after_refine, regs, moments_ok = [], [], [], True
    for step in range(STEPS):
        model.step = step
        losses = batch_losses(frame, cameras, step, BATCH, CAMERAS)
        regs.append(float(losses["mcmc_reg"]))
        sum(losses.values()).backward()
        step_optimizers(model, model.optimizers)
        model.step_post_backward(step)
        counts.append(model.num_points)
        if refines_at(step, model.config):
            # a copy may sit at min_opacity itself (clamped): below it is dead
            dead_after_refine.append(int((torch.sigmoid(model.opacities) < 0.999 * model.config.strategy.min_opacity).sum()))
        for name, opt in model.optimizers.items():
            state = opt.state.get(model.gauss_params[name], {})
            moments_ok &= all(v.shape == model.gauss_params[name].shape for k, v in state.items() if k != "step")
    return {"counts": counts, "dead": dead_after_refine, "regs": regs, "moments_ok": moments_ok,
            "means_finite": bool(torch.isfinite(model.means).all())}


@pytest.mark.slow
def test_mcmc_grows_to_the_cap_relocates_the_dead_and_counts_the_same_on_two_ranks(tmp_path):
    (one,) = run_ranks(_worker, 1, tmp_path / "one", timeout_s=180, **FAST_START)
    counts = one["counts"]
    assert counts[4] == 240, "no refinement before warmup"
    grown = [counts[s] for s in (5, 10, 15, 20)]
    assert grown == [252, 264, 277, CAP], grown  # +5 % per refinement (int of 1.05 n), then the cap
    assert one["dead"] and all(d == 0 for d in one["dead"]), "no Gaussian stays dead after a refinement"
    assert one["moments_ok"] and one["means_finite"] and all(r > 0 for r in one["regs"])
    two = run_ranks(_worker, 2, tmp_path / "two", timeout_s=240, **FAST_START)
    assert [a + b for a, b in zip(two[0]["counts"], two[1]["counts"])] == counts
    assert all(d == 0 for r in two for d in r["dead"]) and all(r["moments_ok"] for r in two)
