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
    """``mode auto`` renders clip with the csrc/ kernel on any number of ranks (the frame shares
    Gaussians across ranks), plain on the torch backend and without the kernels; explicit modes
    are kept."""
    from types import SimpleNamespace

    from landmark_plugin import cuda
    from landmark_plugin.gaussians.model import RetinaGSModel, RetinaGSModelConfig

    assert RetinaGSModelConfig().mode == "plain"

    def resolved(mode, backend, ranks, kernels):
        monkeypatch.setattr(cuda, "require", lambda allow_fallback: object() if kernels else None)
        model = SimpleNamespace(config=SimpleNamespace(mode=mode), _auto_mode=None, ranks=ranks)
        return RetinaGSModel.render_mode(model, backend)

    assert resolved("auto", "gsplat", 1, kernels=True) == "clip"
    assert resolved("auto", "gsplat", 1, kernels=False) == "plain"
    assert resolved("auto", "gsplat", 2, kernels=True) == "clip"
    assert resolved("auto", "torch", 1, kernels=True) == "plain"
    assert resolved("clip", "torch", 2, kernels=False) == "clip"
    assert resolved("plain", "gsplat", 1, kernels=True) == "plain"
