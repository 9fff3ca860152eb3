"""Camera batches for retina-gs: nerfstudio's full-image DataManager, checked, streamable and
loadable per rank.

Three ways to hold the images, chosen by ``cache_images``:
- ``device``: the images on the training device (fastest; small scenes);
- ``cpu``: the images in host memory (pinned when CUDA is present), copied per step;
- ``disk``: read when their camera comes up, with the next few read ahead on a thread pool and
  the most recent kept in a host-memory cache bounded by ``cache_budget_gb``.  Large captures
  (thousands of 1080p images) train this way.
``auto`` picks the first that fits ``cache_budget_gb``, counting only the images this process
holds.

With several ranks the pipeline calls ``load_only`` before any image is read: a rank then
holds (and reads from disk) only the images of the cameras it owns, never the whole capture.

The inputs are validated before anything is loaded (``CheckedInput``): a malformed
transforms.json / COLMAP model, a missing or unreadable image, a size that disagrees with the
intrinsics, a NaN pose or a NaN / empty point cloud stops with one error naming the file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Set, Type

import torch
from nerfstudio.data.datamanagers.full_images_datamanager import (
    FullImageDatamanager,
    FullImageDatamanagerConfig,
)
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.data.checked import CheckedDataset, CheckedInput
from landmark_plugin.errors import ConfigError

CacheMode = Literal["auto", "device", "cpu", "disk"]
Split = Literal["train", "eval"]


@dataclass
class RetinaGSDataManagerConfig(FullImageDatamanagerConfig):
    """Full images and cameras for retina-gs."""

    _target: Type = field(default_factory=lambda: RetinaGSDataManager)
    cache_images: CacheMode = "auto"  # type: ignore[assignment]
    """Where images live: device, cpu (host memory), disk (streamed), or auto (first that fits)."""
    cache_budget_gb: float = 4.0
    """auto: cache on the device / in host memory when this process's images take less than this.
    disk: the most recently read images kept in host memory, up to this much."""
    prefetch: int = 4
    """disk: images read ahead of the camera schedule."""


class RetinaGSDataManager(CheckedInput, FullImageDatamanager[CheckedDataset]):
    config: RetinaGSDataManagerConfig

    def __init__(self, config: RetinaGSDataManagerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.owned: Dict[str, Optional[List[int]]] = {"train": None, "eval": None}
        self.cache_mode = self._resolve_cache_mode()
        if self.cache_mode == "disk" and self._distorted():
            # nerfstudio undistorts while caching and rewrites the intrinsics then; a stream
            # would have to do the same per read.  Undistort once up front instead.
            raise ConfigError(
                f"{self.config.data}: streaming from disk needs undistorted images (these cameras have "
                "distortion parameters); undistort them first (e.g. COLMAP image_undistorter) or cache in memory"
            )
        CONSOLE.log(f"retina-gs: {len(self.train_dataset)} training images, cached on {self.cache_mode}")

    def _distorted(self) -> bool:
        distortion = self.train_dataset.cameras.distortion_params
        return distortion is not None and bool(torch.any(distortion != 0))

    def _resolve_cache_mode(self, indices: Optional[Sequence[int]] = None) -> Literal["device", "cpu", "disk"]:
        """The configured mode, or for ``auto`` the first that fits the budget with the images
        ``indices`` of the train split (all by default)."""
        mode = self.config.cache_images
        if mode == "gpu":  # nerfstudio's name for the same thing
            mode = "device"
        if mode != "auto":
            return mode  # type: ignore[return-value]
        cameras = self.train_dataset.cameras
        pixels = cameras.width * cameras.height
        if indices is not None:
            pixels = pixels[torch.as_tensor(list(indices), dtype=torch.long)]
        num_bytes = float(pixels.sum()) * 3
        num_bytes *= 4 if self.config.cache_images_type == "float32" else 1
        budget = self.config.cache_budget_gb * 2**30
        if num_bytes <= budget:
            return "device"
        return "cpu" if num_bytes <= 4 * budget else "disk"

    def load_only(self, train: Sequence[int], eval: Sequence[int]) -> None:
        """Hold only these images of each split (one rank's cameras); call before reading any.

        ``auto`` is re-resolved for the train images kept.  Reading another image raises
        ``KeyError``.  Distorted cameras keep every image: nerfstudio rewrites a camera's
        intrinsics when it undistorts its image, and every rank renders every camera, so each
        rank must undistort them all to agree on them (or undistort the capture beforehand).
        """
        if self._distorted():
            CONSOLE.log(
                "[yellow]retina-gs: these cameras have distortion parameters, so every rank loads every image "
                "(undistorting rewrites the intrinsics that all ranks must agree on); undistort the capture "
                "beforehand to load only each rank's images"
            )
            return
        for split, indices, dataset in (("train", train, self.train_dataset), ("eval", eval, self.eval_dataset)):
            kept = sorted({int(i) for i in indices})
            if kept and not 0 <= kept[0] <= kept[-1] < len(dataset):
                raise IndexError(f"{split} image indices must be in [0, {len(dataset)}), got {kept[0]}..{kept[-1]}")
            self.owned[split] = kept
            self.__dict__.pop(f"cached_{split}", None)  # drop what a cached_* property read before
        self.cache_mode = self._resolve_cache_mode(self.owned["train"])
        CONSOLE.log(
            f"retina-gs: this rank holds {len(self.owned['train'])} of {len(self.train_dataset)} training images, "
            f"cached on {self.cache_mode}"
        )

    def loaded_indices(self, split: Split = "train") -> List[int]:
        """Indices of the images of ``split`` this process has read so far (nothing is read
        before the first access to ``cached_train`` / ``cached_eval``)."""
        store = self.__dict__.get(f"cached_{split}")
        if store is None:
            return []
        if isinstance(store, ImageStore):
            return sorted(store.loaded)
        return list(range(len(store)))  # nerfstudio's list: every image

    def _load_images(self, split, cache_images_device):  # type: ignore[override]
        owned = self.owned[split]
        if self.cache_mode != "disk" and owned is None:
            pinned = self.cache_mode == "cpu" and torch.cuda.is_available()
            # nerfstudio's "gpu" path moves images to self.device (also right on a CPU-only run);
            # its "cpu" path pins memory, which needs CUDA.  It also undistorts.
            return super()._load_images(split, "cpu" if pinned else "gpu")
        dataset = self.train_dataset if split == "train" else self.eval_dataset
        if split == "train" and self.cache_mode == "device":
            self.train_cameras = self.train_dataset.cameras.to(self.device)
        return ImageStore(
            dataset,
            self.config.cache_images_type,
            owned,
            self.cache_mode,
            self.device,
            cache_bytes=int(self.config.cache_budget_gb * 2**30),
            prefetch=self.config.prefetch,
            workers=self.config.max_thread_workers or min(8, os.cpu_count() or 1),
        )

    def prefetch_train(self, indices: Sequence[int]) -> None:
        """Start reading these training images if they are streamed (no-op otherwise)."""
        store = self.__dict__.get("cached_train")
        if store is None and self.cache_mode == "disk":
            store = self.cached_train
        if isinstance(store, ImageStore):
            store.prefetch(indices)

    def get_train_rays_per_batch(self) -> int:
        cameras = self.train_dataset.cameras
        return int(cameras.width[0].item() * cameras.height[0].item())

    def next_train(self, step: int):
        upcoming = self.train_unseen_cameras[: self.config.prefetch]
        self.prefetch_train(upcoming[1:])
        if not hasattr(self, "train_cameras"):
            self.train_cameras = self.train_dataset.cameras.to(self.device)
        return super().next_train(step)


class ImageStore:
    """The images of one split this process holds, read-only, indexed like the dataset.

    ``indices`` (default: all) are the images this process may read; any other index raises
    ``KeyError``.  ``where``:
    - ``device`` / ``cpu``: every held image is read up front (on a thread pool) and kept on
      the device or in (pinned, with CUDA) host memory;
    - ``disk``: an image is read when asked for, or earlier through ``prefetch``; the most
      recently used stay in host memory up to ``cache_bytes``.
    """

    def __init__(
        self,
        dataset: InputDataset,
        image_type: str,
        indices: Optional[Sequence[int]],
        where: Literal["device", "cpu", "disk"],
        device: torch.device | str = "cpu",
        cache_bytes: int = 0,
        prefetch: int = 4,
        workers: int = 4,
    ):
        self.dataset = dataset
        self.image_type = image_type
        self.indices: List[int] = list(range(len(dataset))) if indices is None else sorted(indices)
        self._held: Set[int] = set(self.indices)
        self.where = where
        self.loaded: Set[int] = set()
        """Every index read from disk so far (tests and logs)."""
        self.cache_bytes = cache_bytes
        self.cache: "OrderedDict[int, Dict[str, torch.Tensor]]" = OrderedDict()
        self.pending: "OrderedDict[int, Future]" = OrderedDict()
        self.max_pending = max(1, prefetch)
        self._cached_bytes = 0
        if where == "disk":
            self.pool = ThreadPoolExecutor(max_workers=max(1, min(prefetch, workers)))
            return
        pinned = where == "cpu" and torch.cuda.is_available()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for idx, data in zip(self.indices, pool.map(self._read, self.indices)):
                for key, value in data.items():
                    if isinstance(value, torch.Tensor) and key != "image_idx":
                        data[key] = value.pin_memory() if pinned else value.to(device if where == "device" else "cpu")
                self.cache[idx] = data

    def __len__(self) -> int:
        return len(self.indices)

    def __contains__(self, idx: int) -> bool:
        return idx in self._held

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return (self[i] for i in self.indices)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        if idx not in self._held:
            raise KeyError(
                f"image {idx} is not held by this process (it holds {len(self.indices)} of {len(self.dataset)}): "
                "with several ranks only a camera's owner reads its image"
            )
        if self.where != "disk":
            return self.cache[idx]
        data = self.cache.pop(idx, None)
        if data is None:
            future = self.pending.pop(idx, None)
            data = future.result() if future is not None else self._read(idx)
            self._cached_bytes += _nbytes(data)
        self.cache[idx] = data  # most recently used last
        # Drop the least recently used beyond the budget (the image just asked for always stays).
        while len(self.cache) > 1 and self._cached_bytes > self.cache_bytes:
            _, dropped = self.cache.popitem(last=False)
            self._cached_bytes -= _nbytes(dropped)
        return data

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start reading the held images among ``indices`` that are neither cached nor pending."""
        if self.where != "disk":
            return
        for idx in indices:
            if idx in self._held and idx not in self.cache and idx not in self.pending:
                self.pending[idx] = self.pool.submit(self._read, idx)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    def cached_bytes(self) -> int:
        """Bytes of the images held in memory now (disk: the bounded cache)."""
        return sum(_nbytes(d) for d in self.cache.values())

    def _read(self, idx: int) -> Dict[str, torch.Tensor]:
        self.loaded.add(idx)
        return self.dataset.get_data(idx, image_type=self.image_type)  # type: ignore[arg-type]


def _nbytes(data: Dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in data.values() if isinstance(v, torch.Tensor))
