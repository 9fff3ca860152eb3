"""Tiny CPU trainers of both methods for the reliability tests (resume, NaN steps, kills)."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch

NEVER = 10**9
MICRO_CITY = dict(blocks=(2, 2), num_images=10, width=48, height=36, num_points=400, test_every=5)
"""The tiny city at a quarter of its pixels (8 train + 2 test images of 48x36): retina-gs steps on
the torch rasteriser cost a fraction of a second, so tests can afford a dozen of them."""


@pytest.fixture(scope="session")
def micro_city(tmp_path_factory) -> Path:
    """Folder of the micro city (nerfstudio-data). Treat as read-only."""
    from landmark_plugin.data.city import CityConfig, write_city

    return write_city(tmp_path_factory.mktemp("micro-city") / "city", CityConfig(**MICRO_CITY))


def retina_config(data: Path, out: Path, steps: int, **model_overrides):
    """retina-gs-small on the tiny city: no viewer, no eval, refinement every 3 steps from step 3."""
    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig
    from landmark_plugin.method_configs.retina_gs import retina_gs_small

    config = copy.deepcopy(retina_gs_small.config)
    config.pipeline.datamanager.dataparser = SyntheticCityDataParserConfig(data=data)
    config.pipeline.datamanager.data = data
    model = config.pipeline.model
    model.warmup_length, model.refine_every = 2, 3
    for key, value in model_overrides.items():
        setattr(model, key, value)
    return _common(config, out, steps)


def grid_config(data: Path, out: Path, steps: int):
    """landmark-grid with tiny grids and ray batches on the tiny city (its grids grow at steps 0 and 1)."""
    from landmark_plugin.method_configs.landmark_grid import landmark_grid_config

    config = landmark_grid_config(max_steps=steps)
    config.pipeline.datamanager.data = data
    datamanager = config.pipeline.datamanager
    datamanager.train_num_rays_per_batch = datamanager.eval_num_rays_per_batch = 64
    model = config.pipeline.model
    model.field.cells = 8
    model.proposal_cells = (4, 8)
    model.num_proposal_samples_per_ray = (16, 8)
    model.num_nerf_samples_per_ray = 8
    model.eval_num_rays_per_chunk = 4096
    return _common(config, out, steps)


def _common(config, out: Path, steps: int):
    config.machine.device_type = "cpu"
    config.max_num_iterations = steps
    config.output_dir = out
    config.vis = "tensorboard"
    config.steps_per_eval_image = config.steps_per_eval_batch = config.steps_per_eval_all_images = NEVER
    config.steps_per_save = NEVER
    config.deterministic = True
    config.set_timestamp()
    return config


def setup_trainer(config):
    """Seed as ns-train's train_loop does (--machine.seed: python, numpy, torch), then set up."""
    random.seed(config.machine.seed)
    np.random.seed(config.machine.seed)
    torch.manual_seed(config.machine.seed)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def model_state(trainer) -> dict:
    """Every parameter and buffer of the model, cloned."""
    return {k: v.detach().clone() for k, v in trainer.pipeline.model.state_dict().items()}
