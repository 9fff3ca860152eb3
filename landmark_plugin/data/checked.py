"""Input validation inside nerfstudio's data managers, before anything is loaded.

nerfstudio's data managers set up the dataparser, parse the train split, then build the
datasets (the eval split is parsed in ``create_eval_dataset``) and start loading images.
``CheckedInput`` goes in front of such a data manager in the bases and adds, in that order:

1. ``check_parser_input`` on the files the parser will read (malformed transforms.json,
   COLMAP model, ...), so nerfstudio's own assertion never fires first with an unclear message;
2. a parser failure on the train or eval split re-raised as ``InputError`` naming the file;
3. ``check_outputs_of`` on every split's outputs (images, poses, point cloud) before the
   datasets exist, so no image is loaded and no device memory is touched;
4. ``CheckedDataset`` (the data managers' dataset type): an image whose header reads but whose
   pixels do not decode (a truncated copy) is reported by name when it is first loaded, which
   for cached images is before the first step.

With ``test_mode == "inference"`` (ns-render, ns-viewer) the image files are not required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.data.nerfstudio_data import without_open3d
from landmark_plugin.data.validate import (
    InputError,
    check_outputs_of,
    check_parser_input,
    is_parse_error,
    parse_failure,
    parse_split,
)


COMMON_COLMAP_MODEL = Path("sparse/0")
"""Where COLMAP's own mapper (and most published captures) put the model; nerfstudio's default
colmap_path is ns-process-data's colmap/sparse/0."""


def find_colmap_model(config: Any) -> None:
    """A COLMAP config left at nerfstudio's default colmap_path that does not exist reads
    ``sparse/0`` instead when that holds the model (said on the console)."""
    if not isinstance(config, ColmapDataParserConfig) or config.data is None:
        return
    default = ColmapDataParserConfig.colmap_path
    if config.colmap_path != default or (config.data / default).is_dir():
        return
    if (config.data / COMMON_COLMAP_MODEL).is_dir():
        CONSOLE.print(f"COLMAP model: {config.data / default} does not exist; reading {config.data / COMMON_COLMAP_MODEL}")
        config.colmap_path = COMMON_COLMAP_MODEL


class CheckedInput:
    """Mixin for a nerfstudio DataManager (put it first in the bases): validated input."""

    config: Any
    dataparser: Any
    dataset_type: Any
    test_mode: str
    test_split: str
    train_dataparser_outputs: DataparserOutputs

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        if config.data is not None:  # what nerfstudio's __init__ does first
            config.dataparser.data = Path(config.data)
        config.dataparser = without_open3d(config.dataparser)  # nerfstudio's reads the point cloud with open3d
        find_colmap_model(config.dataparser)
        check_parser_input(config.dataparser)
        try:
            super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        except InputError:
            raise
        except Exception as error:
            # Until the train split is parsed, a failure is the parser's (setup or train split).
            if getattr(self, "train_dataparser_outputs", None) is None and is_parse_error(error):
                raise parse_failure(config.dataparser, error) from error
            raise

    def _check_split(self, outputs: DataparserOutputs, split: str) -> DataparserOutputs:
        return check_outputs_of(self.config.dataparser, outputs, split, images=self.test_mode != "inference")

    def create_train_dataset(self):
        self._check_split(self.train_dataparser_outputs, "train")
        return super().create_train_dataset()  # type: ignore[misc]

    def create_eval_dataset(self):
        outputs = parse_split(self.dataparser, self.config.dataparser, self.test_split)
        self._check_split(outputs, self.test_split)
        return self.dataset_type(dataparser_outputs=outputs, scale_factor=self.config.camera_res_scale_factor)


class CheckedDataset(InputDataset):
    """nerfstudio's InputDataset; an image that fails to decode raises InputError naming the file."""

    def get_numpy_image(self, image_idx: int) -> np.ndarray:
        try:
            return super().get_numpy_image(image_idx)
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
            path = self._dataparser_outputs.image_filenames[image_idx]
            raise InputError(
                f"{path}: cannot decode image ({error}): the file is damaged or truncated (an interrupted "
                "copy?); copy it again, or leave its frame out of the capture"
            ) from error
