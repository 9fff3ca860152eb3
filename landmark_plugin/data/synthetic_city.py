"""`synthetic-city` dataparser: nerfstudio-data on a procedural city it generates on first use."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Type


from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.data.city import CityConfig, write_city
from landmark_plugin.data.nerfstudio_data import PlyNerfstudio, PlyNerfstudioDataParserConfig
from landmark_plugin.data.validate import InputError, check_transforms_json, input_errors, transforms_path

SMALL_CITY = CityConfig()
"""The default scene: 3x3 blocks of 2x2 lots, 48 images of 160x120, 4000 points."""


def ensure_city(data: Path, city: CityConfig) -> Path:
    """Path of `data`'s transforms.json, generating the city there first if it is missing.

    Safe when several processes (ranks) start at once: each renders into its own
    temporary folder and renames it into place; the first rename wins and the rest are
    discarded (they are byte-identical anyway).
    """
    transforms = transforms_path(data)
    if transforms.exists():
        _warn_if_other_city(transforms, city)
        return transforms
    folder = transforms.parent
    if folder.exists() and any(folder.iterdir()) and not transforms.exists():  # (another rank may just have won)
        raise InputError(f"{folder}: has no transforms.json and is not empty; refusing to generate a city into it")
    if transforms.exists():
        return transforms
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.parent / f".{folder.name}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    CONSOLE.log(f"[bold]synthetic-city[/bold]: generating {city.num_images} images into {folder}")
    write_city(scratch, city)
    if transforms.name != "transforms.json":
        (scratch / "transforms.json").rename(scratch / transforms.name)
    try:
        os.rename(scratch, folder)  # atomic; replaces an empty folder
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not transforms.exists():
            raise
    return transforms


def _warn_if_other_city(transforms: Path, city: CityConfig) -> None:
    """Say so when an explicitly chosen (non-default) city is not the one on disk."""
    if city == SMALL_CITY:
        return
    try:
        recorded = json.loads(transforms.read_text()).get("synthetic_city")
    except (OSError, ValueError, AttributeError):
        return  # the parser's own checks will report a broken file
    if not isinstance(recorded, dict):
        return
    # a city written before an option existed was written with its default
    recorded = {**json.loads(json.dumps(asdict(CityConfig()))), **recorded}
    if recorded != json.loads(json.dumps(asdict(city))):
        CONSOLE.log(f"[yellow]{transforms} was generated with other city settings; using it as it is")


@dataclass
class SyntheticCityDataParserConfig(PlyNerfstudioDataParserConfig):
    """A procedural city, generated into `data` if it holds no transforms.json yet, then read as nerfstudio-data."""

    _target: Type = field(default_factory=lambda: SyntheticCity)
    """target class to instantiate"""
    data: Path = Path("data/synthetic-city")
    """Folder of the dataset (or its transforms.json); the city is generated there if missing."""
    city: CityConfig = field(default_factory=lambda: SMALL_CITY)
    """Scene to generate when `data` is empty; ignored (with a warning if different) once it exists."""
    orientation_method: Literal["pca", "up", "vertical", "none"] = "none"
    """The generator's world is already z-up with streets on the x and y axes, so keep it."""
    center_method: Literal["poses", "focus", "none"] = "none"
    """The generator centres the city on the origin, so keep it (ground stays at z = 0)."""
    eval_mode: Literal["fraction", "filename", "interval", "all"] = "filename"
    """Only used if transforms.json lacks the train/val/test filename lists the generator writes."""
    load_3D_points: bool = True
    """Load sparse_pc.ply, the points sampled on the city's surfaces (Gaussian initialisation)."""


class SyntheticCity(PlyNerfstudio):
    """Generates the city if needed, validates transforms.json, then parses it like nerfstudio-data
    (the point cloud read without open3d)."""

    config: SyntheticCityDataParserConfig
    checks_own_input = True
    """`parse_checked` must not look for transforms.json before this parser has generated it."""

    def _generate_dataparser_outputs(self, split: str = "train") -> DataparserOutputs:
        transforms = ensure_city(self.config.data, self.config.city)
        check_transforms_json(transforms, self.config)
        with input_errors(transforms):
            return super()._generate_dataparser_outputs(split)
