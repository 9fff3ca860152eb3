"""Resuming repeats an unbroken run bit for bit on CPU: N steps == k steps + save + resume +
(N - k) steps, in every parameter, buffer and loss, for retina-gs and landmark-grid.

The resumed process starts from other random states on purpose: the checkpoint must restore
the random streams, the camera order and the densification statistics itself.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from _trainers import grid_config, model_state, retina_config, setup_trainer

N, K = 6, 3  # retina-gs refines at step 3 from statistics gathered on both sides of the save


@pytest.fixture()
def deterministic():
    """The trainer turns deterministic algorithms on (config.deterministic); undo it afterwards."""
    yield
    torch.use_deterministic_algorithms(False)


def unbroken_then_resumed(config):
    """(losses, state) of an unbroken run and of the run resumed from its step K - 1 checkpoint."""
    trainer = setup_trainer(config)
    trainer.run_steps(0, K)
    trainer.save_checkpoint(K - 1)
    losses = trainer.run_steps(K, N - K)
    state = model_state(trainer)
    path = trainer.checkpoint_dir / f"step-{K - 1:09d}.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=True)  # what ns-eval / ns-render do
    assert {"rng", "datamanager", "strategy", "samplers"} <= set(saved["resume"])

    resumed_config = copy.deepcopy(trainer.config)
    resumed_config.load_dir = trainer.checkpoint_dir
    torch.manual_seed(1234)  # anything but the state at the save
    random.seed(1234)
    np.random.seed(1234)
    resumed = setup_trainer(resumed_config, seed=4321)
    assert resumed._start_step == K
    resumed_losses = resumed.run_steps(K, N - K)
    return (losses, state), (resumed_losses, model_state(resumed)), trainer


def assert_identical(unbroken, resumed):
    (losses, state), (resumed_losses, resumed_state) = unbroken, resumed
    assert resumed_losses == losses, "losses after the resume differ"
    assert state.keys() == resumed_state.keys()
    differing = [k for k in state if state[k].shape != resumed_state[k].shape or not torch.equal(state[k], resumed_state[k])]
    assert not differing, f"differ after the resume: {differing}"


def test_retina_gs_resume_is_bit_exact(tiny_city, tmp_path, deterministic):
    unbroken, resumed, trainer = unbroken_then_resumed(retina_config(tiny_city, tmp_path / "out", N))
    assert_identical(unbroken, resumed)
    # the camera queue was part of it: the unbroken run drew N of the 8 training cameras
    assert len(trainer.pipeline.datamanager.train_unseen_cameras) == 8 - N


def test_landmark_grid_resume_is_bit_exact(tiny_city, tmp_path, deterministic):
    unbroken, resumed, _ = unbroken_then_resumed(grid_config(tiny_city, tmp_path / "out", N))
    assert_identical(unbroken, resumed)


def test_resume_without_the_resume_state_is_not_exact(tiny_city, tmp_path, deterministic, monkeypatch):
    """The check above has teeth: dropping the resume state changes the continuation."""
    from landmark_plugin import resume

    monkeypatch.setattr(resume, "restore", lambda pipeline, state: False)
    (losses, _), (resumed_losses, _), _ = unbroken_then_resumed(grid_config(tiny_city, tmp_path / "out", N))
    assert resumed_losses != losses
