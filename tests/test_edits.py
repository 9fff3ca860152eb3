"""Layout edits (remove / copy blocks and boxes, appearance) at render time, on tiny CPU models of both
methods: where pixels change, that copies render as the moved source, the JSON format and its errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from landmark_plugin.core.edits import BoxEdit, edit_gaussians, edit_point_set, edit_points, in_box
from landmark_plugin.core.partition import assign_leaves, build_kdtree
from landmark_plugin.core.render import Gaussians
from landmark_plugin.edits import (
    Appearance,
    CopyBlock,
    CopyBox,
    EditsError,
    LayoutEdits,
    RemoveBlock,
    RemoveBox,
    apply_edits,
    load_edits,
    scene_layout,
)

pytest.importorskip("nerfstudio")

from _edit_models import GRID_AABB, down_camera, grid_model  # noqa: E402

# Float32 renders of the same content from translated cameras differ by rounding of the sample
# positions (grid) or of the projected means (Gaussians): ~1e-7 measured; 1e-5 leaves margin while
# any real mistake (a missing or misplaced block) changes pixels by 1e-2 or more.
MOVED_RENDER_TOL = 1e-5
CHANGED = 1e-6
"""A pixel 'changed' when some channel moved by more than this."""

EVERY_OP = LayoutEdits(
    ops=(
        RemoveBlock(2),
        RemoveBox((-1.0, -1.0, -1.0), (0.0, 0.5, 1.0)),
        CopyBlock(0, to_block=3),
        CopyBlock(1, offset=(0.5, 0.0, 0.0)),
        CopyBox((0.0, 0.0, 0.0), (0.5, 0.5, 0.5), offset=(1.0, -1.0, 0.0)),
    ),
    appearance=Appearance(1, 3, 0.25),
)


# ---- the JSON format -------------------------------------------------------------------------
def test_edits_round_trip_through_json(tmp_path):
    path = tmp_path / "edits.json"
    path.write_text(EVERY_OP.to_json())
    assert load_edits(path) == EVERY_OP
    data = json.loads(path.read_text())
    assert data["ops"][2] == {"op": "copy_block", "block": 0, "to_block": 3}
    assert EVERY_OP.undo().ops == EVERY_OP.ops[:-1]
    assert EVERY_OP.showing(2).hidden_blocks() == [] and EVERY_OP.hidden_blocks() == [2]


@pytest.mark.parametrize(
    "text, names",
    [
        ("{not json", ["not valid JSON"]),
        ('{"ops": [{"op": "explode"}]}', ["ops[0]", "unknown op 'explode'"]),
        ('{"ops": [{"op": "remove_block"}]}', ["ops[0].block"]),
        ('{"ops": [{"op": "remove_block", "block": 0}, {"op": "remove_box", "min": [0, 0, 0], "max": [1, 0, 1]}]}',
         ["ops[1]", "'min'", "below 'max'"]),
        ('{"ops": [{"op": "copy_block", "block": 0, "to_block": 1, "offset": [1, 0, 0]}]}', ["exactly one"]),
        ('{"ops": [{"op": "copy_box", "min": [0, 0, 0], "max": [1, 1, 1], "offset": [1, "a", 0]}]}', ["ops[0].offset"]),
        ('{"appearance": {"image": 0, "t": 2}}', ["appearance.t"]),
        ('{"opps": []}', ["unknown key", "opps"]),
    ],
)
def test_bad_edits_files_name_the_file_and_the_entry(tmp_path, text, names):
    path = tmp_path / "my-edits.json"
    path.write_text(text)
    with pytest.raises(EditsError) as error:
        load_edits(path)
    for name in [str(path), *names]:
        assert name in str(error.value)


def test_a_missing_edits_file_is_named(tmp_path):
    with pytest.raises(EditsError, match="missing.json: cannot read"):
        load_edits(tmp_path / "missing.json")


# ---- the functional core ---------------------------------------------------------------------
def test_point_set_and_field_edits_describe_the_same_scene():
    """Every member of the edited point set, queried in the edited field, reads its original member."""
    gen = torch.Generator().manual_seed(0)
    means = torch.rand(500, 3, generator=gen, dtype=torch.float64) * 2 - 1
    edits = [
        BoxEdit.copy(torch.tensor([[-1.0, -1, -1], [0, 0, 1]]), torch.tensor([1.0, 1.0, 0.0])),
        BoxEdit.remove(torch.tensor([[0.2, -1, -1], [1, 0.3, 1]])),
        BoxEdit.copy(torch.tensor([[0.0, 0, -1], [1, 1, 0]]), torch.tensor([-1.0, 0.0, 1.0])),
    ]
    index, offset = edit_point_set(edits, means)
    members = means[index] + offset
    source, alive = edit_points(edits, members)
    assert alive.all()
    torch.testing.assert_close(source, means[index], atol=1e-12, rtol=0)
    assert index.shape[0] != means.shape[0]  # the edits did something
    # the removed box is empty except where the later copy lands ([-1, 0] x [0, 1] x [0, 1])
    removed = in_box(members, torch.tensor([[0.2, -1, -1], [1, 0.3, 1]]))
    assert not removed.any()


def test_copied_gaussians_belong_to_the_leaf_of_their_new_mean():
    gen = torch.Generator().manual_seed(1)
    means = torch.rand(200, 3, generator=gen) * 2 - 1
    tree = build_kdtree(means, 2)
    leaf_ids = assign_leaves(tree, means)
    n = means.shape[0]
    gaussians = Gaussians(means, torch.rand(n, 4), torch.rand(n, 3), torch.rand(n), torch.rand(n, 1, 3))
    edits = [BoxEdit.copy(torch.tensor([[-1.0, -1, -1], [0, 0, 0]]), torch.tensor([1.0, 1.0, 1.0]))]
    edited, leaves = edit_gaussians(gaussians, leaf_ids, edits, tree)
    assert edited.means.shape[0] > n - 40  # copies replace what was in the target box
    assert torch.equal(leaves, assign_leaves(tree, edited.means))


# ---- landmark-grid ---------------------------------------------------------------------------
def _render(model, camera, edits: LayoutEdits):
    apply_edits(model, edits)
    with torch.no_grad():
        return model.get_outputs_for_camera(copy.deepcopy(camera))


def _ray_hits_box(camera, box: torch.Tensor) -> torch.Tensor:
    """[H, W] whether each pixel's ray meets the box (slab test), i.e. the box's screen footprint."""
    rays = camera.generate_rays(camera_indices=0)
    o, d = rays.origins.double(), rays.directions.double()
    t0, t1 = (box[0] - o) / d, (box[1] - o) / d
    near = torch.minimum(t0, t1).amax(-1)
    far = torch.maximum(t0, t1).amin(-1)
    return (far > near.clamp_min(0))


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(-1) > CHANGED


def test_grid_removing_a_block_changes_pixels_only_where_the_block_is_seen():
    model = grid_model()
    camera = down_camera([0.1, 0.2, 1.5])
    before = _render(model, camera, LayoutEdits())["rgb"]
    after = _render(model, camera, LayoutEdits().push(RemoveBlock(0)))["rgb"]
    footprint = _ray_hits_box(camera, scene_layout(model).boxes()[0])
    assert 0.1 < footprint.float().mean() < 0.6  # the block fills part of the view
    changed = _changed(before, after)
    assert not changed[~footprint].any(), "pixels whose rays miss the removed block changed"
    assert changed[footprint].float().mean() > 0.9
    # a user box: the same rule
    box = torch.tensor([[0.2, -0.6, -0.2], [0.7, 0.1, 0.3]], dtype=torch.float64)
    boxed = _render(model, camera, LayoutEdits().push(RemoveBox(tuple(box[0].tolist()), tuple(box[1].tolist()))))["rgb"]
    footprint = _ray_hits_box(camera, box)
    changed = _changed(before, boxed)
    assert not changed[~footprint].any() and changed[footprint].float().mean() > 0.9


def test_grid_copied_block_renders_as_the_source_seen_from_a_moved_camera():
    """Scene = block 0 only.  Copy it onto block 3 and remove the source: the camera moved by the copy's
    offset sees exactly what the original camera saw of block 0 (every pixel)."""
    from nerfstudio.model_components.scene_colliders import NearFarCollider

    model = grid_model(background="black")  # 'last_sample' would read the field at different far points
    # fixed near / far: the box collider would start the translated camera's rays elsewhere
    model.collider = NearFarCollider(near_plane=0.5, far_plane=3.0)
    only_source = LayoutEdits(ops=tuple(RemoveBlock(b) for b in (1, 2, 3)))
    moved = only_source.push(CopyBlock(0, to_block=3)).push(RemoveBlock(0))
    boxes = scene_layout(model).boxes()
    offset = (boxes[3].mean(0) - boxes[0].mean(0)).float()
    camera = down_camera([-0.5, -0.4, 1.2])
    camera_moved = down_camera(torch.tensor([-0.5, -0.4, 1.2]) + offset)
    reference = _render(model, camera, only_source)
    copied = _render(model, camera_moved, moved)
    assert reference["accumulation"].max() > 0.3  # there is content to compare
    for key in ("rgb", "accumulation", "depth"):
        torch.testing.assert_close(copied[key], reference[key], atol=MOVED_RENDER_TOL, rtol=0)
    # without the copy the moved camera sees nothing
    assert _render(model, camera_moved, only_source.push(RemoveBlock(0)))["accumulation"].max() == 0


def test_grid_appearance_interpolation_ends_equal_each_images_render():
    model = grid_model()
    with torch.no_grad():
        model.field.embedding_appearance.embedding.weight.normal_()
    camera = down_camera([0.0, 0.0, 1.5])
    apply_edits(model, LayoutEdits())
    own = {}
    for image in (1, 3):
        model.field.eval_appearance_index = image  # the field's own per-image switch
        with torch.no_grad():
            own[image] = model.get_outputs_for_camera(copy.deepcopy(camera))["rgb"]
    model.field.eval_appearance_index = None
    assert _changed(own[1], own[3]).any()
    start = _render(model, camera, LayoutEdits(appearance=Appearance(1, 3, 0.0)))["rgb"]
    end = _render(model, camera, LayoutEdits(appearance=Appearance(1, 3, 1.0)))["rgb"]
    middle = _render(model, camera, LayoutEdits(appearance=Appearance(1, 3, 0.5)))["rgb"]
    torch.testing.assert_close(start, own[1], atol=0, rtol=0)
    torch.testing.assert_close(end, own[3], atol=0, rtol=0)
    assert _changed(middle, own[1]).any() and _changed(middle, own[3]).any()


def test_grid_edits_leave_parameters_and_training_alone():
    from landmark_plugin.grid.field import MultiBranchGridField

    model = grid_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    points = torch.rand(64, 3) * (GRID_AABB[1] - GRID_AABB[0]) + GRID_AABB[0]
    apply_edits(model, LayoutEdits(ops=(RemoveBlock(0), RemoveBlock(1), RemoveBlock(2), RemoveBlock(3))))
    field: MultiBranchGridField = model.field
    field.eval()
    assert torch.equal(field.edited_positions(points)[1], torch.zeros(64, dtype=torch.bool))
    field.train()  # training reads the trained scene, whatever the viewer shows
    assert field.edited_positions(points)[1] is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_grid_rejects_edits_that_do_not_fit_the_model():
    model = grid_model()
    with pytest.raises(EditsError, match=r"edits.json: ops\[0\].*block 4 does not exist.*4 blocks"):
        apply_edits(model, LayoutEdits(ops=(RemoveBlock(4),)), source="edits.json")
    with pytest.raises(EditsError, match="appearance.to_image 9 does not exist"):
        apply_edits(model, LayoutEdits(appearance=Appearance(0, 9, 0.5)))


# ---- retina-gs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retina():
    """A float64 retina-gs model of 300 random Gaussians in 4 leaves, and a camera looking at them."""
    from _retina_dist_helpers import make_cameras, make_model

    model = make_model(300, depth=2).eval()
    return model, make_cameras(2)[0:1]


def test_retina_hiding_a_leaf_changes_pixels_only_where_the_leaf_is_seen(retina):
    model, camera = retina
    before = _render(model, camera, LayoutEdits())
    after = _render(model, camera, LayoutEdits().push(RemoveBlock(1)))
    # the leaf's screen footprint: where a render of that leaf alone has any opacity
    alone = _render(model, camera, LayoutEdits(ops=tuple(RemoveBlock(b) for b in (0, 2, 3))))
    footprint = alone["accumulation"][..., 0] > 0
    assert 0.1 < footprint.double().mean() < 0.9
    changed = _changed(before["rgb"], after["rgb"])
    assert not changed[~footprint].any(), "pixels the hidden leaf does not reach changed"
    assert changed[alone["accumulation"][..., 0] > 0.05].double().mean() > 0.9
    apply_edits(model, LayoutEdits())
    assert model.num_points == 300  # render-time only


@pytest.mark.parametrize("mode, depth", [("plain", 0), ("clip", 2)])
def test_retina_copied_gaussians_render_as_the_source_seen_from_a_moved_camera(mode, depth):
    """Gaussians inside a box, copied by t with the source removed, seen from the camera moved by t,
    give the original render.  Plain mode with one leaf, and clip mode (which equals the unpartitioned
    render, so the copies' new leaves do not matter) with four."""
    from nerfstudio.data.scene_box import SceneBox

    from _retina_dist_helpers import make_cameras
    from landmark_plugin.gaussians.model import RetinaGSModelConfig

    gen = torch.Generator().manual_seed(1)
    points = torch.rand(80, 3, generator=gen) * 0.6 - 0.9  # all inside the source box below
    colours = (torch.rand(80, 3, generator=gen) * 255).to(torch.uint8)
    config = RetinaGSModelConfig(
        tree_depth=depth, mode=mode, sh_degree=1, background_color="white", num_downscales=0, backend="torch"
    )
    torch.manual_seed(0)
    model = config.setup(
        scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=2, seed_points=(points, colours)
    ).to(torch.float64).eval()
    with torch.no_grad():
        model.gauss_params["opacities"].fill_(2.0)  # opaque enough that occlusion order matters
    offset = (1.3, 0.4, 0.2)
    source = ((-0.95, -0.95, -0.95), (-0.25, -0.25, -0.25))
    camera = make_cameras(2)[0:1]
    moved_camera = copy.deepcopy(camera)
    moved_camera.camera_to_worlds[..., :3, 3] += torch.tensor(offset, dtype=torch.float64)
    reference = _render(model, camera, LayoutEdits())
    copied = _render(model, moved_camera, LayoutEdits(ops=(CopyBox(*source, offset=offset), RemoveBox(*source))))
    assert reference["accumulation"].max() > 0.9
    for key in ("rgb", "accumulation"):
        torch.testing.assert_close(copied[key], reference[key], atol=MOVED_RENDER_TOL, rtol=0)
    # the copy is what makes the moved view: without it the moved camera sees background only
    empty = _render(model, moved_camera, LayoutEdits(ops=(RemoveBox(*source),)))
    assert empty["accumulation"].max() == 0


def test_retina_without_bilateral_grids_has_no_appearance_edits_and_checks_leaves(retina):
    model, _ = retina
    with pytest.raises(EditsError, match="retina-gs model does not have.*use-bilateral-grid"):
        apply_edits(model, LayoutEdits(appearance=Appearance(0)), source="e.json")
    with pytest.raises(EditsError, match="leaf 7 does not exist; this model has 4 leaves"):
        apply_edits(model, LayoutEdits(ops=(CopyBlock(0, to_block=7),)))
