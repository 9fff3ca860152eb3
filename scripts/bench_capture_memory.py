#!/usr/bin/env python
"""Host memory that offload's store costs when it takes over a shard (issue 18): ``--count``
Gaussians are made in host memory (as bench_offload makes them), then ``offload stream`` starts
(``OffloadStore.begin_stream``, the capture).  Printed: the store's size, the peak host memory the
capture added, and their ratio.  The shard exists once in the store, so the ideal ratio is what
the store allocates anew: the Adam moments (zeros until a step makes them), 2/3 of it.

    python scripts/bench_capture_memory.py --count 4e6          # CPU; run it on two commits to compare

Runs on the CPU (the capture is host work; on CUDA the Gaussians would start on the GPU).
"""

from __future__ import annotations

import argparse
import copy
import gc
import resource
import tempfile
from pathlib import Path

import psutil
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=float, default=4e6, help="Gaussians of the shard")
    parser.add_argument("--sh-degree", type=int, default=3)
    args = parser.parse_args()
    from nerfstudio.engine.optimizers import Optimizers

    from landmark_plugin.data.city import CityConfig, write_city
    from landmark_plugin.data.synthetic_city import SyntheticCityDataParserConfig
    from landmark_plugin.gaussians.offload import offload_store
    from landmark_plugin.method_configs.retina_gs import gaussian_optimizers, retina_gs_small

    work = Path(tempfile.mkdtemp(prefix="capture-memory-"))
    data = write_city(work / "city", CityConfig(blocks=(2, 2), num_images=4, width=48, height=36, num_points=400))
    config = copy.deepcopy(retina_gs_small.config)
    config.pipeline.datamanager.dataparser = SyntheticCityDataParserConfig(data=data)
    config.pipeline.datamanager.data = data
    config.machine.device_type, config.vis, config.output_dir = "cpu", "tensorboard", work / "out"
    model_config = config.pipeline.model
    model_config.visible_adam, model_config.offload, model_config.tree_depth = True, "stream", 3
    model_config.sh_degree = args.sh_degree
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model = trainer.pipeline.model
    n, bases = int(args.count), (args.sh_degree + 1) ** 2
    params = {"means": torch.randn(n, 3), "scales": torch.randn(n, 3) - 4, "quats": torch.randn(n, 4),
              "features_dc": torch.randn(n, 3), "features_rest": torch.zeros(n, bases - 1, 3), "opacities": torch.zeros(n, 1)}
    model.gauss_params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()})
    del params
    model.refresh_ownership()
    model.strategy_state = model.strategy.initialize_state(scene_scale=1.0)
    model.optimizers = Optimizers(gaussian_optimizers(10**6), trainer.pipeline.get_param_groups()).optimizers
    gc.collect()
    shard = sum(p.numel() * p.element_size() for p in model.gauss_params.values())
    before = psutil.Process().memory_info().rss
    store = offload_store(model)
    store.begin_stream()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    stored = store.rows.numel() * store.rows.element_size()
    print(f"{n:,} Gaussians, SH degree {args.sh_degree}: parameters {shard / 1e9:.2f} GB, store {stored / 1e9:.2f} GB; "
          f"the capture added {(peak - before) / 1e9:.2f} GB of host memory = {(peak - before) / stored:.2f}x the store")


if __name__ == "__main__":
    main()
