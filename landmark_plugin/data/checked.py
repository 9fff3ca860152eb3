"""Input validation inside nerfstudio's data managers, before anything is loaded.

nerfstudio's data managers set up the dataparser, parse the train split, then build the
datasets (the eval split is parsed in ``create_eval_dataset``) and start loading images.
``CheckedInput`` goes in front of such a data manager in the bases and adds, in that order:

1. ``check_parser_input`` on the files the parser will read (malformed transforms.json,
   COLMAP model, ...), so nerfstudio's own assertion never fires first with an unclear message;
2. a parser failure on the train or eval split re-raised as ``InputError`` naming the file;
3. ``check_outputs_of`` on every split's outputs (images, poses, point cloud) before the
   datasets exist, so no image is loaded and no device memory is touched.

With ``test_mode == "inference"`` (ns-render, ns-viewer) the image files are not required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs

from landmark_plugin.data.nerfstudio_data import without_open3d
from landmark_plugin.data.validate import (
    InputError,
    check_outputs_of,
    check_parser_input,
    is_parse_error,
    parse_failure,
    parse_split,
)


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
