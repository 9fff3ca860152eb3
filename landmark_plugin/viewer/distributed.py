"""Live viewing of a multi-rank run: nerfstudio's viser viewer on rank 0, every rank rendering.

nerfstudio's viewer renders from one thread per browser client, calling
``get_model().get_outputs_for_camera(camera)`` while the trainer's lock keeps the training loop
out.  With the model sharded over ranks that cannot work as is: a render is collective
(retina-gs: every rank renders its partial, the owner composites, see ``gaussians/frame.py``;
landmark-grid: every rank of a model-parallel group evaluates its blocks, planes or channels),
and collectives must be issued by every rank's main thread in the same order.  So:

- the viewer (``ShardedViewer``, rank 0 only, bound where ``--viewer.websocket-host`` says:
  127.0.0.1 by default) hands its render threads a stand-in model (``mailbox_model``: Gaussians
  or a NeRF to the viewer, like the training model) whose ``get_outputs_for_camera`` posts the
  camera into a ``RenderMailbox`` and waits;
- at one fixed point of every training step (after the optimiser step and the after-step
  callbacks, where nerfstudio updates its viewer) every rank calls ``ViewerSync.step``: rank 0
  broadcasts one small tensor (``pack_message``: nothing / a camera to render / layout edits /
  paused / stop), and for a camera all ranks render it together (the pipeline's ``render_view``)
  and rank 0 hands the image back to the waiting viewer thread; layout edits made with the
  model's GUI controls follow as one broadcast object and every rank installs them (the
  pipeline's ``apply_edits``).  While training, at most one view (or edit) is served per step, so the
  viewer costs training one tiny broadcast per step plus the renders it asks for, at the
  resolution its own render-time budget picks (nerfstudio's ``RenderStateMachine`` measures the
  time from request to image, as it does when it waits for the trainer's lock);
- pause (the viewer's button), stop (``Trainer.shutdown``) and serving after training
  (``--viewer.quit-on-train-completion False``) are decided by rank 0 and broadcast, so all
  ranks stay in step; while idle, rank 0 sends a heartbeat every ``IDLE_POLL_S`` so no peer's
  collective times out.

The viewer thread never waits forever: a request fails after a timeout, when the mailbox is
closed (training ended or failed), or when nerfstudio interrupts the render (camera moved); it
then raises nerfstudio's render-interrupted exception, which the viewer's render thread
survives (it skips that frame).  The stand-in model never touches the training model, so the
viewer's background colour and eval / train switches do not leak into training; the render
uses the viewer's background only for models whose background is "random" (as splatfacto).
Not served: the viewer's crop box (the sharded render has no crop), and for Gaussians
non-perspective cameras.  The trainers' side (setup, the per-step call, serving after training)
is ``LandmarkTrainer``'s, shared by both methods.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Dict, List, Literal, Optional

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.models.base_model import Model
from nerfstudio.models.splatfacto import SplatfactoModel
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer import Viewer
from nerfstudio.viewer_legacy.server.viewer_utils import IOChangeException
from torch import Tensor

from landmark_plugin.distributed.collectives import broadcast_object, broadcast_tensor
from landmark_plugin.distributed.groups import Comm
from landmark_plugin.edits import EditsError, LayoutEdits

IDLE_POLL_S = 0.2
"""While paused or serving after training: how long rank 0 waits for a request before it sends
the other ranks a heartbeat (an empty round)."""

# Message kinds of the per-step broadcast (EDITS: layout edits follow as a broadcast object).
CONTINUE, RENDER, WAIT, STOP, EDITS = 0, 1, 2, 3, 4
MESSAGE_SIZE = 24  # kind, camera-to-world [3, 4], fx fy cx cy width height type, background [3] + flag
Control = Literal["train", "pause", "stop"]


class RenderDropped(IOChangeException):
    """A viewer render that will not come: timed out, the run ended, or the camera is unsupported.

    Subclasses nerfstudio's render-interrupted exception so the viewer's render thread skips
    the frame and keeps running (any other exception would end that thread)."""


# ---- the message ----------------------------------------------------------------------------
def pack_message(kind: int, camera: Optional[Cameras] = None, background: Optional[Tensor] = None) -> Tensor:
    """One [MESSAGE_SIZE] float64 tensor: the kind, and for RENDER one camera and its background."""
    message = torch.zeros(MESSAGE_SIZE, dtype=torch.float64)
    message[0] = kind
    if camera is not None:
        message[1:13] = camera.camera_to_worlds.reshape(-1)[:12].double().cpu()
        for i, value in enumerate((camera.fx, camera.fy, camera.cx, camera.cy, camera.width, camera.height, camera.camera_type)):
            message[13 + i] = float(value.reshape(-1)[0])
    if background is not None:
        message[20:23] = background.reshape(3).double().cpu()
        message[23] = 1.0
    return message


def unpack_camera(message: Tensor) -> Cameras:
    """The one camera of a RENDER message (float32, as the viewer builds it)."""
    c2w = message[1:13].reshape(1, 3, 4).float()
    fx, fy, cx, cy, width, height, kind = message[13:20].tolist()
    return Cameras(
        camera_to_worlds=c2w, fx=fx, fy=fy, cx=cx, cy=cy, width=int(round(width)), height=int(round(height)),
        camera_type=CameraType(int(round(kind))),
    )


def unpack_background(message: Tensor) -> Optional[Tensor]:
    return message[20:23].float() if message[23] > 0 else None


# ---- rank 0: viewer threads <-> the training loop --------------------------------------------
@dataclass
class ViewRequest:
    """What a viewer thread waits for: a camera to render, or (``edits``) layout edits to install on
    every rank; ``done`` is set once ``outputs`` or ``error`` is."""

    camera: Optional[Cameras] = None
    background: Optional[Tensor] = None
    edits: Optional[LayoutEdits] = None
    source: str = "viewer"
    done: threading.Event = field(default_factory=threading.Event)
    outputs: Optional[Dict[str, Tensor]] = None
    error: Optional[str] = None
    cancelled: bool = False

    def finish(self, outputs: Optional[Dict[str, Tensor]] = None, error: Optional[str] = None) -> None:
        self.outputs, self.error = outputs, error
        self.done.set()


class RenderMailbox:
    """Requests from the viewer's render threads, served by the training loop's main thread."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._pending: List[ViewRequest] = []
        self._closed: Optional[str] = None

    # viewer threads
    def render(self, camera: Cameras, background: Optional[Tensor]) -> Dict[str, Tensor]:
        """Post ``camera`` and wait for its outputs; raises ``RenderDropped`` instead of hanging."""
        request = ViewRequest(camera.to("cpu"), None if background is None else background.detach().cpu())
        self._post_and_wait(request)
        if request.error is not None:
            raise RenderDropped(request.error)
        assert request.outputs is not None
        return request.outputs

    def install_edits(self, edits: LayoutEdits, source: str = "viewer") -> None:
        """Post layout edits for every rank (a GUI control's callback) and wait until they are
        installed; raises ``EditsError`` saying why when they are not (rejected, or the run ended)."""
        request = ViewRequest(edits=edits, source=source)
        try:
            self._post_and_wait(request)
        except RenderDropped as dropped:
            raise EditsError(f"the edits were not installed on the ranks: {dropped}") from None
        if request.error is not None:
            raise EditsError(request.error)

    def _post_and_wait(self, request: ViewRequest) -> None:
        """Post ``request`` and wait until it is done; ``RenderDropped`` after the timeout, when the
        mailbox is closed, or on nerfstudio's interrupt."""
        with self._cond:
            if self._closed is not None:
                raise RenderDropped(self._closed)
            self._pending.append(request)
            self._cond.notify_all()
        deadline = time.monotonic() + self.timeout_s
        try:
            # Short waits, so that nerfstudio's interrupt (a trace function raising on a Python
            # line of this thread when the camera moves) can end the wait.
            while not request.done.wait(0.05):
                if time.monotonic() > deadline:
                    raise RenderDropped(f"no render within {self.timeout_s:g} s (is training stuck in a long step?)")
        except BaseException:
            self._withdraw(request)
            raise

    def _withdraw(self, request: ViewRequest) -> None:
        with self._cond:
            request.cancelled = True
            if request in self._pending:
                self._pending.remove(request)

    # main thread
    def take(self, wait_s: float = 0.0) -> Optional[ViewRequest]:
        """The oldest pending request (waiting up to ``wait_s`` for one), or None."""
        with self._cond:
            if not self._pending and wait_s > 0 and self._closed is None:
                self._cond.wait(wait_s)
            return self._pending.pop(0) if self._pending else None

    def close(self, reason: str) -> None:
        """Fail every pending and future request with ``reason`` (training ended or failed)."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            pending, self._pending = self._pending, []
        for request in pending:
            request.finish(error=reason)

    @property
    def closed(self) -> bool:
        return self._closed is not None


class MailboxModel(torch.nn.Module):
    """What the viewer's render threads see as the model: it renders through the mailbox.

    ``Model.__init__`` is not run, since the stand-in holds no parameters: ``eval()`` /
    ``train()`` flip only its own flag, and the background is sent with the request instead of
    being set on the training model.  nerfstudio's viewer tells Gaussians from NeRFs by the
    model's class (background colour, depth handling, export tab), so the viewer gets one of
    the two subclasses below, whichever the training model is (``mailbox_model``).

    Args:
        mailbox: rank 0's mailbox.
        perspective_only: refuse other camera types (the Gaussian rasteriser is perspective).
    """

    def __init__(self, mailbox: RenderMailbox, perspective_only: bool = True):  # noqa: D107 - see the class docstring
        torch.nn.Module.__init__(self)
        self.mailbox = mailbox
        self.perspective_only = perspective_only
        self.viewer_background: Optional[Tensor] = None
        self._warned: set = set()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # cameras travel to rank 0's main thread through the CPU

    def set_background(self, background_color: Tensor) -> None:
        self.viewer_background = background_color.detach().cpu()

    def get_outputs_for_camera(self, camera: Cameras, obb_box=None) -> Dict[str, Tensor]:  # type: ignore[override]
        if obb_box is not None:
            self._note_once("crop", "live view of a multi-rank run: the viewer's crop box is ignored (not supported yet)")
        if self.perspective_only and int(camera.camera_type.reshape(-1)[0]) != CameraType.PERSPECTIVE.value:
            self._note_once("type", "live view of a multi-rank run renders perspective cameras only")
            raise RenderDropped("only perspective cameras are rendered")
        return self.mailbox.render(camera, self.viewer_background)

    def _note_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            CONSOLE.print(f"[yellow]{message}")


class MailboxGaussians(MailboxModel, SplatfactoModel):
    """The stand-in as Gaussians: nerfstudio's viewer passes it its background colour and reads
    the depth output as splatfacto's."""


