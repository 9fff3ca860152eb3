"""Rank functions of test_distributed_viewer.py (importable by spawned ranks): a 2-rank retina-gs run
through the real trainer with nerfstudio's viewer on rank 0, steered through files by the test
process, which drives a headless browser against the viewer; and a 2-rank landmark-grid run whose
viewer rank 0 drives itself (``train_grid_with_live_viewer``).

Protocol (files in ``signals``; rank 0 writes ``url.json``, ``stable.json``; the test writes ``done``):
- rank 0 writes ``url.json`` once the viewer serves, and points the first browser client's
  camera at training camera 0 (as a click on its frustum would);
- the test clicks the page's "Pause Training" after it saw a render there while training ran;
  every rank stops training and serves views; rank 0 asks the viewer for a fresh render, waits
  until the full-resolution one is done, and writes ``stable.json`` with the camera of the last view;
- the test takes its screenshot and writes ``done``; rank 0 shuts the trainer down (the stop
  reaches every rank through the viewer's per-step broadcast), training saves its shards.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

from _trainers import NEVER, grid_config, retina_config
from landmark_plugin.edits import LayoutEdits, RemoveBlock

WAIT_S = 240.0
MAX_RES = 192
"""The viewer's full render resolution in this test (the torch rasteriser on a shared CPU)."""


