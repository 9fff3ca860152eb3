"""retina-gs out of core (``--pipeline.model.offload host``): the leaf cull is conservative, and a
streamed run equals the in-memory run (visible Adam, densification on) in every parameter and
moment; a leaf no camera of a step can draw is untouched by that step."""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import pytest
import torch

from _retina_dist_helpers import stress_cameras, stress_model
from _trainers import MICRO_CITY, retina_config, setup_trainer

from landmark_plugin.core.frustum import LeafBounds, leaves_in_view
from landmark_plugin.core.projection import RasterSettings, project_gaussians

STEPS = 20
DEPTH = 4


def _look(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """World-to-camera [4, 4] in the OpenCV convention (x right, y down, z forward)."""
    forward = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])
    view = torch.eye(4, dtype=torch.float64)
    view[:3, :3], view[:3, 3] = rot, -rot @ eye
    return view


def _scene(kind: str, g: torch.Generator):
    """(means, quats, scales) of a 20-unit block: small Gaussians, or a third of them long and
    large (straddling leaves)."""
    n = 3000
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([20.0, 20.0, 4.0], dtype=torch.float64)
    scales = torch.exp(torch.empty(n, 3, dtype=torch.float64).uniform_(math.log(0.01), math.log(0.2), generator=g))
    if kind == "stress":
        scales[::3, 0] = 3.0
        scales[::7] = 1.5
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return means, quats / quats.norm(dim=-1, keepdim=True), scales


@pytest.mark.parametrize("scene,rasterize_mode", [("small", "classic"), ("stress", "classic"), ("stress", "antialiased")])
def test_every_leaf_with_a_kept_gaussian_is_in_view(scene, rasterize_mode):
    """No leaf holding a Gaussian the projection keeps is let go, for cameras inside and above a
    block of Gaussians (street level and aerial, some close to large ones); and leaves are let go."""
    from landmark_plugin.core.partition import assign_leaves, build_kdtree

    g = torch.Generator().manual_seed(3)
    means, quats, scales = _scene(scene, g)
    leaf_ids = assign_leaves(build_kdtree(means, 4), means)
    bounds = LeafBounds.of(means, scales, leaf_ids, 16)
    settings = RasterSettings(rasterize_mode=rasterize_mode)
    K = torch.tensor([[40.0, 0, 32], [0, 40.0, 24], [0, 0, 1]], dtype=torch.float64)
    culled = checked = 0
    for i in range(24):
        eye = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([20.0, 20.0, 4.0], dtype=torch.float64)
        if i % 4 == 0:
            eye[2] = 15.0  # aerial
        target = eye + torch.randn(3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.3], dtype=torch.float64)
        if i % 4 == 0:
            target = eye - torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
        view = _look(eye, target)
        radii = project_gaussians(means, quats, scales, view, K, 64, 48, settings).radii
        needed = torch.zeros(16, dtype=torch.bool)
        needed[leaf_ids[radii > 0]] = True
        kept = leaves_in_view(bounds, view, K, 64, 48, settings)
        assert not (needed & ~kept).any(), f"camera {i}: leaves {torch.nonzero(needed & ~kept).flatten().tolist()} let go"
        culled += int((~kept).sum())
        checked += 16
    assert 0 < culled < checked, f"{culled} of {checked} leaves let go"


def test_footprint_bound_holds_for_a_huge_gaussian_off_screen():
    """A Gaussian far outside the view whose projected footprint still reaches into it."""
    model = stress_model(2)
    view = model.frame.view(stress_cameras()[0:1])
    centre = torch.linalg.inv(view.viewmat)[:3, 3]
    forward = torch.linalg.inv(view.viewmat)[:3, 2]
    right = torch.linalg.inv(view.viewmat)[:3, 0]
    means = (centre + 0.5 * forward + 0.9 * right)[None]  # beside the image, close to the camera
    scales = torch.full((1, 3), 0.3, dtype=torch.float64)
    quats = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
    radii = project_gaussians(means, quats, scales, view.viewmat, view.K, view.width, view.height).radii
    assert int(radii[0]) > 0, "the construction must give a kept Gaussian"
    bounds = LeafBounds.of(means, scales, torch.zeros(1, dtype=torch.int64), 1)
    assert bool(leaves_in_view(bounds, view.viewmat, view.K, view.width, view.height)[0])
    far = LeafBounds.of(centre[None] - 5 * forward, torch.full((1, 3), 1e-3, dtype=torch.float64), torch.zeros(1, dtype=torch.int64), 1)
    assert not bool(leaves_in_view(far, view.viewmat, view.K, view.width, view.height)[0]), "behind the camera"