class MailboxNerf(MailboxModel, Model):
    """The stand-in as a NeRF: the viewer renders it as any ray-based model."""


def mailbox_model(mailbox: RenderMailbox, like: Model) -> MailboxModel:
    """The stand-in for a training model ``like``: Gaussians or a NeRF to the viewer, as it is."""
    if isinstance(like, SplatfactoModel):
        return MailboxGaussians(mailbox, perspective_only=True)
    return MailboxNerf(mailbox, perspective_only=False)


class _ViewedPipeline:
    """The parts of rank 0's pipeline the viewer reads (data manager: training cameras and
    images; model: camera optimiser, export tab, initial points; config: the run's world size),
    and the model's layout controls (``layout``, when it has them).

    Cached properties, because nerfstudio's viewer searches the pipeline for custom GUI
    elements by reading every public attribute recursively and skips only cached properties:
    on a rank that holds part of the images, reading the data manager's eval properties
    fails, and GUI elements acting on rank 0's model alone would not be seen by the others.
    The layout controls are searched: their edits go to every rank (``ShardedViewer``).
    """

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.config = pipeline.config
        layout = getattr(pipeline.model, "layout", None)
        if layout is not None:
            self.layout = layout

    @cached_property
    def datamanager(self):
        return self._pipeline.datamanager

    @cached_property
    def model(self):
        return self._pipeline.model