def _wait_for(predicate, what: str, timeout_s: float = WAIT_S, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0's viewer watcher: timed out waiting for {what}")
        time.sleep(poll_s)


def _look_through_train_camera(viewer, client, index: int) -> None:
    """What nerfstudio's frustum click does: the browser camera takes training camera ``index``'s pose."""
    import viser.transforms as vtf
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    c2w = viewer.pipeline.datamanager.train_dataset.cameras[index].camera_to_worlds.numpy()
    rotation = vtf.SO3.from_matrix(c2w[:3, :3]) @ vtf.SO3.from_x_radians(np.pi)
    with client.atomic():
        client.camera.wxyz = rotation.wxyz
        client.camera.position = c2w[:3, 3] * VISER_NERFSTUDIO_SCALE_RATIO


def _camera_dict(camera) -> Dict:
    return {
        "camera_to_worlds": camera.camera_to_worlds.tolist(), "fx": float(camera.fx), "fy": float(camera.fy),
        "cx": float(camera.cx), "cy": float(camera.cy), "width": int(camera.width), "height": int(camera.height),
    }


def _watch(trainer, signals: Path, record: Dict) -> None:
    """Rank 0's side of the protocol (a thread beside the training loop)."""
    viewer, sync = trainer.viewer_state, trainer.viewer_sync
    (signals / "url.json").write_text(json.dumps({
        "port": viewer.config.websocket_port, "host": viewer.config.websocket_host, "info": viewer.viewer_info,
    }))
    clients = _wait_for(lambda: viewer.viser_server.get_clients(), "a browser client")
    client = next(iter(clients.values()))
    _wait_for(lambda: client.camera._state.update_timestamp != 0.0, "the browser's first camera state")
    record["step_at_connect"] = trainer.step
    viewer.control_panel._max_res.value = MAX_RES  # the GUI's "Max res" slider
    _look_through_train_camera(viewer, client, 0)

    _wait_for(lambda: viewer.pause_requested, "the page's click on Pause Training")
    record["renders_while_training"] = sync.renders
    record["step_at_pause_request"] = trainer.step
    _wait_for(lambda: sync.state == "paused", "every rank to pause")
    record["step_paused"] = trainer.step
    before = sync.renders
    viewer._trigger_rerender()  # nerfstudio's own rerender (as after a GUI change)
    # Renders go low resolution, then full resolution (max res) once the camera is still, and
    # then stop until something changes; wait for that one.
    last = [sync.renders, time.monotonic()]

    def settled() -> bool:
        if sync.renders != last[0]:
            last[:] = [sync.renders, time.monotonic()]
        camera = sync.last_camera
        full = camera is not None and max(int(camera.width), int(camera.height)) == viewer.control_panel.max_res
        return sync.renders > before and full and time.monotonic() - last[1] > 1.0

    _wait_for(settled, "the renders after the pause to settle")
    record["camera"] = _camera_dict(sync.last_camera)
    record["renders_paused"] = sync.renders - before
    record["step_after_renders"] = trainer.step
    (signals / "stable.json").write_text(json.dumps(record["camera"]))

    _wait_for(lambda: (signals / "done").exists(), "the test's screenshot")
    record["render_seconds"] = sync.render_seconds
    record["renders"] = sync.renders
    trainer.shutdown()


def _watch_in_background(trainer, watch: Callable[[], None], failures: List[str]) -> threading.Thread:
    """Run ``watch`` (the test's driver of the viewer) beside training; an error is recorded in
    ``failures`` and stops the run instead of leaving it training forever."""

    def run() -> None:
        try:
            watch()
        except BaseException as error:  # noqa: BLE001 - reported through the record and by stopping the run
            failures.append(repr(error))
            trainer.shutdown()

    watcher = threading.Thread(target=run, daemon=True)
    watcher.start()
    return watcher


def train_with_live_viewer(comm, data: str, out: str, signals: str, port: int) -> Dict:
    """The run (see the module docstring); rank 0 returns what its watcher recorded."""
    from landmark_plugin.viewer.distributed import RenderDropped

    config = retina_config(Path(data), Path(out), NEVER)  # trains until the test stops it
    config.deterministic = False
    config.timestamp = "live"
    config.vis = "viewer"
    config.viewer.websocket_port = port
    config.viewer.quit_on_train_completion = False  # serve views after training, until shutdown
    config.viewer.max_num_display_images = 0  # no training-camera frustums drawn over the render
    config.pipeline.max_batch_size = 2
    config.pipeline.collective_timeout_s = 120.0
    if comm.is_main:
        config.save_config()  # ns-eval / ns-render read the run through it
    trainer = config.setup(local_rank=comm.rank, world_size=comm.world_size)
    trainer.setup()
    record: Dict = {"rank": comm.rank}
    watcher = None
    if comm.is_main:
        record["host"] = trainer.config.viewer.websocket_host
        record["info"] = list(trainer.viewer_state.viewer_info)
        sync = trainer.viewer_sync
        render = sync.render_fn

        def keep_last(camera, background):  # the composite rank 0 hands to the viewer, kept for the test
            outputs = render(camera, background)
            record["last_view"] = {"camera": _camera_dict(camera), "rgb": outputs["rgb"].detach().cpu().clone(),
                                   "background": None if background is None else background.tolist(),
                                   "model_step": trainer.pipeline.model.step}
            return outputs

        sync.render_fn = keep_last
        failures = []
        watcher = _watch_in_background(trainer, lambda: _watch(trainer, Path(signals), record), failures)
    trainer.train()
    record["final_step"] = trainer.step
    record["sync_state"] = trainer.viewer_sync.state
    # Leaves as the live views used them: a Gaussian keeps its leaf between migrations, while a
    # loaded model assigns leaves by mean; the test renders the saved model with these.
    record["leaf_ids"] = trainer.pipeline.model.leaf_ids.cpu().clone()
    if watcher is not None:
        watcher.join(timeout=30)
        record["watcher_failures"] = failures
        # After training the viewer's render threads must not wait: the mailbox refuses at once.
        start = time.monotonic()
        try:
            trainer.viewer_state.get_model().get_outputs_for_camera(
                trainer.pipeline.datamanager.train_dataset.cameras[0:1]
            )
            record["late_request"] = "served"
        except RenderDropped as error:
            record["late_request"] = f"dropped after {time.monotonic() - start:.3f} s: {error}"
            record["late_request_seconds"] = time.monotonic() - start
    return record


def train_without_viewer(comm, data: str, out: str, steps: int) -> int:
    """The same 2-rank run without the viewer, for the sharded-loading checks where no browser
    is installed: trains ``steps`` steps and saves its shards at the end."""
    config = retina_config(Path(data), Path(out), steps)
    config.deterministic = False
    config.timestamp = "live"
    config.pipeline.max_batch_size = 2
    config.pipeline.collective_timeout_s = 120.0
    if comm.is_main:
        config.save_config()
    trainer = config.setup(local_rank=comm.rank, world_size=comm.world_size)
    trainer.setup()
    trainer.train()
    return trainer.step


# ---- landmark-grid: nerfstudio's own render path, driven from rank 0 -------------------------------
GRID_MAX_RES = 40
"""The viewer's render resolution in the grid test (ray marching on a shared CPU)."""
GRID_EDITS = {"version": 1, "ops": [{"op": "copy_block", "block": 0, "to_block": 3}, {"op": "remove_block", "block": 1}]}
"""Edits made in the live view: under branch parallelism blocks 0-1 are rank 0's and 2-3 rank 1's,
so the copy reads rank 0's block where rank 1's was."""


def _viewer_render(viewer, c2w, state: str) -> Dict:
    """What one of nerfstudio's render threads does for a browser at camera ``c2w`` ([3, 4]):
    ``RenderStateMachine._render_img`` (resolution, the stand-in model, depth for the depth layer),
    without a browser.  ``state`` "high" renders at the viewer's "Max res"."""
    import torch
    from nerfstudio.cameras.cameras import CameraType
    from nerfstudio.viewer.render_state_machine import RenderStateMachine
    from nerfstudio.viewer.utils import CameraState
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    machine = RenderStateMachine(viewer, VISER_NERFSTUDIO_SCALE_RATIO, client=None)
    machine.state = state
    camera_state = CameraState(fov=1.0, aspect=4 / 3, c2w=torch.as_tensor(c2w, dtype=torch.float32),
                               camera_type=CameraType.PERSPECTIVE)
    return machine._render_img(camera_state)


def _watch_grid(trainer, record: Dict) -> None:
    """Rank 0's watcher: a view while training, pause, a full-resolution view, stop."""
    viewer, sync = trainer.viewer_state, trainer.viewer_sync
    record["stand_in"] = [cls.__name__ for cls in type(viewer.get_model()).__mro__[:3]]
    viewer.control_panel._max_res.value = GRID_MAX_RES  # the GUI's "Max res" slider
    c2w = viewer.pipeline.datamanager.train_dataset.cameras[0].camera_to_worlds
    _wait_for(lambda: trainer.step >= 1, "training to start")
    outputs = _viewer_render(viewer, c2w, "low_static")  # served at the end of a training step
    step = trainer.step
    _wait_for(lambda: trainer.step > step, "training to go on after the view")
    record["while_training"] = {"renders": sync.renders, "keys": sorted(outputs)}

    viewer._toggle_training_state(None)  # the GUI's "Pause Training"
    _wait_for(lambda: sync.state == "paused", "every rank to pause")
    record["step_paused"] = trainer.step
    outputs = _viewer_render(viewer, c2w, "high")
    record["paused_view"] = {"camera": _camera_dict(sync.last_camera), "rgb": outputs["rgb"].detach().cpu().clone(),
                             "gl_z_buf_depth": tuple(outputs["gl_z_buf_depth"].shape)}
    # The layout controls' edits (every control installs through ``_install``) reach both ranks.
    layout = viewer.pipeline.layout
    record["gui_layout_folders"] = sorted({path.split("/")[2] for path, _ in viewer.viewer_elements if "/layout/" in path})
    layout._install(LayoutEdits(ops=(RemoveBlock(99),)))  # rejected on every rank, shown in the GUI
    record["rejected"] = {"edits": layout.edits.to_dict(), "message": layout.edit.n_list.content}
    layout._install(LayoutEdits.from_dict(GRID_EDITS))
    record["installed"] = layout.edits.to_dict()
    outputs = _viewer_render(viewer, c2w, "high")
    record["edited_view"] = {"camera": _camera_dict(sync.last_camera), "rgb": outputs["rgb"].detach().cpu().clone()}
    record["step_after_view"] = trainer.step
    record["renders"] = sync.renders
    trainer.shutdown()


def train_grid_with_live_viewer(comm, data: str, out: str, port: int) -> Dict:
    """A 2-rank landmark-grid run (branch parallel) with the viewer on rank 0, which renders one
    view while training and one while paused, installs layout edits through its controls and
    renders again, then stops the run (the shards are saved)."""
    config = grid_config(Path(data), Path(out), NEVER)  # trains until the watcher stops it
    config.pipeline.model.parallel = "branch"
    # a loaded model has no annealing state: without it, a view renders as the loaded model does
    config.pipeline.model.use_proposal_weight_anneal = False
    config.deterministic = False
    config.timestamp = "live"
    config.vis = "viewer"
    config.viewer.websocket_port = port
    config.viewer.max_num_display_images = 0
    config.pipeline.collective_timeout_s = 120.0
    if comm.is_main:
        config.save_config()
    trainer = config.setup(local_rank=comm.rank, world_size=comm.world_size)
    trainer.setup()
    record: Dict = {"rank": comm.rank, "failures": []}
    watcher = None
    if comm.is_main:
        watcher = _watch_in_background(trainer, lambda: _watch_grid(trainer, record), record["failures"])
    trainer.train()
    record["final_step"] = trainer.step
    record["sync_state"] = trainer.viewer_sync.state
    record["field_edits"] = len(trainer.pipeline.model.field.layout_edits)
    if watcher is not None:
        watcher.join(timeout=30)
    return record
