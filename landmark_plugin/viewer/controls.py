"""Viewer controls of both methods: the partition, hiding blocks, layout edits and appearance.

nerfstudio's viewer gathers every ``ViewerElement`` reachable from the pipeline through module
attributes (``viewer/utils.py: parse_object``) into its "Custom Elements" folder: one sub-folder per
module on the attribute path, elements sorted by attribute name (hence the ``a_``, ``b_`` prefixes
below), each callback run under the training lock and followed by a re-render.  ``LayoutControls`` is
such a module; the models keep it as ``model.layout``.  Drawing the partition needs the viser server,
which a ``ViewerControl`` found the same way receives in ``_setup``.

Every control builds a new ``LayoutEdits`` and installs it with ``apply_edits`` (the same call
``landmark-render --edits`` makes), so what the viewer shows is what a render of the saved JSON shows.
"""

from __future__ import annotations

import colorsys
import contextlib
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerControl,
    ViewerDropdown,
    ViewerElement,
    ViewerNumber,
    ViewerSlider,
    ViewerText,
    ViewerVec3,
)

from landmark_plugin.core.partition import leaf_ranks
from landmark_plugin.edits import (
    Appearance,
    CopyBlock,
    CopyBox,
    EditsError,
    LayoutEdits,
    RemoveBlock,
    RemoveBox,
    contiguous_ranks,
    describe,
    load_edits,
    plural,
    save_edits,
    scene_layout,
)

# Box edges as one polyline: bottom square, a riser, top square, then the three other risers
# (three edges drawn twice: a cube's corners all have odd degree, so no path draws each edge once).
_BOX_PATH = [0, 1, 2, 3, 0, 4, 5, 6, 7, 4, 5, 1, 2, 6, 7, 3]
EDIT_BOX_COLOUR = (255, 255, 255)
COPY_TARGET_COLOUR = (255, 210, 0)
HIDDEN_COLOUR = (110, 110, 110)