class ShardedViewer(Viewer):
    """nerfstudio's viewer whose renders go through the mailbox and whose pause button is
    applied by all ranks at the same step (``ViewerSync``).

    Built with no train lock: its render threads never touch the training model (the main
    thread renders, between steps), and holding the lock while waiting for the main thread
    would deadlock the next step.  The initial point cloud it shows (hidden by default) is
    rank 0's shard only.  Of the model's custom GUI elements only its layout controls are shown;
    the edits they make are installed by every rank (``RenderMailbox.install_edits``, served by
    ``ViewerSync``), while their statistics table counts rank 0's shard.
    """

    def __init__(self, config, log_filename, datapath, pipeline, trainer, mailbox: RenderMailbox, share: bool = False):
        self.remote_model = mailbox_model(mailbox, pipeline.model)
        self.pause_requested = False
        layout = getattr(pipeline.model, "layout", None)
        if layout is not None:
            layout.route_installs(mailbox.install_edits)
        super().__init__(config, log_filename, datapath, _ViewedPipeline(pipeline), trainer=trainer, train_lock=None,
                         share=share)

    def get_model(self) -> MailboxModel:  # type: ignore[override]
        return self.remote_model

    def _toggle_training_state(self, _) -> None:
        # nerfstudio sets trainer.training_state here, which its loop reads at the top of the
        # next step on rank 0 only; the request is applied at ViewerSync.step on every rank.
        self.pause_requested = not self.pause_requested


# ---- every rank: the per-step synchronisation -------------------------------------------------
RenderFn = Callable[[Cameras, Optional[Tensor]], Optional[Dict[str, Tensor]]]
InstallFn = Callable[[LayoutEdits, str], None]