@pytest.fixture(scope="module")
def street_city(tmp_path_factory):
    """The micro city seen from its streets only (each view sees a part of it)."""
    from landmark_plugin.data.city import CityConfig, write_city

    return write_city(tmp_path_factory.mktemp("street-city") / "city", CityConfig(**{**MICRO_CITY, "street_fraction": 1.0}))


def _rows(model):
    """Every Gaussian's parameters, moments and statistics as one row, in the model's order (a
    streamed run that holds every row again has them in the in-memory run's order)."""
    from landmark_plugin.gaussians.rows import gaussian_rows

    return gaussian_rows(model, model.optimizers, model.strategy_state)[0]


def _compare(memory, streamed, device: str, cpu_tol: float = 1e-6) -> Tuple[bool, str]:
    """Whether every row of the two runs agrees, and a report of the worst column group.

    float64 on the CPU: ``cpu_tol`` absolute.  float32 on CUDA (gsplat's backward sums with atomics, in
    another order for another grouping of the same Gaussians): 1e-4 of each column group's own
    scale, as moments and densification statistics are not of the parameters' magnitude."""
    from landmark_plugin.gaussians.rows import gaussian_rows, layout_columns

    (a, layout), (b, _) = (gaussian_rows(m, m.optimizers, m.strategy_state) for m in (memory, streamed))
    assert a.shape == b.shape
    worst, report, ok = -1.0, "", True
    for (name, kind), cols in layout_columns(layout).items():
        diff, scale = float((a[:, cols] - b[:, cols]).abs().max()), float(a[:, cols].abs().max())
        tol = cpu_tol if device == "cpu" else 1e-4 * max(1.0, scale)
        ok = ok and diff <= tol
        if diff / tol > worst:
            worst, report = diff / tol, f"{name}/{kind}: {diff:.3g} apart, scale {scale:.3g}, bound {tol:.3g}"
    return ok, report


