"""A NaN / Inf loss or gradient skips the step (no optimiser step, no densification update)
and is reported; too many in a row stop the run naming the step and the parameter group."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _trainers import grid_config, micro_city, model_state, retina_config, setup_trainer  # noqa: F401 (fixture)
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.utils import writer

from landmark_plugin.step_guard import (
    NonFinite,
    NonFiniteSteps,
    NonFiniteTrainingError,
    SkippedStepCallback,
    find_nonfinite,
)

NAN = float("nan")


@pytest.fixture()
def deterministic():
    yield
    torch.use_deterministic_algorithms(False)


def test_find_nonfinite_names_loss_terms_and_groups():
    good, bad = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    good.grad, bad.grad = torch.zeros(3), torch.tensor([1.0, float("inf")])
    optimizers = {"decoder": torch.optim.Adam([good]), "grids": torch.optim.Adam([bad])}
    found = find_nonfinite({"rgb_loss": torch.tensor(0.5), "tv": torch.tensor(NAN)}, optimizers)
    assert found.loss_terms == ["tv"] and found.param_groups == ["grids"]
    assert not find_nonfinite({"rgb_loss": torch.tensor(0.5)}, {"decoder": optimizers["decoder"]}).any


def test_counter_raises_at_the_limit_and_resets_on_a_good_step():
    steps = NonFiniteSteps(limit=2)
    steps.skipped(5, NonFinite(param_groups=["means"]))
    steps.passed()
    steps.skipped(7, NonFinite(param_groups=["means"]))
    with pytest.raises(NonFiniteTrainingError, match=r"step 8: gradient of parameter group\(s\) 'means'"):
        steps.skipped(8, NonFinite(param_groups=["means"]))
    assert steps.total == 3


def test_skipped_step_callback_only_drops_the_after_step_call():
    calls = []
    callback = TrainingCallback(
        [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION, TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
        lambda step: calls.append(step),
    )
    wrapped = SkippedStepCallback(callback, was_skipped=lambda step: step == 1)
    for step in range(3):
        for location in (TrainingCallbackLocation.BEFORE_TRAIN_ITERATION, TrainingCallbackLocation.AFTER_TRAIN_ITERATION):
            wrapped.run_callback_at_location(step, location)
    assert calls == [0, 0, 1, 2, 2]


def optimizer_state(trainer) -> dict:
    return {
        (name, i, key): value.clone()
        for name, optimizer in trainer.optimizers.optimizers.items()
        for i, state in enumerate(optimizer.state.values())
        for key, value in state.items()
    }


def assert_same(before: dict, after: dict, what: str):
    differing = [k for k in before if not torch.equal(before[k], after[k])]
    assert not differing, f"{what} changed on a skipped step: {differing}"


def test_retina_gs_skips_a_nan_gradient_step_then_stops_on_repeats(micro_city, tmp_path, deterministic):
    config = retina_config(micro_city, tmp_path / "out", 10)
    config.max_consecutive_nonfinite_steps = 3
    trainer = setup_trainer(config)
    model = trainer.pipeline.model
    trainer.run_steps(0, 1)  # (step 0 resets the opacities: a new tensor)
    poison = {"on": False}
    model.gauss_params["opacities"].register_hook(lambda g: torch.full_like(g, NAN) if poison["on"] else g)
    params, adam = model_state(trainer), optimizer_state(trainer)
    stats = {k: v.clone() for k, v in model.strategy_state.items() if isinstance(v, torch.Tensor)}
    events = len(writer.EVENT_STORAGE)
    poison["on"] = True
    trainer.run_steps(1, 1)
    assert_same(params, model_state(trainer), "a parameter")
    assert_same(adam, optimizer_state(trainer), "optimiser state")
    assert_same(stats, {k: model.strategy_state[k] for k in stats}, "densification statistics")
    assert trainer.nonfinite.total == 1
    reported = [e for e in writer.EVENT_STORAGE[events:] if e["name"] == "Skipped steps (non-finite)"]
    assert reported and reported[-1]["step"] == 1

    poison["on"] = False
    trainer.run_steps(2, 1)  # the run goes on
    assert not torch.equal(params["gauss_params.means"], model.means.detach())
    assert trainer.nonfinite.consecutive == 0

    poison["on"] = True
    with pytest.raises(NonFiniteTrainingError) as stopped:
        trainer.run_steps(3, 3)
    message = str(stopped.value)
    assert "step 5" in message and "'opacities'" in message and "3 steps in a row" in message


def test_landmark_grid_skips_a_nan_loss_step(micro_city, tmp_path, deterministic, monkeypatch):
    trainer = setup_trainer(grid_config(micro_city, tmp_path / "out", 4))
    model = trainer.pipeline.model
    trainer.run_steps(0, 1)
    params, adam = model_state(trainer), optimizer_state(trainer)
    real_loss = type(model).get_loss_dict

    def nan_loss(self, outputs, batch, metrics_dict=None):
        losses = real_loss(self, outputs, batch, metrics_dict)
        losses["rgb_loss"] = losses["rgb_loss"] * NAN
        return losses

    monkeypatch.setattr(type(model), "get_loss_dict", nan_loss)
    losses = trainer.run_steps(1, 1)
    assert losses[0] != losses[0]  # the NaN loss is returned (and logged) as it was
    assert_same(params, model_state(trainer), "a parameter")
    assert_same(adam, optimizer_state(trainer), "optimiser state")
    monkeypatch.undo()
    trainer.run_steps(2, 1)
    assert trainer.nonfinite.total == 1 and trainer.nonfinite.consecutive == 0
    assert not all(torch.equal(v, model_state(trainer)[k]) for k, v in params.items())


def _streaming(micro_city, tmp_path):
    """retina-gs streaming its subtrees (``offload stream``), one training step taken."""
    config = retina_config(micro_city, tmp_path / "out", 10, tree_depth=3, visible_adam=True, offload="stream",
                           offload_stream_depth=1)
    trainer = setup_trainer(config)
    trainer.run_steps(0, 1)
    store = trainer.pipeline.model.offload_store
    assert store.stream is not None and store.stream.streamed_batches == 1
    return trainer, store


def _host_rows(store) -> torch.Tensor:
    """Every row (parameters, moments, statistics) in the store's order; the model holds them
    all again (the next batch streams from there)."""
    from landmark_plugin.gaussians.rows import gaussian_rows

    model = store.model
    model.hold_every_row()
    return gaussian_rows(model, model.optimizers, model.strategy_state)[0].clone()


def test_streamed_retina_gs_skips_a_step_whose_image_gradient_is_nan(micro_city, tmp_path, deterministic, monkeypatch):
    """With offload stream the Gaussians' gradients are made after the trainer's check, from
    the subtree crops' image gradients: a NaN there (the loss finite) skips the whole step."""
    from landmark_plugin.gaussians.stream import LeafStream

    trainer, store = _streaming(micro_city, tmp_path)
    before = _host_rows(store)
    real = LeafStream.render_parts

    def nan_image_gradient(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.pending is not None:
            for crop in self.pending.crops.values():
                crop.color.register_hook(lambda grad: grad * NAN)
        return out

    monkeypatch.setattr(LeafStream, "render_parts", nan_image_gradient)
    losses = trainer.run_steps(1, 1)
    assert losses[0] == losses[0], "the loss itself is finite"
    assert trainer.nonfinite.total == 1 and store.stream.pending is None
    assert store.stream.streamed_batches == 1, "the skipped batch was not stepped"
    after = _host_rows(store)
    assert torch.equal(before, after), "a Gaussian changed on a skipped step"
    monkeypatch.undo()
    trainer.run_steps(2, 1)
    assert trainer.nonfinite.consecutive == 0 and store.stream.streamed_batches == 2
    assert torch.isfinite(_host_rows(store)).all() and not torch.equal(after, _host_rows(store))


def test_streamed_retina_gs_does_not_step_a_subtree_whose_own_gradient_is_nan(micro_city, tmp_path, deterministic,
                                                                              monkeypatch):
    """A NaN born inside one subtree's backward re-render (after the trainer's check) leaves
    that subtree's rows untouched; the others take their step."""
    from landmark_plugin.gaussians.stream import LeafStream

    trainer, store = _streaming(micro_city, tmp_path)
    stream = store.stream
    before = _host_rows(store)
    real, poisoned = LeafStream._render, []

    def nan_in_one_group(self, v, with_depth, group):
        p = real(self, v, with_depth, group)
        if torch.is_grad_enabled() and (not poisoned or poisoned[0] == group):
            poisoned[:] = [group, self.store.index.clone()]  # plain mode: the held rows are the group's
            p = dataclasses.replace(p, color=p.color * NAN)
        return p

    monkeypatch.setattr(LeafStream, "_render", nan_in_one_group)
    trainer.run_steps(1, 1)
    assert poisoned and stream.nonfinite_groups == 1 and stream.streamed_batches == 2
    after = _host_rows(store)
    assert torch.isfinite(after).all(), "no NaN reached a parameter, moment or statistic"
    rows = poisoned[1]
    others = torch.ones(after.shape[0], dtype=torch.bool)
    others[rows] = False
    assert rows.numel() > 0 and torch.equal(before[rows], after[rows]), "the NaN subtree was stepped"
    assert not torch.equal(before[others], after[others]), "the other subtrees were not stepped"
