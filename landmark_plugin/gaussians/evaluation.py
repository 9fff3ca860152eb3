"""retina-gs's image metrics over many views, the same code for one rank and several.

Both averages render collectively (every rank its parts of each camera) and score a view on the
rank that composites it; the per-view metrics are gathered on every rank and averaged, so every
rank returns the same dict (ns-eval and the trainer's eval log read rank 0's).  Render times are
taken after the device finished (a CUDA synchronisation), so ``fps`` is the render rate.
"""

from __future__ import annotations

from pathlib import Path
from time import perf_counter
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torchvision.utils as vutils
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from landmark_plugin.core.schedule import image_owner
from landmark_plugin.distributed.collectives import all_gather_objects

Row = Tuple[int, Dict[str, float]]


def average_eval_metrics(pipeline, output_path: Optional[Path], get_std: bool) -> Dict[str, float]:
    """Every eval image once: owners round robin over ranks, ``batch_size`` cameras per render."""
    dataset = pipeline.datamanager.eval_dataset
    num, chunk = len(dataset), pipeline.batch_size
    mine: List[Row] = []
    with _progress(pipeline, num, "Evaluating all eval images") as advance:
        for first in range(0, num, chunk):
            indices = list(range(first, min(first + chunk, num)))
            cameras = pipeline._eval_cameras(indices)
            owners = torch.tensor([image_owner(i, pipeline.world_size) for i in indices], dtype=torch.int64)
            seconds, outputs = _timed(pipeline, lambda: pipeline._render_for_owners(cameras, owners))
            for b, out in outputs.items():
                mine.append((indices[b], _score(pipeline, out, pipeline._eval_data(indices[b]), "eval", indices[b], output_path,
                                               seconds / len(indices))))
            advance(len(indices))
    return _averaged(all_gather_objects(pipeline.comm, mine, "eval metrics"), get_std)


def average_loader_metrics(pipeline, data_loader: Iterable, image_prefix: str, output_path: Optional[Path],
                           get_std: bool) -> Dict[str, float]:
    """nerfstudio's ``get_average_image_metrics``: every (camera, batch) of ``data_loader``,
    which every rank iterates in the same order; rank 0 composites and scores."""
    mine: List[Row] = []
    total = len(data_loader) if hasattr(data_loader, "__len__") else None
    with _progress(pipeline, total, f"Evaluating all {image_prefix} images") as advance:
        for index, (camera, batch) in enumerate(data_loader):
            seconds, out = _timed(pipeline, lambda: pipeline.model.frame.render_camera(camera, to_every_rank=False))
            if out is not None:
                batch = {k: v.to(pipeline.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                mine.append((index, _score(pipeline, out, batch, image_prefix, index, output_path, seconds)))
            advance(1)
    return _averaged(all_gather_objects(pipeline.comm, mine, f"{image_prefix} metrics"), get_std)


def _timed(pipeline, render):
    """(seconds, result) of a render, the device's work included."""
    start = perf_counter()
    with torch.no_grad():
        result = render()
    if torch.device(pipeline.device).type == "cuda":
        torch.cuda.synchronize()
    return perf_counter() - start, result


def _score(pipeline, out, batch, prefix: str, index: int, output_path: Optional[Path], seconds: float) -> Dict[str, float]:
    metrics, images = pipeline.model.get_image_metrics_and_images(out, batch)
    if output_path is not None:
        output_path.mkdir(exist_ok=True, parents=True)
        for key, image in images.items():
            vutils.save_image(image.permute(2, 0, 1).cpu(), output_path / f"{prefix}_{key}_{index:04d}.png")
    metrics = {k: float(v) for k, v in metrics.items()}
    height, width = out["rgb"].shape[:2]
    metrics["num_rays_per_sec"] = height * width / max(seconds, 1e-9)
    metrics["fps"] = 1.0 / max(seconds, 1e-9)
    return metrics


def _averaged(parts: List[List[Row]], get_std: bool) -> Dict[str, float]:
    rows = sorted(row for part in parts for row in part)
    result: Dict[str, float] = {}
    for key in rows[0][1]:
        values = torch.tensor([m[key] for _, m in rows], dtype=torch.float64)
        if get_std:
            std, mean = torch.std_mean(values)
            result[key], result[f"{key}_std"] = float(mean), float(std)
        else:
            result[key] = float(values.mean())
    return result


class _progress:
    """A rich progress bar on rank 0 (as nerfstudio's evaluation shows); a no-op elsewhere."""

    def __init__(self, pipeline, total: Optional[int], what: str):
        self.bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                            MofNCompleteColumn(), transient=True) if pipeline.comm.is_main else None
        self.total, self.what = total, what

    def __enter__(self):
        if self.bar is None:
            return lambda n: None
        self.bar.__enter__()
        task = self.bar.add_task(f"[green]{self.what}...", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
