"""nerfstudio's Trainer with the guarantees long runs need: atomic checkpoints, safe resume,
and a viewer bound to localhost.

Everything else (loop, logging, eval, viewer) is nerfstudio's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Type

import torch

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.callbacks import TrainingCallbackLocation
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.checkpoints import atomic_torch_save

CHECKPOINT_NAME = re.compile(r"^step-(\d{9})\.ckpt$")


def latest_complete_step(checkpoint_dir: Path) -> Optional[int]:
    """Step of the newest complete checkpoint in ``checkpoint_dir`` (temp files ignored)."""
    steps = [int(m.group(1)) for p in Path(checkpoint_dir).iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return max(steps) if steps else None


@dataclass
class LandmarkTrainerConfig(TrainerConfig):
    """TrainerConfig for landmark_plugin's methods."""

    _target: Type = field(default_factory=lambda: LandmarkTrainer)
    schedules_follow_max_iterations: bool = True
    """Stretch every decaying learning-rate schedule to end at --max-num-iterations, so a
    shorter or longer run keeps the schedule's shape."""
    viewer: ViewerConfig = field(default_factory=lambda: ViewerConfig(websocket_host="127.0.0.1"))
    """Viewer settings. Bound to 127.0.0.1 by default: reach it from another machine through an
    SSH tunnel (ssh -L 7007:127.0.0.1:7007 host) or pass --viewer.websocket-host 0.0.0.0 knowingly."""


class LandmarkTrainer(Trainer):
    """Trainer whose checkpoints are written atomically (temp file, fsync, rename)."""

    config: LandmarkTrainerConfig

    def checkpoint_state(self, step: int) -> dict:
        """Everything a resume needs, in nerfstudio's checkpoint layout."""
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        return {
            "step": step,
            "pipeline": pipeline.state_dict(),  # type: ignore[union-attr]
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }

    def run_steps(self, first_step: int, num_steps: int, after_step: Optional[Callable[[int], None]] = None) -> List[float]:
        """Train ``num_steps`` steps exactly as ``train()`` does (callbacks included), without
        its logging, viewer, eval and checkpoint side jobs; returns the losses.  Benchmarks and
        tests drive training through this."""
        losses = []
        for step in range(first_step, first_step + num_steps):
            self.pipeline.train()
            for callback in self.callbacks:
                callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
            loss, _, _ = self.train_iteration(step)
            for callback in self.callbacks:
                callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
            losses.append(float(loss))
            if after_step is not None:
                after_step(step)
        return losses

    def setup_optimizers(self):
        if self.config.schedules_follow_max_iterations:
            for group in self.config.optimizers.values():
                scheduler = group.get("scheduler")
                if scheduler is not None and hasattr(scheduler, "max_steps"):
                    scheduler.max_steps = self.config.max_num_iterations
        return super().setup_optimizers()

    def save_checkpoint(self, step: int) -> None:
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        atomic_torch_save(self.checkpoint_state(step), ckpt_path)
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("step-*.ckpt"):
                if old != ckpt_path:
                    old.unlink()

    def _load_checkpoint(self) -> None:
        # nerfstudio parses every file name in load_dir as a step; a temp file left by a killed
        # write would crash it.  Resolve the newest complete checkpoint ourselves.
        if self.config.load_dir is not None and self.config.load_step is None:
            step = latest_complete_step(self.config.load_dir)
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint (step-*.ckpt) in {self.config.load_dir}")
            self.config.load_step = step
            CONSOLE.print(f"Resuming from {self.config.load_dir / f'step-{step:09d}.ckpt'}")
        super()._load_checkpoint()
        self._rebind_optimizers()

    def _rebind_optimizers(self) -> None:
        """Point every optimiser at the model's current parameter tensors.

        Models whose parameters change size (Gaussians after densification) allocate new
        tensors when a checkpoint is loaded, but the optimisers were built before the load and
        still hold the old ones, with the loaded Adam state keyed by them: the first
        densification then indexes past their end.  Move each group's state to the new tensors.
        """
        current = self.pipeline.get_param_groups()
        for name, optimizer in self.optimizers.optimizers.items():
            params = current.get(name)
            if params is None:
                continue
            for group in optimizer.param_groups:
                if len(group["params"]) != len(params):
                    continue
                for old, new in zip(group["params"], params):
                    if old is not new and old in optimizer.state:
                        optimizer.state[new] = optimizer.state.pop(old)
                group["params"] = list(params)
            self.optimizers.parameters[name] = list(params)
