"""retina-gs with ``mode="clip"``: the model's render equals the unpartitioned render of its
Gaussians (CPU, torch twin), and training steps run through the clipped render."""

from __future__ import annotations

import torch

from test_retina_gs import make_trainer


def test_clip_mode_renders_like_unpartitioned_and_trains(tiny_city, tmp_path):
    trainer = make_trainer(tiny_city, tmp_path / "outputs", 3, tree_depth=3, mode="clip")
    model = trainer.pipeline.model
    camera = trainer.pipeline.datamanager.train_dataset.cameras[0:1].to(model.device)
    model.eval()
    with torch.no_grad():
        clipped = model.get_outputs(camera)
        model.config.mode = "plain"
        model.leaf_ids = torch.zeros_like(model.leaf_ids)  # one group: the ordinary render
        reference = model.get_outputs(camera)
        model.config.mode = "clip"
        model.refresh_ownership()
    for key in ("rgb", "accumulation", "depth"):
        err = float((clipped[key] - reference[key]).abs().max())
        scale = 1.0 if key != "depth" else float(reference[key].abs().max())
        assert err <= 1e-5 * scale, f"{key} differs by {err:.2e}"
    model.train()
    losses = trainer.run_steps(0, 3)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_auto_mode_is_clip_only_where_exact_and_fast(monkeypatch):
    """``mode auto`` renders clip on one process (one part: the ordinary render, any backend) and
    with the csrc/ kernel on any number of ranks (the frame shares Gaussians across ranks), plain
    on several ranks with the torch backend or without the kernels; explicit modes are kept."""
    from types import SimpleNamespace

    from landmark_plugin import cuda
    from landmark_plugin.core.schedule import Parts
    from landmark_plugin.gaussians.model import RetinaGSModel, RetinaGSModelConfig

    assert RetinaGSModelConfig().mode == "plain"

    def resolved(mode, backend, ranks, kernels):
        monkeypatch.setattr(cuda, "require", lambda allow_fallback: object() if kernels else None)
        parts = Parts.of(2, ranks)
        model = SimpleNamespace(config=SimpleNamespace(mode=mode), _auto_mode=None, frame=SimpleNamespace(one_part=len(parts) == 1))
        return RetinaGSModel.render_mode(model, backend)

    assert resolved("auto", "gsplat", 1, kernels=True) == "clip"
    assert resolved("auto", "gsplat", 1, kernels=False) == "clip"
    assert resolved("auto", "torch", 1, kernels=False) == "clip"
    assert resolved("auto", "gsplat", 2, kernels=True) == "clip"
    assert resolved("auto", "gsplat", 2, kernels=False) == "plain"
    assert resolved("auto", "torch", 3, kernels=True) == "plain"
    assert resolved("clip", "torch", 2, kernels=False) == "clip"
    assert resolved("plain", "gsplat", 1, kernels=True) == "plain"


def test_one_part_is_drawn_as_the_ordinary_render(tiny_city, tmp_path, monkeypatch):
    """One process holds one part, whose region is all of space: the frame draws it with the
    ordinary render (no sharing copies, no box-clipped pass), and that equals the clipped render of
    the same Gaussians over the tree's 8 leaves with their copies (float64, torch twin), the
    image and every parameter's gradient."""
    import landmark_plugin.gaussians.frame as frame_module
    from landmark_plugin.core.render_clip import ClipLeaves, reached_leaves, render_partial_clipped

    trainer = make_trainer(tiny_city, tmp_path / "outputs", 1, tree_depth=3, mode="clip")
    model = trainer.pipeline.model.to(torch.float64)
    model.eval()
    frame = model.frame
    assert frame.clip and not frame.clips
    camera = trainer.pipeline.datamanager.train_dataset.cameras[2:3]

    def no_clipped_pass(*args, **kwargs):
        raise AssertionError("one part was drawn with the box-clipped render")

    monkeypatch.setattr(frame_module, "render_partial_clipped", no_clipped_pass)
    ours = model.get_outputs(camera)["rgb"]
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), [model.means])

    g, view = model.activated_gaussians(), frame.view(camera)
    clipped = render_partial_clipped(g, ClipLeaves(model.clip_boxes, view.positions), view.viewmat, view.K, view.width,
                                     view.height, frame.sh_degree(), frame.settings, backend="torch")
    background = model._get_background_color().to(torch.float64)
    want = torch.clamp(clipped.color + clipped.transmittance * background, 0.0, 1.0)
    (grad_want,) = torch.autograd.grad(want.square().sum(), [model.means])
    assert float((ours - want).abs().max()) <= 1e-10
    assert float((grad_ours - grad_want).abs().max()) <= 1e-10 * max(1.0, float(grad_want.abs().max()))
    assert float(grad_want.abs().max()) > 0 and float((1.0 - clipped.transmittance).max()) > 0.5
    with torch.no_grad():  # the clipped render really had boundaries to handle: shared, clipped copies
        copies, _ = reached_leaves(g, model.clip_boxes, view.viewmat, view.K, view.width, view.height, frame.settings,
                                   backend="torch")
    assert int((copies.box >= 0).sum()) > 100, "no Gaussian straddles a leaf boundary in this view"
