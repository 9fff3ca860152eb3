"""The out-of-core side of ``RetinaGSModel`` (``--pipeline.model.offload``): what the pipeline and the
frame ask the model for, delegated to its ``OffloadStore`` (``gaussians/offload.py``)."""

from __future__ import annotations

from nerfstudio.cameras.cameras import Cameras

from landmark_plugin.gaussians.offload import offload_store


class OutOfCore:
    """Mixed into ``RetinaGSModel``: staging, prefetching and holding leaves with offload."""

    def stage_leaves(self, cameras: Cameras) -> None:
        """With offload: hold only the leaves these cameras can draw."""
        store = offload_store(self)
        if store is not None and store.stream is not None:
            store.begin_stream()  # the frame streams the leaves itself
        elif store is not None:
            store.stage(self._views(cameras))

    def prefetch_leaves(self, cameras: Cameras) -> None:
        """With offload host: ``OffloadStore.prefetch`` of the next batch's cameras."""
        store = self.offload_store
        if store is not None and store.staged:
            store.prefetch(self._views(cameras))

    def step_streamed_(self) -> bool:
        """With offload stream: ``LeafStream.backward_step_``; True when the Gaussians were stepped so."""
        store = self.offload_store
        return store is not None and store.stream is not None and store.stream.backward_step_(self.step)

    def _views(self, cameras: Cameras) -> list:
        return [self.frame.view(cameras[i : i + 1]) for i in range(len(cameras))]

    @property
    def total_points(self) -> int:
        """This rank's Gaussians, those an offload store keeps in host memory included."""
        store = self.offload_store
        return int(store.rows.shape[0]) if store is not None and store.staged else self.num_points

    def hold_every_row(self, on_host: bool = False) -> None:
        """With offload: hold every Gaussian of this rank again, on the device or (``on_host``) the host."""
        if self.offload_store is not None:
            self.offload_store.materialize(on_host)

    def stage_for_render(self, cameras: Cameras) -> None:
        """With offload, outside training: hold the leaves these cameras can draw, or every
        Gaussian when layout edits or a crop box decide what is drawn (an edit can move a
        Gaussian into view from a leaf the cull would leave behind)."""
        if self.offload_store is None and self.config.offload == "none":
            return
        if self.layout_edits or self.crop_box is not None:
            self.hold_every_row()
        else:
            self.stage_leaves(cameras)
