"""The viewer's 'layout' controls: nerfstudio finds them on both models, they install edits on the
model, draw the partition coloured by rank, and show per-leaf / per-block counts and memory."""

from __future__ import annotations

import copy
import socket
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("nerfstudio")

from nerfstudio.viewer.utils import parse_object  # noqa: E402
from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement  # noqa: E402

from _edit_models import grid_model  # noqa: E402
from landmark_plugin.edits import Appearance, CopyBlock, LayoutEdits, RemoveBlock, scene_layout  # noqa: E402
from landmark_plugin.viewer.controls import HIDDEN_COLOUR, LayoutControls  # noqa: E402

SCALE = 10.0  # nerfstudio's VISER_NERFSTUDIO_SCALE_RATIO: the viewer's world is the scene times 10


class FakeScene:
    """Records what the controls draw (name -> (polyline points, colour))."""

    def __init__(self) -> None:
        self.nodes = {}

    def add_spline_cubic_bezier(self, name, positions, control_points, line_width, color):
        assert len(control_points) == 2 * len(positions) - 2  # viser's own check
        self.nodes[name] = (np.asarray(positions), tuple(color))
        return SimpleNamespace(remove=lambda: self.nodes.pop(name, None))


def click(button) -> None:
    """What nerfstudio does on a click: call the element's hook with the element."""
    button.cb_hook(button)


@pytest.fixture(scope="module")
def retina():
    from _retina_dist_helpers import make_model

    return make_model(300, depth=2).eval()


def test_nerfstudio_finds_the_controls_on_both_models(retina):
    grid = grid_model()
    for model, has_appearance in ((grid, True), (retina, False)):
        assert isinstance(model.layout, LayoutControls)
        paths = {path for path, _ in parse_object(model, ViewerElement, "Custom Elements")}
        assert {"Custom Elements/layout/partition/a_show", "Custom Elements/layout/edit/g_to",
                "Custom Elements/layout/edit/i_undo"} <= paths
        assert any(p.startswith("Custom Elements/layout/appearance/") for p in paths) == has_appearance
        assert [c for _, c in parse_object(model, ViewerControl, "Custom Elements")] == [model.layout.link]
        assert not any(k.startswith("layout.") for k in model.state_dict())  # nothing enters checkpoints
    twin = copy.deepcopy(grid)
    assert twin.layout._model is twin  # a copied model's controls edit the copy


def test_grid_controls_edit_the_model_and_draw_blocks_by_rank(tmp_path):
    model = grid_model()
    controls: LayoutControls = model.layout
    scene = FakeScene()
    controls.partition.a_show.value = True
    controls.partition.c_ranks.value = 2
    controls.attach_server(SimpleNamespace(scene=scene))
    boxes = scene_layout(model).boxes().numpy()
    drawn = [scene.nodes[f"/layout/block_{b}"] for b in range(4)]
    for (points, _), box in zip(drawn, boxes):  # each polyline traces its block's box (scaled)
        np.testing.assert_allclose([points.min(0), points.max(0)], box * SCALE, rtol=1e-12)
    colours = [colour for _, colour in drawn]
    assert colours[0] == colours[1] != colours[2] == colours[3]  # rank 0 owns blocks 0-1, rank 1 blocks 2-3
    assert "/layout/edit_box" in scene.nodes

    controls.partition.f_block.value = "2"
    click(controls.partition.g_hide)
    assert controls.edits == LayoutEdits(ops=(RemoveBlock(2),))
    assert len(model.field.layout_edits) == 1 and all(len(p.layout_edits) == 1 for p in model.proposal_networks)
    assert scene.nodes["/layout/block_2"][1] == HIDDEN_COLOUR
    assert "| 2 (hidden) | 1 |" in controls.partition.d_stats.content

    controls.edit.f_from.value, controls.edit.g_to.value = "0", "3"
    click(controls.edit.h_copy_block)
    assert controls.edits.ops == (RemoveBlock(2), CopyBlock(0, to_block=3))
    path = tmp_path / "edits.json"
    controls.edit.k_path.value = str(path)
    click(controls.edit.l_save)
    click(controls.edit.i_undo)
    assert controls.edits.ops == (RemoveBlock(2),)
    click(controls.partition.h_show)
    assert controls.edits.ops == () and model.field.layout_edits == ()
    click(controls.edit.m_load)
    assert controls.edits.ops == (RemoveBlock(2), CopyBlock(0, to_block=3))

    path.write_text('{"ops": [{"op": "remove_block", "block": 9}]}')
    click(controls.edit.m_load)  # rejected: the message names the file, the edits stay
    assert str(path) in controls.edit.n_list.content and "block 9 does not exist" in controls.edit.n_list.content
    assert len(model.field.layout_edits) == 2

    folder = controls.appearance
    folder.a_mode.value, folder.b_image.value, folder.c_to_image.value, folder.d_t.value = "interpolate", 1, 3, 0.5
    click(folder.d_t)
    assert model.field.eval_appearance_mix == (1, 3, 0.5) and controls.edits.appearance == Appearance(1, 3, 0.5)
    click(controls.edit.j_clear)
    assert model.field.layout_edits == () and model.field.eval_appearance_mix is None


def test_retina_stats_give_gaussians_and_memory_per_leaf_and_rank(retina):
    controls: LayoutControls = retina.layout
    controls.partition.c_ranks.value = 2
    controls.attach_server(SimpleNamespace(scene=FakeScene()))
    rows = controls.partition.d_stats.content.splitlines()
    counts = retina.leaf_counts().tolist()
    per_gaussian = sum(p[0].numel() * p.element_size() for p in retina.gauss_params.values())
    assert per_gaussian == (3 + 3 + 4 + 3 + 3 * 3 + 1) * 8  # float64 means, scales, quats, dc, rest (SH 1), opacity
    for leaf, count in enumerate(counts):
        assert f"| {leaf} | {leaf // 2} | {count:,} | {count * per_gaussian / 2**20:.2f} |" in rows
    assert f"| **rank 1** | | **{counts[2] + counts[3]:,}** |" in controls.partition.d_stats.content
    assert sum(counts) == 300


def test_controls_work_on_a_real_viser_server():
    """Install every element as nerfstudio's viewer does, then start the link: the text and the
    boxes reach viser (its API accepts what the controls send)."""
    import viser

    model = grid_model()
    with socket.socket() as probe:  # a free port on localhost
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = viser.ViserServer(host="127.0.0.1", port=port)
    try:
        for _, element in parse_object(model, ViewerElement, "Custom Elements"):
            element.install(server)
        controls: LayoutControls = model.layout
        controls.partition.a_show.value = True
        viewer = SimpleNamespace(viser_server=server, pipeline=SimpleNamespace(config=SimpleNamespace(world_size=4)))
        controls.link._setup(viewer)
        assert controls.partition.c_ranks.value == 4  # the run's rank count, from the pipeline config
        assert "| **rank 3** |" in controls.partition.d_stats.gui_handle.content
        assert len(controls._drawn) == 5  # four blocks and the edit box
        click(controls.partition.g_hide)
        assert "hide block 0" in controls.edit.n_list.gui_handle.content
    finally:
        server.stop()
