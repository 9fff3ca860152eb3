"""nerfstudio's Trainer with the guarantees long runs need.

- Checkpoints are atomic (temp file, fsync, rename); resume picks the newest complete one.
- Resuming continues bit for bit: the checkpoint also holds the random streams, the camera
  sampling order and the densification statistics (landmark_plugin/resume.py).
- A step whose loss or gradients are NaN / Inf is skipped and reported; too many in a row stop
  the run naming the step and the parameter groups (landmark_plugin/step_guard.py).
- A world size larger than the kd-tree's leaf count stops the run before anything is loaded.
- The viewer binds 127.0.0.1 unless told otherwise.
- On several ranks (a sharded pipeline with ``comm`` and a collective ``render_view``), the viewer
  is served from rank 0 and rendered by every rank (``landmark_plugin/viewer/distributed.py``):
  at the end of every step all ranks meet in ``ViewerSync.step``, which also applies the viewer's
  pause button and ``shutdown`` on every rank at once; after training
  (``--viewer.quit-on-train-completion False``) all ranks keep serving views.

Everything else (loop, logging, eval, one-process viewer) is nerfstudio's own.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Type

import torch

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.callbacks import TrainingCallbackLocation
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin import resume
from landmark_plugin.checkpoints import (
    Candidate,
    atomic_torch_save,
    complete_steps,
    load_checkpoint_file,
    load_newest_readable,
    remove_stale_temp_files,
    resume_files,
)
from landmark_plugin.config_checks import check_before_start
from landmark_plugin.distributed.groups import Comm, cuda_index
from landmark_plugin.errors import check_output_dir, writing_to
from landmark_plugin.step_guard import NonFiniteSteps, SkippedStepCallback, find_nonfinite, gradient_norms
from landmark_plugin.viewer.distributed import Control, RenderMailbox, ShardedViewer, ViewerSync

LEGACY_VIEWER_OFF = {"viewer_legacy": "tensorboard"}
"""What --vis becomes on several ranks where it names the legacy viewer (only nerfstudio's
current viewer is served there)."""


def latest_complete_step(checkpoint_dir: Path) -> Optional[int]:
    """Step of the newest complete checkpoint in ``checkpoint_dir`` (temp files ignored)."""
    steps = complete_steps(checkpoint_dir)
    return steps[0] if steps else None


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
    deterministic: bool = False
    """Use torch's deterministic algorithms, so that a rerun or a resumed run repeats an unbroken
    one bit for bit (on CPU; gsplat's CUDA kernels accumulate with atomics).  Slower."""
    max_consecutive_nonfinite_steps: int = 10
    """A step whose loss or gradients hold NaN / Inf is skipped (no optimiser step, no
    densification) and reported; this many skipped in a row stop the run, naming the step and
    the parameter groups.  0 turns the check off.  With mixed precision, gradient overflow is
    left to the grad scaler and only the loss is checked."""

    def save_config(self) -> None:
        """nerfstudio's, with an unwritable output directory reported as one error naming it."""
        base_dir = self.get_base_dir()
        with writing_to(base_dir, "config.yml (check --output-dir)"):
            super().save_config()


def checkpoint_bytes(pipeline: torch.nn.Module) -> int:
    """About the size of one checkpoint: the parameters and Adam's two moments per parameter."""
    return 3 * sum(p.numel() * p.element_size() for p in pipeline.parameters())


class SyncedOptimizers(Optimizers):
    """nerfstudio's Optimizers whose step first makes the ranks' gradients consistent."""

    def __init__(self, config, param_groups, before_step: Callable[[], None]):
        super().__init__(config, param_groups)
        self.before_step = before_step

    def optimizer_scaler_step_some(self, grad_scaler, param_groups: List[str]) -> None:
        self.before_step()
        super().optimizer_scaler_step_some(grad_scaler, param_groups)

    def optimizer_step_all(self) -> None:
        self.before_step()
        super().optimizer_step_all()

    def optimizer_scaler_step_all(self, grad_scaler) -> None:
        self.before_step()
        super().optimizer_scaler_step_all(grad_scaler)


class LandmarkTrainer(Trainer):
    """Trainer with atomic checkpoints, bit-exact resume, skipping of non-finite steps, and the
    live viewer of a run on several ranks."""

    config: LandmarkTrainerConfig
    viewer_sync: Optional[ViewerSync] = None
    """Several ranks with the viewer on: the per-step exchange with rank 0's viewer."""

    def __init__(self, config: LandmarkTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        super().__init__(config, local_rank, world_size)
        if self.device.startswith("cuda"):
            # nerfstudio gives local rank k the GPU cuda:k; ranks sharing GPUs (gloo) wrap around.
            self.device = f"cuda:{cuda_index(local_rank, getattr(config.pipeline, 'backend', 'auto'))}"
        self.nonfinite = NonFiniteSteps(config.max_consecutive_nonfinite_steps)

    @property
    def comm(self) -> Comm:
        """The run's ranks (the pipeline's; one process when it has none)."""
        return getattr(self.pipeline, "comm", Comm.single())

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        check_before_start(self.config, self.world_size)  # before any data or device work
        check_output_dir(self.checkpoint_dir)
        if self.config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for it
            torch.use_deterministic_algorithms(True, warn_only=True)
        live_view = self._wants_live_view()
        if live_view:
            # nerfstudio's setup would build its own viewer (on every node's local rank 0,
            # rendering one shard); ours is built below on rank 0.  vis itself stays as given on
            # every rank, so every rank makes the same eval decisions (nerfstudio skips eval
            # with the viewer alone).
            self.config.is_viewer_enabled = lambda: False  # type: ignore[method-assign]
        try:
            super().setup(test_mode)
        finally:
            if live_view:
                del self.config.is_viewer_enabled
        # A skipped step must not feed densification (or any other after-step bookkeeping).
        self.callbacks = [SkippedStepCallback(callback, self.nonfinite.was_skipped) for callback in self.callbacks]
        self._record_layout()
        # Before the first step, so that a full disk is found now rather than at the first save.
        check_output_dir(self.checkpoint_dir, checkpoint_bytes(self.pipeline))
        if live_view:
            self._setup_live_viewer()

    def recorded_layout(self) -> Dict[str, Any]:
        """Fields of the pipeline config that config.yml records at setup: the world size (where
        the pipeline config has that field); subclasses add theirs."""
        return {"world_size": self.comm.world_size}

    def _record_layout(self) -> None:
        """Set ``recorded_layout`` on the pipeline config; rank 0 rewrites the config.yml a CLI saved."""
        pipeline_config = self.config.pipeline
        if not hasattr(pipeline_config, "world_size"):
            return
        for name, value in self.recorded_layout().items():
            setattr(pipeline_config, name, value)
        if self.comm.is_main and (self.base_dir / "config.yml").exists():
            self.config.save_config()

    # ---- the viewer of a multi-rank run -----------------------------------------------------
    def _wants_live_view(self) -> bool:
        """Several ranks with the viewer on (the legacy viewer is swapped for tensorboard)."""
        if self.world_size <= 1:
            return False
        if self.config.vis in LEGACY_VIEWER_OFF:
            new = LEGACY_VIEWER_OFF[self.config.vis]
            CONSOLE.print(f"{self.world_size} ranks: the legacy viewer is not served (--vis {self.config.vis} -> {new}); "
                          "use --vis viewer")
            self.config.vis = new  # type: ignore[assignment]
        return self.config.is_viewer_enabled()

    def _setup_live_viewer(self) -> None:
        """Rank 0: the viewer and its mailbox; every rank: the per-step ``ViewerSync`` over the
        pipeline's collective ``render_view`` and ``apply_edits`` (the viewer's layout edits)."""
        comm, mailbox = self.comm, None
        if comm.is_main:
            mailbox = RenderMailbox(timeout_s=getattr(self.config.pipeline, "collective_timeout_s", 600.0))
            self.viewer_state = ShardedViewer(
                self.config.viewer,
                log_filename=self.base_dir / self.config.viewer.relative_log_filename,
                datapath=self.config.data if self.config.data is not None else self.base_dir,
                pipeline=self.pipeline,
                trainer=self,
                share=self.config.viewer.make_share_url,
                mailbox=mailbox,
            )
            for line in self.viewer_state.viewer_info:
                CONSOLE.print(f"{line} (rendered by all {comm.world_size} ranks)")
        self.viewer_sync = ViewerSync(comm, self.pipeline.render_view, mailbox, getattr(self.pipeline, "apply_edits", None))

    def _viewer_control(self) -> Control:
        """Rank 0: what the viewer and the trainer want at this sync point."""
        if self.stop_training:
            return "stop"
        viewer = self.viewer_state
        return "pause" if isinstance(viewer, ShardedViewer) and viewer.pause_requested else "train"

    def _update_viewer_state(self, step: int) -> None:
        super()._update_viewer_state(step)  # rank 0: nerfstudio's step-triggered rerender, camera poses
        if self.viewer_sync is not None and self.viewer_sync.step(self._viewer_control) == "stop":
            self.stop_training = True

    def _train_complete_viewer(self) -> None:
        if self.viewer_sync is None:
            return super()._train_complete_viewer()
        if self.comm.is_main and self.viewer_state is not None:
            self.viewer_state.training_complete()
            CONSOLE.print("Training complete; the viewer stays up (all ranks serve it). Use ctrl+c to quit", justify="center")
        self.viewer_sync.serve_until_stop(self._viewer_control)

    def train(self) -> None:
        # A resumed run ends where the unbroken one would (at --max-num-iterations, not that many
        # steps after the resume), so the same command line resumes a killed run, schedules included.
        remaining = self.config.max_num_iterations - self._start_step
        if self._start_step > 0 and remaining <= 0:
            CONSOLE.print(f"The checkpoint is at step {self._start_step - 1}: the run of --max-num-iterations "
                          f"{self.config.max_num_iterations} is complete; raise it to train further")
            remaining = 0
        total, self.config.max_num_iterations = self.config.max_num_iterations, remaining
        try:
            if remaining > 0:
                super().train()
        except BaseException as error:
            if self.viewer_sync is not None:
                self.viewer_sync.close(f"training failed: {type(error).__name__}")
            raise
        finally:
            self.config.max_num_iterations = total
        if self.viewer_sync is not None:
            self.viewer_sync.close("training has ended")

    def checkpoint_state(self, step: int) -> dict:
        """Everything a resume needs: nerfstudio's checkpoint layout plus ``resume`` (random
        streams, camera order, densification statistics; tensors and plain values only)."""
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        return {
            "step": step,
            "pipeline": pipeline.state_dict(),  # type: ignore[union-attr]
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
            "resume": resume.capture(pipeline),
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
        sync = self.gradient_sync()
        if sync is None:
            return super().setup_optimizers()
        return SyncedOptimizers(self.config.optimizers.copy(), self.pipeline.get_param_groups(), sync)

    def gradient_sync(self) -> Optional[Callable[[], None]]:
        """What makes the ranks' gradients consistent before every optimiser step; None in one
        process.  Distributed trainers return their pipeline's gradient exchange."""
        return None

    def train_iteration(self, step: int):
        """nerfstudio's iteration (zero grads, loss, backward, optimiser and scheduler step),
        except that a step with a non-finite loss or gradient is skipped and reported."""
        accumulation = self.gradient_accumulation_steps
        groups = list(self.optimizers.parameters.keys())
        self.optimizers.zero_grad_some([g for g in groups if step % accumulation[g] == 0])
        device_type = self.device.split(":")[0]
        with torch.autocast(device_type="cpu" if device_type == "mps" else device_type, enabled=self.mixed_precision):
            _, loss_dict, metrics_dict = self.pipeline.get_train_loss_dict(step=step)
            loss = functools.reduce(torch.add, loss_dict.values())
        self.grad_scaler.scale(loss).backward()  # type: ignore[union-attr]
        if self._skip_if_nonfinite(step, loss_dict):
            return loss, loss_dict, metrics_dict
        self.optimizers.optimizer_scaler_step_some(
            self.grad_scaler, [g for g in groups if step % accumulation[g] == accumulation[g] - 1]
        )
        if self.config.log_gradients:
            metrics_dict.update(gradient_norms(self.pipeline.model))
        scale = self.grad_scaler.get_scale()
        self.grad_scaler.update()
        if scale <= self.grad_scaler.get_scale():  # the scaler did not skip the step for overflow
            self.optimizers.scheduler_step_all(step)
        return loss, loss_dict, metrics_dict

    def _skip_if_nonfinite(self, step: int, loss_dict: dict) -> bool:
        """Check the step; on NaN / Inf drop its gradients, report it, and say to skip it."""
        if self.nonfinite.limit <= 0:
            return False
        check_gradients = not self.grad_scaler.is_enabled()  # else overflow is the scaler's business
        found = find_nonfinite(loss_dict, self.optimizers.optimizers if check_gradients else {},
                               self.pending_gradients() if check_gradients else None)
        if not self._on_any_rank(found.any):
            self.nonfinite.passed()
            return False
        self.optimizers.zero_grad_all()
        self.discard_pending_step()
        message = self.nonfinite.skipped(step, found)  # raises once too many are in a row
        CONSOLE.print(f"[bold yellow]{message}")
        writer.put_scalar(name="Skipped steps (non-finite)", scalar=self.nonfinite.total, step=step)
        return True

    def pending_gradients(self) -> Dict[str, List[torch.Tensor]]:
        """Gradients, besides the optimisers' parameters', that the optimiser step will be made
        from (none here; retina-gs streaming has its image gradients)."""
        return {}

    def discard_pending_step(self) -> None:
        """Forget what the skipped step left for the optimiser step (nothing here)."""

    def _on_any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (all ranks must skip together)."""
        comm = self.comm
        if comm.world_size == 1:
            return flag
        from landmark_plugin.distributed.collectives import all_reduce_ints

        return bool(all_reduce_ints(comm, torch.tensor([int(flag)]), "non-finite step check").item() > 0)

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        atomic_torch_save(self.checkpoint_state(step), ckpt_path)
        remove_stale_temp_files(self.checkpoint_dir)  # left by writes that were killed
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("step-*.ckpt"):
                if old != ckpt_path:
                    old.unlink()

    def checkpoint_candidates(self) -> List[Path]:
        """Checkpoint files to resume from, newest first (``resume_files``: an older one is used
        when a newer one does not load)."""
        return resume_files(self.config.load_dir, self.config.load_step, self.config.load_checkpoint)

    def checkpoint_to_load(self) -> Optional[Path]:
        """--load-checkpoint, or the newest complete checkpoint of --load-dir (or --load-step)."""
        paths = self.checkpoint_candidates()
        return paths[0] if paths else None

    def resume_candidates(self) -> List[Candidate]:
        """What this rank may resume from, newest first (``load_newest_readable`` takes the first
        that loads on every rank)."""
        # weights_only: what ns-eval / ns-render do on torch >= 2.6, so a checkpoint that
        # resumes is one they can read too.
        return [Candidate(str(path), functools.partial(load_checkpoint_file, path)) for path in self.checkpoint_candidates()]

    def errors_on_every_rank(self, error: Optional[str]) -> List[Optional[str]]:
        """Collective: every rank's checkpoint loading error (None where it loaded)."""
        if self.comm.world_size == 1:
            return [error]
        from landmark_plugin.distributed.collectives import all_gather_objects

        return all_gather_objects(self.comm, error, "checkpoint loading check")

    def _load_checkpoint(self) -> None:
        candidates = self.resume_candidates()
        if not candidates:
            CONSOLE.print("No checkpoint to load, so training from scratch.")
            return
        state = load_newest_readable(candidates, self.errors_on_every_rank)
        # A sharded pipeline's candidates are this rank's parts already: say so rather than let
        # load_pipeline guess from shapes (a grown grid's shard can look like a whole model).
        with getattr(self.pipeline, "loading_rank_parts", contextlib.nullcontext)():
            self.restore_state(state)
        CONSOLE.print(f"Resumed from step {state['step']}: training continues at step {self._start_step}")

    def restore_state(self, state: dict) -> None:
        """Load a ``checkpoint_state`` dict: parameters, optimisers, schedulers, grad scaler,
        then the resume state (random streams, camera order, densification statistics)."""
        self._start_step = state["step"] + 1
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and self.config.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        if "scalers" in state:
            self.grad_scaler.load_state_dict(state["scalers"])
        self._rebind_optimizers()
        if not resume.restore(self.pipeline, state.get("resume")):
            CONSOLE.print("The checkpoint has no resume state (random streams, camera order): training "
                          "continues from its parameters, but not bit for bit as an unbroken run would")

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