def _train(data, out, offload: str, device: str = "cpu", budget_gb: float = 0.0, order: str = "random", stream_depth: int = 3,
           no_termination: bool = False, mode: str = "auto"):
    steps = STEPS if device == "cpu" else 8
    config = retina_config(data, out, steps, tree_depth=DEPTH, visible_adam=True, offload=offload, offload_budget_gb=budget_gb,
                           offload_stream_depth=stream_depth, mode=mode)
    config.pipeline.camera_order = order
    config.machine.device_type = device
    if device == "cuda":
        # float32 on the GPU: Adam's update is lr * g / |g| once |g| >> eps, so a gradient that
        # is 0 up to rounding moves a parameter by a whole learning rate one way or the other.
        # The same comparison in float32 on the CPU: 5e-3 apart after 8 steps with eps 1e-15,
        # 3e-6 with 1e-5 (as tests/test_shared_gpu_ranks.py); an H200 run gave 2e-2 at 1e-15.
        for name in ("means", "scales", "quats", "features_dc", "features_rest", "opacities"):
            config.optimizers[name]["optimizer"].eps = 1e-5
    trainer = setup_trainer(config)
    model = trainer.pipeline.model
    if no_termination:  # a streamed pixel's later subtrees do not see the earlier ones' transmittance
        model.frame.settings = dataclasses.replace(model.frame.settings, min_transmittance=0.0)
    # float64 on the CPU: the streamed batches render subsets, whose float32 rounding differs in
    # the last bits, and Adam turns such noise into whole steps over 20 steps; in float64 the
    # comparison measures the streaming.  (The dataparser and images stay float32; the targets
    # are cast.)  gsplat has no float64: CUDA compares fewer steps in float32.
    dtype = torch.float64 if device == "cpu" else torch.float32
    model.to(dtype)
    gt_image = model.get_gt_img
    model.get_gt_img = lambda image: gt_image(image).to(dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # what gsplat's densification ops allocate
    try:
        trainer.run_steps(0, steps)
    finally:
        torch.set_default_dtype(previous)
    model.hold_every_row()
    store = model.offload_store
    trainer.uploaded = store.uploaded_rows if store is not None else []
    trainer.prefetched = store.prefetched_rows if store is not None else []
    trainer.written_back = store.written_back_rows if store is not None else []
    trainer.held_back = store.held_back_rows if store is not None else []
    return model, store.staged_rows if store is not None else [], trainer


@pytest.mark.parametrize("device,budget_gb,order", [
    ("cpu", 0.0, "random"), ("cpu", 1.0, "locality"), pytest.param("cuda", 1.0, "locality", marks=pytest.mark.gpu),
])
def test_offload_equals_in_memory_with_densification(street_city, tmp_path, device, budget_gb, order):
    """On the CPU the host and device sides are both host memory, but the same staging runs; on
    CUDA (gsplat) the pinned copies and uploads too, within float32 atomics' reordering.  With a
    budget, leaves stay held between batches (in another row order) and fewer rows travel."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU case runs the same staging code)")
    memory, _, _ = _train(street_city, tmp_path / "memory", "none", device, order=order)
    streamed, staged, trainer = _train(street_city, tmp_path / "host", "host", device, budget_gb, order)
    assert memory.num_points == streamed.num_points
    assert device == "cuda" or memory.num_points != MICRO_CITY["num_points"], "20 steps densify"
    total = streamed.num_points
    # 20 CPU steps from a random order; 8 CUDA steps in locality order under a budget that keeps
    # leaves held, so there a single partial batch shows that leaves were let go
    partial = sum(n < of for n, of in staged)
    assert partial >= (3 if device == "cpu" else 1), f"batches held almost every Gaussian ({staged}): nothing streamed"
    ok, report = _compare(memory, streamed, device)
    assert ok, f"offload vs in memory, worst {report}"
    tol = 1e-6 if device == "cpu" else 1e-4
    if budget_gb > 0:
        assert sum(trainer.uploaded) < sum(n for n, _ in staged), "held leaves were uploaded again"
    assert sum(trainer.prefetched) > 0, "the next batch's leaves were sent ahead (during the previous batch)"
    if budget_gb == 0:
        # rows let go went back to the store after the batch that let them go (queued, landed at
        # the next stage); a prefetch leaves such rows to that stage, which lands them first
        assert sum(trainer.written_back) > 0, "no batch let a leaf go"
        assert sum(trainer.held_back) > 0, "no prefetch met a write-back on its way"
    # renders outside training stage each camera's leaves too, and equal the in-memory model's
    memory.eval(), streamed.eval()
    cameras, held = trainer.pipeline.datamanager.train_dataset.cameras, []
    with torch.no_grad():
        for i in range(len(cameras)):
            want, got = memory.get_outputs(cameras[i : i + 1])["rgb"], streamed.get_outputs(cameras[i : i + 1])["rgb"]
            assert float((want - got).abs().max()) <= tol, f"eval render of camera {i}"
            held.append(streamed.num_points)
    assert min(held) < total, f"every eval render held every Gaussian ({held} of {total})"
    # the checkpoint holds every Gaussian, not the last batch's
    state = trainer.checkpoint_state(STEPS)
    assert state["pipeline"]["_model.gauss_params.means"].shape[0] == total


def test_offload_needs_visible_adam_and_the_default_strategy(street_city, tmp_path):
    """Refused before any data is read, with the option to change named."""
    from landmark_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="visible-adam"):
        setup_trainer(retina_config(street_city, tmp_path / "x", 2, offload="host"))
    config = retina_config(street_city, tmp_path / "y", 2, offload="host", visible_adam=True)
    config.pipeline.model.strategy.kind = "mcmc"
    with pytest.raises(ConfigError, match="default strategy"):
        setup_trainer(config)


def test_a_leaf_no_camera_can_draw_keeps_every_byte(street_city, tmp_path):
    """In memory with visible Adam: the rows of the leaves the cull lets go for a step's camera
    (parameters and moments) are bit for bit what they were before the step."""
    config = retina_config(street_city, tmp_path / "leaf", STEPS, tree_depth=3, visible_adam=True)
    trainer = setup_trainer(config)
    model, pipeline = trainer.pipeline.model, trainer.pipeline
    from landmark_plugin.gaussians.rows import gaussian_rows

    checked = 0
    for step in range(STEPS):
        before, _ = gaussian_rows(model, getattr(model, "optimizers", None), model.strategy_state)
        g = model.activated_gaussians()
        bounds = LeafBounds.of(g.means, g.scales, model.leaf_ids, 8)
        index = pipeline._next_pool(1)[0]  # the camera of the coming step
        camera = pipeline.datamanager.train_dataset.cameras[index : index + 1]
        view = model.frame.view(camera)
        gone = ~leaves_in_view(bounds, view.viewmat, view.K, view.width, view.height, model.frame.settings)
        trainer.run_steps(step, 1)
        after, _ = gaussian_rows(model, model.optimizers, model.strategy_state)
        if step % model.config.refine_every == 0:
            continue  # refinement re-orders and adds rows; its densification is per Gaussian
        rows = gone[model.leaf_ids]
        assert torch.equal(after[rows], before[rows]), f"step {step}: a leaf no camera could draw changed"
        checked += int(rows.sum())
    assert checked > 0 and math.isfinite(float(after.sum()))


@pytest.mark.parametrize("device,stream_depth", [("cpu", 4), ("cpu", 2), pytest.param("cuda", 2, marks=pytest.mark.gpu)])
def test_stream_equals_in_memory_with_densification(street_city, tmp_path, device, stream_depth):
    """``offload stream``: the GPU side holds one subtree at a time, each frame composites the
    subtrees' partials and backward re-renders each subtree; the run equals the in-memory run
    (visible Adam, densification on; mode auto -> clip: in memory the ordinary render of one
    part, streamed each subtree clipped, with the csrc/ kernel on CUDA) in every parameter,
    moment and statistic, and so do eval renders and the checkpoint.  gsplat's early
    termination (a pixel ends once its transmittance falls below 1e-4) acts per subtree, as it
    acts per part on several ranks in plain mode: the comparison turns it off, so that it
    measures the streaming.  On CUDA: float32, 8 steps, pinned copies
    on the copy stream, Adam's eps above float32 noise (``_train``)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU cases run the same streaming code)")
    memory, _, _ = _train(street_city, tmp_path / "memory", "none", device, no_termination=True)
    streamed, _, trainer = _train(street_city, tmp_path / "stream", "stream", device, stream_depth=stream_depth, no_termination=True)
    store = streamed.offload_store
    assert store.stream.streamed_batches == (STEPS if device == "cpu" else 8), "every step was stepped group by group"
    tol = 1e-5 if device == "cpu" else 1e-4
    assert memory.num_points == streamed.num_points
    assert device == "cuda" or streamed.num_points != MICRO_CITY["num_points"], "20 steps densify"
    # A subtree composite rounds differently from one render (1e-16), and Adam's normalised step
    # makes such noise in a near-zero gradient visible: float64 keeps it far below a real error.
    ok, report = _compare(memory, streamed, device, cpu_tol=tol)
    assert ok, f"stream vs in memory, worst {report}"
    # Eval renders stream too: the same model rendered in one part (offload host's staging) is
    # the reference, so the comparison does not depend on the training's rounding.
    streamed.eval()
    cameras = trainer.pipeline.datamanager.train_dataset.cameras
    largest = 0
    with torch.no_grad():
        for i in range(len(cameras)):
            stream, store.stream = store.stream, None
            want = streamed.get_outputs(cameras[i : i + 1])
            store.stream = stream
            got = streamed.get_outputs(cameras[i : i + 1])
            for key, bound in (("rgb", 1e-9), ("accumulation", 1e-9), ("depth", 1e-8)):  # depth: world units over (1 - T)
                bound = bound if device == "cpu" else 1e-4
                assert float((want[key] - got[key]).abs().max()) <= bound, f"eval {key} of camera {i}"
            largest = max(largest, streamed.num_points)
    assert largest <= memory.num_points // 2, f"an eval render held {largest} of {memory.num_points} Gaussians"
    state = trainer.checkpoint_state(STEPS)
    assert state["pipeline"]["_model.gauss_params.means"].shape[0] == memory.num_points


def test_stream_in_clip_mode_equals_in_memory(street_city, tmp_path):
    """Clip mode (one process): a subtree's renders also draw the copies of other subtrees'
    Gaussians that reach its leaves (the reach pass finds them), and a Gaussian takes its step
    once every subtree's backward has added its gradient: 20 steps with densification equal
    the in-memory clip run, and so do eval renders."""
    memory, _, _ = _train(street_city, tmp_path / "memory", "none", no_termination=True, mode="clip")
    streamed, _, trainer = _train(street_city, tmp_path / "stream", "stream", stream_depth=4, no_termination=True, mode="clip")
    assert streamed.frame.clip and streamed.offload_store.stream.streamed_batches == STEPS
    assert memory.num_points == streamed.num_points != MICRO_CITY["num_points"]
    diff = float((_rows(memory) - _rows(streamed)).abs().max())
    assert diff <= 1e-5, f"clip stream vs in memory: {diff:.3g}"
    streamed.eval()
    store = streamed.offload_store
    cameras = trainer.pipeline.datamanager.train_dataset.cameras
    with torch.no_grad():
        for i in range(len(cameras)):
            stream, store.stream = store.stream, None
            want = streamed.get_outputs(cameras[i : i + 1])["rgb"]
            store.stream = stream
            got = streamed.get_outputs(cameras[i : i + 1])["rgb"]
            assert float((want - got).abs().max()) <= 1e-9, f"eval render of camera {i}"


def test_auto_offload_streams_what_does_not_fit():
    from landmark_plugin.gaussians.offload import auto_offload

    assert auto_offload(10, 20) == "none" and auto_offload(20, 20) == "none"
    assert auto_offload(30, 20) == "stream", "streaming is what scales past one batch's view"


def test_the_host_store_never_holds_the_shard_twice(street_city, tmp_path):
    """The host store (``HostRows``) is ``gaussian_rows``' matrix held per layout entry: gathering
    and writing rows equal the matrix's, capturing a shard that lives in host memory takes its
    tensors as they are (no second copy of the shard), and holding every row again on the host
    gives them back to the model."""
    from landmark_plugin.gaussians.host_rows import HostRows
    from landmark_plugin.gaussians.rows import gaussian_rows, layout_columns

    trainer = setup_trainer(retina_config(street_city, tmp_path / "host", 4, tree_depth=3, visible_adam=True, offload="stream"))
    trainer.run_steps(0, 3)  # moments exist for the Gaussians the steps drew
    model = trainer.pipeline.model
    model.hold_every_row(on_host=True)
    matrix, layout = gaussian_rows(model, model.optimizers, model.strategy_state)
    means = model.means.detach()
    store = HostRows.capture(model, model.optimizers, model.strategy_state)
    assert store.layout == layout and store.shape == tuple(matrix.shape)
    means_span = layout_columns(layout)[("means", "param")]
    assert store.entry(means_span).data_ptr() == means.data_ptr(), "capturing copied the host shard"
    index = torch.tensor([5, 0, 17, 3])
    assert torch.equal(store[index], matrix[index])
    spans = [s for (_, kind), s in layout_columns(layout).items() if kind == "param"]
    columns = torch.cat([torch.arange(s.start, s.stop) for s in spans])
    assert torch.equal(store.gather(index, columns), matrix[index][:, columns])
    with pytest.raises(ValueError, match="whole layout entries"):
        store.gather(index, columns[1:])
    new = torch.randn(len(index), matrix.shape[1], dtype=matrix.dtype)
    store[index] = new
    matrix[index] = new
    assert torch.equal(store[torch.arange(matrix.shape[0])], matrix)
    store.hold_all(model, model.optimizers, model.strategy_state, torch.device("cpu"))
    assert model.means.data_ptr() == store.entry(means_span).data_ptr(), "holding every row on the host copied them"
    assert torch.equal(gaussian_rows(model, model.optimizers, model.strategy_state)[0], matrix)
