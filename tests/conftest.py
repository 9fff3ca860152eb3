"""Shared fixtures: a tiny synthetic city, its dataparser config, and ../shared/data access.

Heavy imports (nerfstudio, cv2) happen inside the fixtures, so collecting tests that do
not use them stays fast.
"""

from __future__ import annotations

import os

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_CITY = dict(blocks=(2, 2), num_images=10, width=96, height=72, num_points=400, test_every=5)
"""CityConfig fields of the tiny test scene: 8 train + 2 test images of 96x72, 400 points."""


def shared_data(name: str) -> Path:
    """Path of ../shared/data/<name>, or skip the calling test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the small real scenes in ../shared/data next to the repo")
    return path


def tiny_city_config():
    """The CityConfig of the tiny test scene."""
    from landmark_plugin.data.city import CityConfig

    return CityConfig(**TINY_CITY)


def synthetic_city_config(data: Path, **overrides):
    """A SyntheticCityDataParserConfig reading (or generating the tiny city into) `data`."""
    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig

    return SyntheticCityDataParserConfig(data=Path(data), city=tiny_city_config(), **overrides)


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory) -> Path:
    """Folder of a generated tiny synthetic city (nerfstudio-data format). Treat as read-only."""
    from landmark_plugin.data.city import write_city

    return write_city(tmp_path_factory.mktemp("tiny-city") / "city", tiny_city_config())


@pytest.fixture()
def tiny_city_dataparser(tiny_city):
    """SyntheticCityDataParserConfig for the session's tiny city."""
    return synthetic_city_config(tiny_city)


@pytest.fixture()
def tiny_city_copy(tiny_city, tmp_path) -> Path:
    """A private copy of the tiny city that a test may break."""
    return Path(shutil.copytree(tiny_city, tmp_path / "city"))


def gloo_world_sizes() -> list:
    """Process counts of the multi-process exactness tests (gloo): 2, 4 and 8 (issue 9's 8-process
    runs; the 8-process cases take ~2 min on 2 cores).  ``LANDMARK_GLOO_WORLDS=2,4`` narrows them."""
    return [int(w) for w in os.environ.get("LANDMARK_GLOO_WORLDS", "2,4,8").split(",") if w.strip()]