def box_polyline(box: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Positions [16, 3] and cubic Bezier control points [30, 3] tracing the 12 edges of a [2, 3] box
    with straight segments (each segment's controls lie on it)."""
    lo, hi = box
    corners = np.array(
        [[x, y, z] for z in (lo[2], hi[2]) for (x, y) in ((lo[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (lo[0], hi[1]))]
    )
    points = corners[_BOX_PATH]
    start, end = points[:-1], points[1:]
    controls = np.stack([start + (end - start) / 3, start + 2 * (end - start) / 3], axis=1).reshape(-1, 3)
    return points, controls


def rank_colours(count: int) -> List[Tuple[int, int, int]]:
    """Distinct colours, golden-angle hues: neighbouring ranks differ strongly."""
    colours = []
    for i in range(count):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
        colours.append((int(255 * r), int(255 * g), int(255 * b)))
    return colours


def stats_markdown(kind: str, item_name: str, stats, ranks: Sequence[int], hidden: Sequence[int]) -> str:
    """A table of what each block (leaf) and each rank holds."""
    rows = [f"| {kind} | rank | {item_name} | MiB |", "|---:|---:|---:|---:|"]
    for b, (s, r) in enumerate(zip(stats, ranks)):
        mark = " (hidden)" if b in hidden else ""
        rows.append(f"| {b}{mark} | {r} | {s.items:,} | {s.bytes / 2**20:.2f} |")
    for r in sorted(set(ranks)):
        items = sum(s.items for s, rr in zip(stats, ranks) if rr == r)
        size = sum(s.bytes for s, rr in zip(stats, ranks) if rr == r)
        rows.append(f"| **rank {r}** | | **{items:,}** | **{size / 2**20:.2f}** |")
    return "\n".join(rows)


class ViewerMarkdown(ViewerElement[str]):
    """Read-only markdown text (nerfstudio has no markdown element); installed in its folder like the others."""

    def __init__(self, name: str, content: str = "") -> None:
        super().__init__(name)
        self.content = content

    def _create_gui_handle(self, viser_server) -> None:
        self.gui_handle = viser_server.gui.add_markdown(self.content)

    def install(self, viser_server) -> None:
        self._create_gui_handle(viser_server)

    def set_content(self, content: str) -> None:
        self.content = content
        if self.gui_handle is not None:
            self.gui_handle.content = content  # type: ignore[union-attr]


class _ServerLink(ViewerControl):
    """Hands the viewer (and its viser server) to the controls when the viewer starts."""

    def __init__(self, on_setup: Callable[[Any], None]) -> None:
        self._on_setup = on_setup

    def _setup(self, viewer) -> None:
        super()._setup(viewer)
        self._on_setup(viewer)


class _Folder(nn.Module):
    """A folder of the GUI: nerfstudio names it after this module's attribute name."""

    def __init__(self, **elements: Any) -> None:
        super().__init__()
        for name, element in elements.items():
            setattr(self, name, element)


class LayoutControls(nn.Module):
    """The viewer's 'layout' folders for a retina-gs or landmark-grid model.

    Holds no parameters or buffers (nothing enters checkpoints).  The model is kept outside torch's
    module registry (a registered child pointing back at its parent would make the module tree a
    cycle); deepcopy copies it along with the model.  viser runs callbacks on a thread pool, so the
    controls' own state changes under a lock.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        self._lock = threading.RLock()
        self._server = None
        self._drawn: dict = {}
        self._edits = LayoutEdits()
        self._installer: Optional[Callable[[LayoutEdits, str], None]] = None
        layout = scene_layout(model)
        kind, count = layout.kind, layout.num_blocks
        names = [str(i) for i in range(count)]
        self.link = _ServerLink(self._attach)
        self.partition = _Folder(
            a_show=ViewerCheckbox("Show boxes", False, cb_hook=self._redraw, hint=f"{kind} boxes, coloured by rank or {kind}"),
            b_colour=ViewerDropdown("Colour by", "rank", ["rank", kind], cb_hook=self._redraw),
            c_ranks=ViewerNumber("Ranks", 1, cb_hook=self._refresh, hint=f"ranks owning contiguous {kind} ranges"),
            d_stats=ViewerMarkdown("stats"),
            e_refresh=ViewerButton("Refresh counts", cb_hook=self._refresh),
            f_block=ViewerDropdown(kind.capitalize(), names[0], names),
            g_hide=ViewerButton(f"Hide {kind}", cb_hook=lambda _: self._install(self._edits.push(RemoveBlock(self._picked())))),
            h_show=ViewerButton(f"Show {kind}", cb_hook=lambda _: self._install(self._edits.showing(self._picked()))),
            i_show_all=ViewerButton(f"Show all {plural(kind)}", cb_hook=self._show_all),
        )
        lo, hi = layout.boxes()[0].tolist()
        self.edit = _Folder(
            a_min=ViewerVec3("Box min", tuple(lo), cb_hook=self._redraw),
            b_max=ViewerVec3("Box max", tuple(hi), cb_hook=self._redraw),
            c_remove_box=ViewerButton("Remove box", cb_hook=lambda _: self._push_box(RemoveBox)),
            d_offset=ViewerVec3("Copy offset", (0.0, 0.0, 0.0), cb_hook=self._redraw),
            e_copy_box=ViewerButton("Copy box by offset", cb_hook=lambda _: self._push_box(CopyBox)),
            f_from=ViewerDropdown(f"Copy {kind}", names[0], names),
            g_to=ViewerDropdown(f"onto {kind}", names[-1], names),
            h_copy_block=ViewerButton(f"Copy {kind}", cb_hook=self._copy_block),
            i_undo=ViewerButton("Undo", cb_hook=lambda _: self._install(self._edits.undo())),
            j_clear=ViewerButton("Clear edits", cb_hook=lambda _: self._install(LayoutEdits())),
            k_path=ViewerText("Edits file", "edits.json", hint="JSON for landmark-render --edits"),
            l_save=ViewerButton("Save edits", cb_hook=self._save),
            m_load=ViewerButton("Load edits", cb_hook=self._load),
            n_list=ViewerMarkdown("edits", "no edits"),
        )
        if layout.num_images > 0:  # retina-gs has no appearance codes: no folder
            last = max(layout.num_images - 1, 1)
            self.appearance = _Folder(
                a_mode=ViewerDropdown("Appearance", "average", ["average", "image", "interpolate"], cb_hook=self._appearance),
                b_image=ViewerSlider("Image", 0, 0, last, 1, cb_hook=self._appearance),
                c_to_image=ViewerSlider("To image", 0, 0, last, 1, cb_hook=self._appearance),
                d_t=ViewerSlider("t", 0.0, 0.0, 1.0, 0.01, cb_hook=self._appearance),
            )

    def __getstate__(self):
        # the lock and the viser handles belong to this process's viewer
        state = dict(self.__dict__)
        state.update(_lock=None, _server=None, _drawn={}, _installer=None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    # ---- state -----------------------------------------------------------------------------
    @property
    def edits(self) -> LayoutEdits:
        """The edits installed on the model."""
        return self._edits

    def _layout(self):
        return scene_layout(self._model)

    def _picked(self) -> int:
        return int(self.partition.f_block.value)

    def route_installs(self, install: Optional[Callable[[LayoutEdits, str], None]]) -> None:
        """Install edits through ``install`` (which raises ``EditsError`` to reject them) instead of
        on this model alone: the live view of a multi-rank run sends them to every rank.  None: locally."""
        self._installer = install

    def _install(self, edits: LayoutEdits, source: str = "viewer") -> None:
        """Install on the model; a rejected edit leaves the current ones and says why."""
        with self._lock:
            try:
                if self._installer is None:
                    self._layout().install(edits, source)
                else:
                    self._installer(edits, source)
            except EditsError as error:
                self._refresh(message=str(error))
                return
            self._edits = edits
            self._refresh()

    def _push_box(self, op_type) -> None:
        lo, hi = tuple(self.edit.a_min.value), tuple(self.edit.b_max.value)
        if not all(a < b for a, b in zip(lo, hi)):
            self._refresh(message=f"box min {lo} must be below max {hi} on every axis")
            return
        op = RemoveBox(lo, hi) if op_type is RemoveBox else CopyBox(lo, hi, tuple(self.edit.d_offset.value))
        self._install(self._edits.push(op))

    def _copy_block(self, _=None) -> None:
        self._install(self._edits.push(CopyBlock(int(self.edit.f_from.value), to_block=int(self.edit.g_to.value))))

    def _show_all(self, _=None) -> None:
        edits = self._edits
        for block in edits.hidden_blocks():
            edits = edits.showing(block)
        self._install(edits)

    def _appearance(self, _=None) -> None:
        folder = self.appearance
        mode = folder.a_mode.value
        appearance = None
        if mode == "image":
            appearance = Appearance(int(folder.b_image.value))
        elif mode == "interpolate":
            appearance = Appearance(int(folder.b_image.value), int(folder.c_to_image.value), float(folder.d_t.value))
        self._install(self._edits.with_appearance(appearance))

    def _save(self, _=None) -> None:
        path = Path(self.edit.k_path.value)
        try:
            save_edits(self._edits, path)
        except OSError as error:
            self._refresh(message=f"{path}: cannot write ({error.strerror or error})")
            return
        self._refresh(message=f"saved to {path.resolve()}")

    def _load(self, _=None) -> None:
        path = self.edit.k_path.value
        try:
            edits = load_edits(path)
        except EditsError as error:
            self._refresh(message=str(error))
            return
        self._install(edits, source=str(path))

    # ---- text and drawing ------------------------------------------------------------------
    def ranks(self) -> List[int]:
        """Rank of every block for the chosen number of ranks (clamped to 1..blocks)."""
        layout = self._layout()
        count = layout.num_blocks
        world = max(1, min(int(self.partition.c_ranks.value or 1), count))
        if layout.kind == "leaf":
            return leaf_ranks(count, world).tolist()
        return contiguous_ranks(count, world)

    def _refresh(self, _=None, message: str = "") -> None:
        with self._lock:
            self._refresh_locked(message)

    def _refresh_locked(self, message: str) -> None:
        layout = self._layout()
        hidden = self._edits.hidden_blocks()
        self.partition.d_stats.set_content(stats_markdown(layout.kind, layout.item_name, layout.stats(), self.ranks(), hidden))
        lines = list(describe(self._edits, layout.kind)) or ["no edits"]
        if self._edits.appearance is not None:
            a = self._edits.appearance
            lines.append(f"appearance: image {a.image}" + (f" -> {a.to_image} at t={a.t:.2f}" if a.to_image is not None else ""))
        if message:
            lines.append(f"**{message}**")
        self.edit.n_list.set_content("\n\n".join(lines))
        self._redraw()

    def _attach(self, viewer) -> None:
        """Called by the viewer at start: keep its server, take the run's rank count, draw."""
        # the same lock as nerfstudio's callbacks: the value set below fires one on viser's thread pool
        with viewer.train_lock if getattr(viewer, "train_lock", None) is not None else contextlib.nullcontext():
            self._server = viewer.viser_server
            world_size = getattr(getattr(viewer.pipeline, "config", None), "world_size", 1)
            self.partition.c_ranks.value = int(world_size or 1)
            self._refresh()

    def attach_server(self, server) -> None:
        """Draw on ``server`` (a viser server, or anything with its ``scene.add_spline_cubic_bezier``)."""
        self._server = server
        self._refresh()

    def scene_boxes(self) -> List[Tuple[str, np.ndarray, Tuple[int, int, int]]]:
        """(name, [2, 3] box in world units, colour) of everything the 'Show boxes' switch draws."""
        layout = self._layout()
        if not self.partition.a_show.value:
            return []
        hidden = set(self._edits.hidden_blocks())
        by_rank = self.partition.b_colour.value == "rank"
        keys = self.ranks() if by_rank else list(range(layout.num_blocks))
        palette = rank_colours(max(keys) + 1)
        out = []
        for b, box in enumerate(layout.boxes().numpy()):
            colour = HIDDEN_COLOUR if b in hidden else palette[keys[b]]
            out.append((f"/layout/{layout.kind}_{b}", box, colour))
        lo, hi = np.array(self.edit.a_min.value, float), np.array(self.edit.b_max.value, float)
        if (lo < hi).all():
            out.append(("/layout/edit_box", np.stack([lo, hi]), EDIT_BOX_COLOUR))
            offset = np.array(self.edit.d_offset.value, float)
            if offset.any():
                out.append(("/layout/copy_target", np.stack([lo, hi]) + offset, COPY_TARGET_COLOUR))
        return out

    def _redraw(self, _=None) -> None:
        with self._lock:
            if self._server is None:
                return
            from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO  # the viewer's world is scaled

            wanted = self.scene_boxes()
            names = {name for name, _, _ in wanted}
            for name in [n for n in self._drawn if n not in names]:
                self._drawn.pop(name).remove()
            for name, box, colour in wanted:  # a node added under an existing name replaces it
                points, controls = box_polyline(box * VISER_NERFSTUDIO_SCALE_RATIO)
                self._drawn[name] = self._server.scene.add_spline_cubic_bezier(
                    name, points, controls, line_width=2.0, color=colour
                )

