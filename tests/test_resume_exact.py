"""Resuming repeats an unbroken run bit for bit on CPU: N steps == k steps + save + resume +
(N - k) steps, in every parameter, buffer and loss, for retina-gs and landmark-grid.

Both processes seed as ns-train does before setting up (--machine.seed); the streams after
setup differ from those at the save, so the checkpoint must restore the random streams, the
camera order and the densification statistics itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _trainers import grid_config, micro_city, model_state, retina_config, setup_trainer  # noqa: F401 (fixture)

N, K = 6, 3
RETINA_N, RETINA_K = 13, 11  # retina-gs refines at step 12 (refine_every 3, after the pause that
# follows the opacity reset at step 0) from statistics gathered on both sides of the save


@pytest.fixture()
def deterministic():
    """The trainer turns deterministic algorithms on (config.deterministic); undo it afterwards."""
    yield
    torch.use_deterministic_algorithms(False)


def unbroken_then_resumed(config, n: int = N, k: int = K, prepare=lambda trainer: None):
    """(losses, state) of an unbroken run and of the run resumed from its step k - 1 checkpoint."""
    trainer = setup_trainer(config)
    prepare(trainer)
    trainer.run_steps(0, k)
    trainer.save_checkpoint(k - 1)
    losses = trainer.run_steps(k, n - k)
    state = full_state(trainer)
    path = trainer.checkpoint_dir / f"step-{k - 1:09d}.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)  # what ns-eval / ns-render do
    assert {"rng", "datamanager", "strategy", "samplers"} <= set(saved["resume"])

    resumed_config = copy.deepcopy(trainer.config)
    resumed_config.load_dir = trainer.checkpoint_dir
    resumed = setup_trainer(resumed_config)
    prepare(resumed)
    assert resumed._start_step == k
    resumed_losses = resumed.run_steps(k, n - k)
    return (losses, state), (resumed_losses, full_state(resumed)), trainer


def full_state(trainer) -> dict:
    """Parameters, buffers, densification statistics and Adam moments (with offload, of every
    Gaussian: the model holds them all again first)."""
    if hasattr(trainer.pipeline.model, "hold_every_row"):
        trainer.pipeline.model.hold_every_row()
    state = model_state(trainer)
    strategy = getattr(trainer.pipeline.model, "strategy_state", {})
    state.update({f"strategy.{k}": v.clone() for k, v in strategy.items() if isinstance(v, torch.Tensor)})
    for name, optimizer in trainer.optimizers.optimizers.items():
        for i, param_state in enumerate(optimizer.state.values()):
            state.update({f"adam.{name}.{i}.{k}": v.clone() for k, v in param_state.items()})
    return state


def densify_readily(trainer) -> None:
    """Grow every Gaussian with any screen gradient, so the refinement depends on the statistics
    (on the torch rasteriser the model would otherwise set its own threshold at the first render)."""
    model = trainer.pipeline.model
    model._backend_checked = True
    model.strategy.absgrad = False
    model.strategy.grow_grad2d = 1e-9


def assert_identical(unbroken, resumed):
    (losses, state), (resumed_losses, resumed_state) = unbroken, resumed
    assert resumed_losses == losses, "losses after the resume differ"
    assert state.keys() == resumed_state.keys()
    differing = [k for k in state if state[k].shape != resumed_state[k].shape or not torch.equal(state[k], resumed_state[k])]
    assert not differing, f"differ after the resume: {differing}"


def test_retina_gs_resume_is_bit_exact(micro_city, tmp_path, deterministic):
    config = retina_config(micro_city, tmp_path / "out", RETINA_N)
    unbroken, resumed, trainer = unbroken_then_resumed(config, RETINA_N, RETINA_K, prepare=densify_readily)
    assert_identical(unbroken, resumed)
    assert trainer.pipeline.model.num_points > 400, "the refinement at step 12 should have grown Gaussians"
    # the camera queue was part of it: 13 steps are one epoch of 8 cameras and 5 of the next
    assert len(trainer.pipeline.resume_state()["queue"]) == 3


def test_retina_gs_offload_stream_resume_is_bit_exact(micro_city, tmp_path, deterministic):
    """With offload stream the checkpoint holds every Gaussian (host memory), and the resumed run
    streams on from it as the unbroken run does."""
    config = retina_config(micro_city, tmp_path / "out", RETINA_N, visible_adam=True, offload="stream", offload_stream_depth=1)
    unbroken, resumed, trainer = unbroken_then_resumed(config, RETINA_N, RETINA_K, prepare=densify_readily)
    assert_identical(unbroken, resumed)
    model = trainer.pipeline.model
    assert model.num_points > 400 and model.offload_store.stream.streamed_batches == RETINA_N


def test_landmark_grid_resume_is_bit_exact(micro_city, tmp_path, deterministic):
    unbroken, resumed, _ = unbroken_then_resumed(grid_config(micro_city, tmp_path / "out", N))
    assert_identical(unbroken, resumed)


def test_resume_without_the_resume_state_is_not_exact(micro_city, tmp_path, deterministic, monkeypatch):
    """The check above has teeth: dropping the resume state changes the continuation."""
    from landmark_plugin import resume

    monkeypatch.setattr(resume, "restore", lambda pipeline, state: False)
    (losses, _), (resumed_losses, _), _ = unbroken_then_resumed(grid_config(micro_city, tmp_path / "out", N))
    assert resumed_losses != losses
