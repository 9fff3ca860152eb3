"""retina-gs per-image appearance (splatfacto's bilateral grid) through the one frame path.

One process: a camera's composite goes through its own image's grid in training, and renders
outside training show the appearance a layout edit picks (an image's, a blend) or
``eval_appearance``.  Two gloo processes: images, loss, every gradient (Gaussians and grids)
and the parameters after 3 Adam steps equal one process (float64, clip mode, the stress scene).
"""

from __future__ import annotations

import functools

import pytest
import torch

from _retina_dist_helpers import make_optimizers, no_termination, step_optimizers, stress_cameras, stress_model, target_image

from landmark_plugin.distributed.launch import run_ranks

FAST_START = dict(start_method="forkserver", preload=("landmark_plugin.gaussians.frame", "_retina_dist_helpers"))
STEPS, BATCH, CAMERAS = 3, 2, 6
ATOL = 1e-5


def _model(kind: str = "bilateral"):
    torch.set_default_dtype(torch.float64)
    if kind == "gaussian":
        model = stress_model(2, appearance_features=6, appearance_embedding=4)
    elif kind == "affine":
        model = stress_model(2, affine_appearance=True)
    else:
        model = stress_model(2, use_bilateral_grid=True, grid_shape=(4, 4, 2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from identity, so every image's appearance changes its render
        for param in _appearance_params(model):
            param += 0.1 * torch.randn(param.shape, generator=g, dtype=torch.float64)
    return model


def _appearance_params(model) -> list:
    """The per-image appearance's replicated parameters: grids, or embeddings and MLP."""
    module = getattr(model, "gaussian_appearance", None)
    return list(module.parameters()) if module is not None else [model.bil_grids.grids]


def _render(model, cameras, index: int, image=None):
    camera = cameras[index : index + 1]
    if image is not None:
        camera.metadata = {"cam_idx": image}
    return model.get_outputs(camera)["rgb"]


@pytest.mark.parametrize("kind", ["bilateral", "affine"])
def test_each_image_renders_through_its_own_grid(kind):
    try:
        model, cameras = _model(kind), stress_cameras()
        grids = model.bil_grids.grids
        own = _render(model, cameras, 1, image=1)
        other = _render(model, cameras, 1, image=4)
        plain = _render(model, cameras, 1)  # no image index (e.g. a novel view): no grid
        assert (own - other).abs().max() > 1e-2 and (own - plain).abs().max() > 1e-2
        own.sum().backward()
        touched = grids.grad.flatten(1).abs().amax(dim=1) > 0
        # splatfacto's per-call TV over every grid is not computed per camera (the frame adds it once)
        assert "tv_loss" not in model.get_loss_dict(model.get_outputs(cameras[0:1]), {"image": target_image(0)})
        assert touched.tolist() == [i == 1 for i in range(grids.shape[0])], "only image 1's grid gets a gradient"
    finally:
        torch.set_default_dtype(torch.float32)


def test_grid_gradient_sync_is_splatfacto_tv_term_on_one_process():
    """sync_grid_gradients_ (the batch's rows summed over ranks, the TV gradient added on every
    rank) gives one process exactly the gradient of loss + splatfacto's TV term."""
    from nerfstudio.model_components.lib_bilagrid import total_variation_loss

    from landmark_plugin.distributed.groups import Comm
    from landmark_plugin.gaussians.appearance import TV_WEIGHT, sync_grid_gradients_

    try:
        model, cameras = _model(), stress_cameras()
        grids = model.bil_grids.grids
        loss = (_render(model, cameras, 1, image=1) - target_image(1)).abs().mean()
        (loss + TV_WEIGHT * total_variation_loss(grids)).backward()
        want = grids.grad.clone()
        grids.grad = None
        loss = (_render(model, cameras, 1, image=1) - target_image(1)).abs().mean()
        loss.backward()
        sync_grid_gradients_(model, Comm.single(), [1])
        torch.testing.assert_close(grids.grad, want, rtol=1e-12, atol=1e-15)
        assert (want.flatten(1).abs().amax(dim=1) > 0).all(), "the TV term reaches every image's grid"
    finally:
        torch.set_default_dtype(torch.float32)


def _eval(model, cameras, index: int):
    model.eval()
    with torch.no_grad():
        return model.get_outputs(cameras[index : index + 1])["rgb"]


def test_eval_appearance_none_mean_and_a_picked_image():
    from landmark_plugin.edits import Appearance, LayoutEdits, apply_edits

    try:
        model, cameras = _model(), stress_cameras()
        with torch.no_grad():
            trained_1, trained_4, raw = (_render(model, cameras, 2, image) for image in (1, 4, None))
        assert torch.equal(_eval(model, cameras, 2), raw), "eval_appearance none: the scene's own colours"
        apply_edits(model, LayoutEdits(appearance=Appearance(image=1)))
        torch.testing.assert_close(_eval(model, cameras, 2), trained_1, rtol=0, atol=1e-12)
        apply_edits(model, LayoutEdits(appearance=Appearance(image=1, to_image=4, t=1.0)))
        torch.testing.assert_close(_eval(model, cameras, 2), trained_4, rtol=0, atol=1e-12)
        apply_edits(model, LayoutEdits())
        model.config.eval_appearance = "mean"
        mean = _eval(model, cameras, 2)
        assert (mean - raw).abs().max() > 1e-3 and (mean - trained_1).abs().max() > 1e-3
    finally:
        torch.set_default_dtype(torch.float32)


def test_an_appearance_edit_needs_per_image_appearance():
    from landmark_plugin.edits import Appearance, EditsError, LayoutEdits, apply_edits

    try:
        torch.set_default_dtype(torch.float64)
        model = stress_model(1)
        with pytest.raises(EditsError, match="use-bilateral-grid"):
            apply_edits(model, LayoutEdits(appearance=Appearance(image=0)), source="my-edits.json")
        grid_model = _model()
        with pytest.raises(EditsError, match="appearance.image 6 does not exist"):
            apply_edits(grid_model, LayoutEdits(appearance=Appearance(image=6)))
    finally:
        torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------- several ranks


def _worker(comm, kind: str = "bilateral"):
    from landmark_plugin.core.schedule import Parts
    from landmark_plugin.distributed.collectives import all_reduce_grads_
    from landmark_plugin.gaussians.appearance import sync_grid_gradients_
    from landmark_plugin.gaussians.frame import RetinaFrame
    from landmark_plugin.gaussians.rows import owner_ranks, shard_

    model, cameras = _model(kind), stress_cameras()
    parts = Parts.of(2, comm.world_size)
    ids = torch.nonzero(owner_ranks(model, parts) == comm.rank).flatten()
    shard_(comm, model, parts)
    frame = RetinaFrame(comm, model, no_termination())
    model.frame = frame
    optimizers = make_optimizers(model)
    if kind == "gaussian":
        optimizers["appearance_features"] = torch.optim.Adam([model.gauss_params["appearance_features"]], lr=2e-3, eps=1e-15)
    shared = _appearance_params(model)
    grid_optimizer = torch.optim.Adam(shared, lr=2e-3, eps=1e-15)
    records = []
    for step in range(STEPS):
        model.step = step
        batch = [(step * BATCH + k) % CAMERAS for k in range(BATCH)]
        batch_cameras = cameras[torch.tensor(batch)]
        batch_cameras.metadata = {"cam_idx": torch.tensor(batch)[:, None]}
        size, visible, owners = frame.plan_batch(batch_cameras, BATCH, max_load=16)
        assert size == BATCH
        losses, _, outputs = frame.batch_loss(batch_cameras, visible, owners, lambda b: {"image": target_image(batch[b])})
        assert ("tv_loss" in losses) == (kind == "bilateral"), "one-cell affine grids have no TV loss"
        sum(losses.values()).backward()
        # what the pipeline's sync_gradients_ does for the grids, or the replicated MLP and embeddings
        if kind == "gaussian":
            all_reduce_grads_(comm, shared)
        else:
            sync_grid_gradients_(model, comm, batch)
        record = {"loss": float(losses["main_loss"]), "tv": float(losses.get("tv_loss", 0.0)),
                  "images": {batch[b]: o["rgb"].detach() for b, o in outputs.items()}}
        if step == 0:
            record["grads"] = {n: p.grad.detach().clone() for n, p in model.gauss_params.items()}
            record["grid_grad"] = torch.cat([p.grad.detach().flatten() for p in shared])
        records.append(record)
        step_optimizers(model, optimizers)
        grid_optimizer.step()
        grid_optimizer.zero_grad()
    params = {n: p.detach().clone() for n, p in model.gauss_params.items()}
    return {"ids": ids, "records": records, "params": params, "grids": torch.cat([p.detach().flatten() for p in shared])}


@functools.lru_cache(maxsize=None)
def _one_process(tmp_dir, kind: str):
    return run_ranks(_worker, 1, tmp_dir / f"appearance-1-{kind}", args=(kind,), timeout_s=120, **FAST_START)[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bilateral", "affine", "gaussian"])
def test_appearance_on_two_ranks_equals_one_process(tmp_path, kind):
    results = run_ranks(_worker, 2, tmp_path / "appearance-2", args=(kind,), timeout_s=180, **FAST_START)
    one = _one_process(tmp_path.parent, kind)
    ids = torch.cat([r["ids"] for r in results])
    diffs = {}
    for step, ref in enumerate(one["records"]):
        diffs[f"step {step} loss"] = max(abs(r["records"][step]["loss"] - ref["loss"]) for r in results)
        diffs[f"step {step} tv"] = abs(results[0]["records"][step]["tv"] - ref["tv"])
        assert results[1]["records"][step]["tv"] == results[0]["records"][step]["tv"], "every rank logs the same TV"
        images = {i: im for r in results for i, im in r["records"][step]["images"].items()}
        assert sorted(images) == sorted(ref["images"])
        for i, image in images.items():
            diffs[f"step {step} camera {i}"] = float((image - ref["images"][i]).abs().max())
    for r in results:
        diffs[f"rank grid grad {len(diffs)}"] = float((r["records"][0]["grid_grad"] - one["records"][0]["grid_grad"]).abs().max())
        diffs[f"rank grids {len(diffs)}"] = float((r["grids"] - one["grids"]).abs().max())
    for name, ref in one["params"].items():
        grads = torch.cat([r["records"][0]["grads"][name] for r in results])
        diffs[f"grad {name}"] = float((grads - one["records"][0]["grads"][name][ids]).abs().max())
        diffs[f"final {name}"] = float((torch.cat([r["params"][name] for r in results]) - ref[ids]).abs().max())
    assert one["records"][0]["grid_grad"].abs().max() > 0
    off = {k: v for k, v in diffs.items() if not v <= ATOL}
    assert not off, "\n".join(f"{k}: {v:.3g}" for k, v in diffs.items())


def test_colour_corrected_metrics_measure_held_out_views_of_unknown_appearance():
    """The protocol for captures whose appearance varies (README): held-out views have no grid,
    so ``color_corrected_metrics`` also reports PSNR after fitting the render's colours to the
    ground truth (splatfacto's cc_psnr); an exposure / white-balance change costs it nothing."""
    try:
        model, cameras = _model(), stress_cameras()
        model.config.color_corrected_metrics = True
        out = {"rgb": _eval(model, cameras, 2), "background": torch.ones(3, dtype=torch.float64)}
        gt = (out["rgb"] * torch.tensor([0.8, 0.7, 0.9], dtype=torch.float64) + 0.05).clamp(0, 1)
        metrics, _ = model.get_image_metrics_and_images(out, {"image": gt})
        assert metrics["cc_psnr"] > metrics["psnr"] + 10.0, metrics
    finally:
        torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------- per-Gaussian appearance


@pytest.mark.parametrize("degree", [None, 0, 1, 3])
def test_recolor_sh_is_a_gain_and_offset_of_the_colour_in_every_direction(degree):
    from landmark_plugin.core.sh import num_sh_bases, recolor_sh, sh_to_color

    g = torch.Generator().manual_seed(0)
    n = 50
    k = 1 if degree is None else num_sh_bases(3)
    sh = torch.randn(n, k, 3, generator=g, dtype=torch.float64)
    gain = torch.rand(n, 3, generator=g, dtype=torch.float64) + 0.5
    offset = 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    dirs = torch.randn(n, 3, generator=g, dtype=torch.float64)
    recolored = recolor_sh(sh, gain, offset, plain=degree is None)
    if degree is None:
        before, after = sh[:, 0], recolored[:, 0]
    else:  # gsplat's colour before its clamp: SH value + 0.5
        before = sh_to_color(sh, dirs, degree) + 0.5
        after = sh_to_color(recolored, dirs, degree) + 0.5
    torch.testing.assert_close(after, gain * before + offset, rtol=0, atol=1e-12)


def test_per_gaussian_appearance_renders_each_image_in_its_own_light():
    try:
        model, cameras = _model("gaussian"), stress_cameras()
        module = model.gaussian_appearance
        own = _render(model, cameras, 1, image=1)
        other = _render(model, cameras, 1, image=4)
        assert (own - other).abs().max() > 1e-2, "images' embeddings give different renders"
        own.sum().backward()
        touched = module.embeddings.grad.abs().amax(dim=1) > 0
        assert touched.tolist() == [i == 1 for i in range(module.embeddings.shape[0])], "only image 1's embedding moves"
        assert model.gauss_params["appearance_features"].grad.abs().max() > 0
        assert module.mlp[0].weight.grad.abs().max() > 0
        with torch.no_grad():
            raw = _render(model, cameras, 1)  # no image: the Gaussians' own colours
            model.gauss_params["appearance_features"].zero_()
            module.mlp[-1].weight.zero_()
            module.mlp[-1].bias.zero_()
            identity = _render(model, cameras, 1, image=1)  # a zero last layer: gain 1, offset 0
        torch.testing.assert_close(identity, raw, rtol=0, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_held_out_embedding_fitted_on_the_left_half_predicts_the_right_half():
    """NeRF-W's protocol (``fit_embedding``): an image rendered in training image 3's light is
    matched on its unseen right half by the embedding fitted to its left half, far better than by
    the mean embedding it starts from."""
    from landmark_plugin.gaussians.appearance import fit_embedding

    try:
        model, cameras = _model("gaussian"), stress_cameras()
        with torch.no_grad():
            model.gaussian_appearance.embeddings[3] += 1.5  # a light unlike the mean
            target = _render(model, cameras, 2, image=3).detach()
        model.config.eval_appearance = "mean"
        width = target.shape[1]
        left, right = slice(0, width // 2), slice(width // 2, width)
        mean_error = float((_eval(model, cameras, 2)[:, right] - target[:, right]).abs().mean())
        fitted = fit_embedding(model, cameras[2:3], target, left, steps=100, lr=0.1)
        fit_error = float((_eval(model, cameras, 2)[:, right] - target[:, right]).abs().mean())
        assert mean_error > 0.01 and fit_error < 0.2 * mean_error, (mean_error, fit_error)
        assert all(p.requires_grad for p in model.gauss_params.values()), "the parameters thaw again"
        assert model.training is False and torch.equal(model.eval_appearance_embedding, fitted)
    finally:
        torch.set_default_dtype(torch.float32)


def test_held_out_protocol_renders_in_eval_mode_with_the_fitted_embedding():
    """``held_out_half_psnr`` called on a model left in training mode (as a pipeline leaves it
    after its eval loop) still scores the fitted embedding: a training-mode render would take the
    held-out camera's index for a training image's embedding.  The mode is restored."""
    from landmark_plugin.gaussians.appearance import held_out_half_psnr

    try:
        model, cameras = _model("gaussian"), stress_cameras()
        with torch.no_grad():
            model.gaussian_appearance.embeddings[3] += 1.5
            target = _render(model, cameras, 2, image=3).detach()
        view = cameras[2:3]
        view.metadata = {"cam_idx": 0}  # a held-out image's own index, which names another image's embedding
        model.train()
        in_training = held_out_half_psnr(model, [(view, target)], steps=40)
        assert model.training, "the caller's mode is restored"
        model.eval()
        in_eval = held_out_half_psnr(model, [(view, target)], steps=40)
        assert abs(in_training - in_eval) < 1e-6, (in_training, in_eval)
    finally:
        torch.set_default_dtype(torch.float32)
