"""Camera batches for retina-gs: nerfstudio's full-image DataManager, checked and streamable.

Three ways to hold the images, chosen by ``cache_images``:
- ``device``: all images on the training device (fastest; small scenes);
- ``cpu``: all images in host memory (pinned when CUDA is present), copied per step;
- ``disk``: nothing cached; each image is read when its camera comes up, with the next few
  read ahead on a thread pool.  Large captures (thousands of 1080p images) train this way.
``auto`` picks the first that fits ``cache_budget_gb``.

The inputs are validated before anything is loaded (``CheckedInput``): a malformed
transforms.json / COLMAP model, a missing or unreadable image, a size that disagrees with the
intrinsics, a NaN pose or a NaN / empty point cloud stops with one error naming the file.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Type

import torch
from nerfstudio.data.datamanagers.full_images_datamanager import (
    FullImageDatamanager,
    FullImageDatamanagerConfig,
)
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.data.checked import CheckedInput

CacheMode = Literal["auto", "device", "cpu", "disk"]


@dataclass
class RetinaGSDataManagerConfig(FullImageDatamanagerConfig):
    """Full images and cameras for retina-gs."""

    _target: Type = field(default_factory=lambda: RetinaGSDataManager)
    cache_images: CacheMode = "auto"  # type: ignore[assignment]
    """Where images live: device, cpu (host memory), disk (streamed), or auto (first that fits)."""
    cache_budget_gb: float = 4.0
    """auto: cache on the device / in host memory when the split's images take less than this."""
    prefetch: int = 4
    """disk: images read ahead of the camera schedule."""


class RetinaGSDataManager(CheckedInput, FullImageDatamanager[InputDataset]):
    config: RetinaGSDataManagerConfig

    def __init__(self, config: RetinaGSDataManagerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.cache_mode = self._resolve_cache_mode()
        distortion = self.train_dataset.cameras.distortion_params
        if self.cache_mode == "disk" and distortion is not None and bool(torch.any(distortion != 0)):
            # nerfstudio undistorts while caching and rewrites the intrinsics then; a stream
            # would have to do the same per read.  Undistort once up front instead.
            raise ValueError(
                f"{self.config.data}: streaming from disk needs undistorted images (these cameras have "
                "distortion parameters); undistort them first (e.g. COLMAP image_undistorter) or cache in memory"
            )
        CONSOLE.log(f"retina-gs: {len(self.train_dataset)} training images, cached on {self.cache_mode}")

    def _resolve_cache_mode(self) -> Literal["device", "cpu", "disk"]:
        mode = self.config.cache_images
        if mode == "gpu":  # nerfstudio's name for the same thing
            mode = "device"
        if mode != "auto":
            return mode  # type: ignore[return-value]
        cameras = self.train_dataset.cameras
        num_bytes = float((cameras.width * cameras.height).sum()) * 3
        num_bytes *= 4 if self.config.cache_images_type == "float32" else 1
        budget = self.config.cache_budget_gb * 2**30
        if num_bytes <= budget:
            return "device"
        return "cpu" if num_bytes <= 4 * budget else "disk"

    def _load_images(self, split, cache_images_device):  # type: ignore[override]
        if self.cache_mode == "disk":
            dataset = self.train_dataset if split == "train" else self.eval_dataset
            return StreamedImages(dataset, self.config.cache_images_type, self.config.prefetch)
        pinned = self.cache_mode == "cpu" and torch.cuda.is_available()
        # nerfstudio's "gpu" path moves images to self.device (also right on a CPU-only run);
        # its "cpu" path pins memory, which needs CUDA.
        return super()._load_images(split, "cpu" if pinned else "gpu")

    def get_train_rays_per_batch(self) -> int:
        cameras = self.train_dataset.cameras
        return int(cameras.width[0].item() * cameras.height[0].item())

    def next_train(self, step: int):
        upcoming = self.train_unseen_cameras[: self.config.prefetch]
        if isinstance(self.cached_train, StreamedImages):
            self.cached_train.prefetch(upcoming[1:])
        if not hasattr(self, "train_cameras"):
            self.train_cameras = self.train_dataset.cameras.to(self.device)
        return super().next_train(step)


class StreamedImages:
    """A read-only list of image dicts that reads each from disk on access, with read-ahead."""

    def __init__(self, dataset: InputDataset, image_type: str, prefetch: int):
        self.dataset = dataset
        self.image_type = image_type
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(prefetch, 4)))
        self.pending: "OrderedDict[int, Future]" = OrderedDict()
        self.max_pending = max(1, prefetch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        future = self.pending.pop(idx, None)
        return future.result() if future is not None else self._read(idx)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def prefetch(self, indices: List[int]) -> None:
        for idx in indices:
            if idx not in self.pending:
                self.pending[idx] = self.pool.submit(self._read, idx)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    def _read(self, idx: int) -> Dict[str, torch.Tensor]:
        data = self.dataset.get_data(idx, image_type=self.image_type)  # type: ignore[arg-type]
        return data
