"""Bad input through the methods' own data managers and trainers: one InputError naming the file,
raised while the data manager is built (before the model exists, before any device work), with
the pre-parse checks, nerfstudio's parser failures and the output checks all routed there.
Also: a world size the kd-tree cannot hold stops the trainer before anything is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from _trainers import micro_city, retina_config  # noqa: F401 (fixture)
from test_bad_input import colmap_config, colmap_folder

from landmark_plugin.data.validate import InputError


def retina_manager(config, test_mode="val"):
    from landmark_plugin.gaussians.datamanager import RetinaGSDataManagerConfig

    return RetinaGSDataManagerConfig(dataparser=config, cache_images_type="uint8").setup(device="cpu", test_mode=test_mode)


def grid_manager(config, test_mode="val"):
    from landmark_plugin.grid.datamanager import LandmarkGridDataManagerConfig

    return LandmarkGridDataManagerConfig(dataparser=config, train_num_rays_per_batch=64).setup(
        device="cpu", test_mode=test_mode
    )


MANAGERS = {"retina-gs": retina_manager, "landmark-grid": grid_manager}


def nerfstudio_data(folder: Path):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    return NerfstudioDataParserConfig(data=folder)


def break_json(folder: Path) -> Path:
    path = folder / "transforms.json"
    path.write_text(path.read_text()[:300])
    return path


def drop_pose(folder: Path) -> Path:
    # nerfstudio's parser would stop on a bare KeyError('transform_matrix')
    path = folder / "transforms.json"
    meta = json.loads(path.read_text())
    del meta["frames"][3]["transform_matrix"]
    path.write_text(json.dumps(meta))
    return path


def remove_first_image(folder: Path) -> Path:
    # nerfstudio's parser opens the first image itself (auto downscale) and fails there
    path = folder / "images" / "frame_00000.png"
    path.unlink()
    return path


def shrink_eval_image(folder: Path) -> Path:
    # only the eval split's output check sees it
    name = json.loads((folder / "transforms.json").read_text())["test_filenames"][0]
    cv2.imwrite(str(folder / name), np.zeros((10, 12, 3), np.uint8))
    return folder / name


BREAKS = {"malformed-json": break_json, "frame-without-pose": drop_pose,
          "first-image-missing": remove_first_image, "eval-image-size": shrink_eval_image}  # fmt: skip


@pytest.fixture()
def city_copy(micro_city, tmp_path) -> Path:
    return Path(shutil.copytree(micro_city, tmp_path / "city"))


@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize("broken", BREAKS)
def test_data_manager_names_the_broken_file(city_copy, manager, broken):
    path = BREAKS[broken](city_copy)
    with pytest.raises(InputError) as caught:
        MANAGERS[manager](nerfstudio_data(city_copy))
    assert str(path) in str(caught.value), caught.value


@pytest.mark.parametrize("manager", MANAGERS)
def test_data_manager_names_an_unreadable_colmap_file(tmp_path, manager):
    root = colmap_folder(tmp_path / "scene")
    model = root / "sparse" / "0"
    (model / "images.bin").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00garbage")
    (model / "points3D.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(InputError, match="unreadable COLMAP file") as caught:
        MANAGERS[manager](colmap_config(root))
    assert str(model / "images.bin") in str(caught.value)


@pytest.mark.parametrize("manager", MANAGERS)
def test_inference_needs_the_cameras_not_the_images(city_copy, manager):
    """ns-render / ns-viewer build the data manager in inference mode: images may be absent."""
    name = json.loads((city_copy / "transforms.json").read_text())["train_filenames"][2]
    (city_copy / name).unlink()
    MANAGERS[manager](nerfstudio_data(city_copy), test_mode="inference")
    with pytest.raises(InputError, match="image file not found"):
        MANAGERS[manager](nerfstudio_data(city_copy))


def test_trainer_stops_on_bad_input_before_the_model_exists(city_copy, tmp_path):
    path = drop_pose(city_copy)
    config = retina_config(city_copy, tmp_path / "out", 2)
    config.pipeline.datamanager.dataparser = nerfstudio_data(city_copy)
    trainer = config.setup(local_rank=0, world_size=1)
    with pytest.raises(InputError, match="transform_matrix") as caught:
        trainer.setup()
    assert str(path) in str(caught.value)
    assert not hasattr(trainer, "pipeline"), "the error must come before the pipeline (model, device) exists"


@pytest.mark.parametrize("world_size, depth", [(5, 2), (3, 1), (16, 3)])
def test_world_size_larger_than_the_tree_stops_before_setup(micro_city, tmp_path, world_size, depth):
    config = retina_config(micro_city, tmp_path / "out", 2, tree_depth=depth)
    trainer = config.setup(local_rank=0, world_size=world_size)
    need = (world_size - 1).bit_length()
    with pytest.raises(ValueError, match=rf"{world_size} ranks .*tree-depth {depth} gives only {2**depth} leaves") as caught:
        trainer.setup()
    assert f"--pipeline.model.tree-depth {need} or more" in str(caught.value)
    assert not hasattr(trainer, "pipeline")


def test_world_size_that_fits_the_tree_passes():
    from landmark_plugin.method_configs.retina_gs import retina_gs
    from landmark_plugin.config_checks import check_world_size_fits_tree

    for world_size in (1, 3, 4):  # retina-gs: depth 2, 4 leaves
        check_world_size_fits_tree(retina_gs.config, world_size)