class ViewerSync:
    """The per-step exchange between rank 0's viewer and all ranks (see the module docstring).

    Args:
        comm: the run's ranks.
        render: collective; renders one camera (with the viewer's background or None) and
            returns the outputs on rank 0 (the pipeline's ``render_view``).
        mailbox: rank 0's mailbox; None on the other ranks.
        install_edits: collective; installs layout edits on this rank's model, raising
            ``EditsError`` (on every rank alike) to reject them (the pipeline's ``apply_edits``).
            None: the viewer's edits are refused.
    """

    def __init__(self, comm: Comm, render: RenderFn, mailbox: Optional[RenderMailbox],
                 install_edits: Optional[InstallFn] = None):
        if comm.is_main != (mailbox is not None):
            raise ValueError("rank 0, and only rank 0, holds the viewer's mailbox")
        self.comm = comm
        self.render_fn = render
        self.install_fn = install_edits
        self.mailbox = mailbox
        self.state: Literal["training", "paused", "serving", "stopped"] = "training"
        """Where the ranks are: training, paused by the viewer, serving after training, or stopped."""
        self.renders = 0
        self.render_seconds = 0.0
        self.last_camera: Optional[Cameras] = None
        """The camera of the last view rendered (what the viewer shows, at its render resolution)."""

    def step(self, control: Callable[[], Control]) -> Control:
        """Collective, once per training step: serve at most one pending view; while rank 0's
        ``control()`` says "pause", serve views until it says otherwise.  Returns "train" or
        "stop" (the same on every rank)."""
        return self._serve(control, after_training=False)

    def serve_until_stop(self, control: Callable[[], Control]) -> None:
        """Collective, after training: serve views until rank 0's ``control()`` says "stop"."""
        self._serve(control, after_training=True)

    def close(self, reason: str) -> None:
        if self.mailbox is not None:
            self.mailbox.close(reason)

    def _serve(self, control: Callable[[], Control], after_training: bool) -> Control:
        served = 0
        while True:
            request, message = None, torch.zeros(MESSAGE_SIZE, dtype=torch.float64)
            if self.mailbox is not None:
                request, message = self._next(control(), after_training, served)
            message = broadcast_tensor(self.comm, message, what="viewer request")
            kind = int(message[0])
            if kind == CONTINUE:
                self.state = "training"
                return "train"
            if kind == STOP:
                self.state = "stopped"
                return "stop"
            if kind == WAIT:
                self.state = "serving" if after_training else "paused"
            if kind == RENDER:
                self._render(message, request)
                served += 1
            if kind == EDITS:
                self._install(request)
                served += 1

    def _next(self, state: Control, after_training: bool, served: int):
        """Rank 0: what this round does, and the request it serves (if any)."""
        assert self.mailbox is not None
        if state == "stop":
            return None, pack_message(STOP)
        idle = after_training or state == "pause"
        if not idle and served > 0:
            return None, pack_message(CONTINUE)  # one view per training step
        request = self.mailbox.take(IDLE_POLL_S if idle else 0.0)
        if request is not None and request.edits is not None and self.install_fn is None:
            request.finish(error="this run's ranks do not install the viewer's edits")
            request = None
        if request is None:
            return None, pack_message(WAIT if idle else CONTINUE)
        if request.edits is not None:
            return request, pack_message(EDITS)
        return request, pack_message(RENDER, request.camera, request.background)

    def _install(self, request: Optional[ViewRequest]) -> None:
        """Every rank installs rank 0's edits; a rejection (the same on every rank) goes back to
        the waiting GUI callback."""
        assert self.install_fn is not None
        sent = (request.edits.to_json(), request.source) if request is not None and request.edits is not None else None
        text, source = broadcast_object(self.comm, sent, what="viewer layout edits")
        try:
            self.install_fn(LayoutEdits.from_json(text, source), source)
        except EditsError as error:
            if request is not None:
                request.finish(error=str(error))
            return
        if request is not None:
            request.finish(outputs={})

    def _render(self, message: Tensor, request: Optional[ViewRequest]) -> None:
        start = time.perf_counter()
        camera = unpack_camera(message)
        try:
            outputs = self.render_fn(camera, unpack_background(message))
        except BaseException as error:
            if request is not None:
                request.finish(error=f"the render failed: {error}")
            raise
        self.renders += 1
        self.render_seconds += time.perf_counter() - start
        self.last_camera = camera
        if request is not None:
            if outputs is None:
                request.finish(error="rank 0 received no composite")
            else:
                request.finish(outputs=outputs)

