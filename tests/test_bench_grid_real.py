"""scripts/bench_grid.py on the real COLMAP captures (cup, beer): scene selection and each method's recipe.

An end-to-end ``--smoke --scenes cup`` run takes about a minute on 2 idle CPU cores and minutes
under load (most of it evaluating 10 held-out images per method), so this checks what the real
scenes add instead: the colmap parser bench_gaussians.py uses for cup, the held-out images,
landmark-grid's scene box derived from the COLMAP points, and nerfacto left on its own recipe
(scene contraction, its collider and background).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_grid.py"
DATA_ROOTS = (REPO.parent / "shared" / "data", REPO / ".devcarry" / "data")
"""Where the captures may be: ../shared/data (cup), or the git-ignored .devcarry/data a device run carries."""
SPLITS = {"cup": (67, 10, 200, 150, "images_4"), "beer": (62, 9, 360, 640, "images_2")}
"""scene -> (train images, held-out images, width, height, image folder read)."""


def _bench():
    spec = importlib.util.spec_from_file_location("bench_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data_root(bench, scene: str) -> Path:
    folder = bench.REAL_SCENES[scene][0]
    for root in DATA_ROOTS:
        if (root / folder / "sparse" / "0").is_dir():
            return root
    pytest.skip(f"{folder} is in none of {[str(r) for r in DATA_ROOTS]} "
                "(benchmarks/REAL_SCENES.md says where it comes from)")


@pytest.mark.parametrize("scene", ["cup", "beer"])
def test_real_scene_parser_holds_out_every_eighth_image(scene, tmp_path):
    bench = _bench()
    root = _data_root(bench, scene)
    parser, description, overrides = bench.scene_setup(scene, tmp_path, root, None, smoke=False)
    assert (parser.colmap_path, parser.eval_mode, parser.eval_interval) == (Path("sparse/0"), "interval", 8)
    assert parser.load_3D_points  # landmark-grid's box comes from these points
    # nothing for nerfacto; landmark-grid: one vm block, the background in a contracted grid
    assert overrides == {"landmark-grid": {"field.mode": "vm", "field.blocks": (1, 1), "field.contraction": "linf"}}
    n_train, n_eval, width, height, folder = SPLITS[scene]
    outputs = parser.setup()
    train, held_out = outputs.get_dataparser_outputs("train"), outputs.get_dataparser_outputs("val")
    assert (len(train.image_filenames), len(held_out.image_filenames)) == (n_train, n_eval)
    assert f"{n_train} train / {n_eval} eval" in description and f"{width}x{height}" in description
    assert all(path.is_file() and path.parent.name == folder for path in held_out.image_filenames)
    assert (int(train.cameras.width[0]), int(train.cameras.height[0])) == (width, height)
    assert train.metadata["points3D_xyz"].shape[0] > 1000


def test_landmark_grid_box_derived_from_cup_points(tmp_path):
    from landmark_plugin.grid.datamanager import scene_bounds

    bench = _bench()
    parser, _, overrides = bench.scene_setup("cup", tmp_path, _data_root(bench, "cup"), None, smoke=False)
    config = bench.method_config("landmark-grid", parser, overrides, 100, tmp_path, smoke=True, rays=64)
    manager = config.pipeline.datamanager.setup(device="cpu", test_mode="val")
    outputs = manager.train_dataparser_outputs
    box = manager.train_dataset.scene_box.aabb
    expected = scene_bounds(
        torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]),  # the colmap parser's box, scene_scale 1
        points=outputs.metadata["points3D_xyz"],
        camera_centers=outputs.cameras.camera_to_worlds[:, :3, 3],
    )
    torch.testing.assert_close(box, expected)
    assert not torch.allclose(box, torch.tensor([[-1.0] * 3, [1.0] * 3]))  # from the points, not the cube
    assert manager.eval_dataset.scene_box.aabb.equal(box) and len(manager.eval_dataset) == 10


@pytest.mark.parametrize("method", ["nerfacto", "landmark-grid"])
def test_real_scene_keeps_each_methods_recipe(method, tmp_path):
    """Apart from the step count, ray batch and shared camera-optimizer mode, each model config is
    its registered one (landmark-grid: plus one vm block): nerfacto keeps its contraction and collider."""
    from nerfstudio.configs.method_configs import all_methods

    bench = _bench()
    parser, _, overrides = bench.scene_setup("cup", tmp_path, _data_root(bench, "cup"), None, smoke=False)
    model = bench.method_config(method, parser, overrides, 100, tmp_path, smoke=False, rays=4096).pipeline.model
    registered = copy.deepcopy(all_methods[method].pipeline.model)
    registered.camera_optimizer.mode = "off"
    if method == "landmark-grid":
        registered.field.mode, registered.field.blocks, registered.field.contraction = "vm", (1, 1), "linf"
    else:
        assert not model.disable_scene_contraction and model.background_color == "last_sample"
    assert model == registered


def test_scene_choices_and_data_root(tmp_path):
    bench = _bench()
    args = bench.parse_args(["--scenes", "cup", "beer", "--data-root", str(tmp_path), "--work", str(tmp_path / "w")])
    assert args.scenes == ["cup", "beer"] and args.data_root == tmp_path and args.camera_optimizer == "off"
    with pytest.raises(FileNotFoundError, match="beer_colmap"):
        bench.scene_setup("beer", tmp_path, tmp_path, None, smoke=False)
    with pytest.raises(SystemExit):
        bench.parse_args(["--scenes", "garden"])
