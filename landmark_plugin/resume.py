"""What a bit-exact resume needs beyond nerfstudio's checkpoint.

nerfstudio saves parameters, optimisers, schedulers and the grad scaler.  A run that stops and
resumes must also continue the same random streams and sample the same cameras, and a
Gaussian model must keep the densification statistics it has gathered since its last
refinement.  ``capture`` collects that state; ``restore`` puts it back:

- the random streams: torch (CPU, and CUDA when initialised), numpy, python ``random``;
- the data manager's camera sampling: nerfstudio's full-image data manager keeps a list of
  the cameras not yet drawn this epoch, its own ``random.Random`` and, for fps sampling, a
  per-camera count; the eval camera list likewise;
- the model's densification state: gsplat's strategy dict (``grad2d``, ``count``, ``radii``);
- nerfstudio's proposal sampler counts the steps since its proposal networks were last
  updated, outside its state dict;
- anything an object reports itself: the pipeline, its data manager and its model may define
  ``resume_state() -> dict`` and ``load_resume_state(state)``.

Everything is stored as tensors and plain Python values, so the checkpoint still loads with
``torch.load(weights_only=True)`` (ns-render, ns-eval and ns-viewer on torch >= 2.6).
Resuming is exact while the run's configuration and --machine.seed are unchanged: nerfstudio's
ray data manager orders the images it caches with python ``random`` at construction, which
ns-train seeds before setup.  One that samples a subset of images
(``train_num_images_to_sample_from`` > 0) draws a new subset on resume.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT = 1
"""Bumped when the layout changes; ``restore`` refuses a layout it does not know."""


# ---- random streams -----------------------------------------------------------------------
def python_rng_state(generator: Any = random) -> Dict[str, Any]:
    """A ``random`` (module or ``random.Random``) state as a tensor and plain values."""
    version, internal, gauss_next = generator.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def set_python_rng_state(state: Dict[str, Any], generator: Any = random) -> None:
    generator.setstate((state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss_next"]))


def numpy_rng_state() -> Dict[str, Any]:
    """numpy's global (legacy) generator state as a tensor and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def set_numpy_rng_state(state: Dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def rng_state() -> Dict[str, Any]:
    """Every global random stream training draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(), "python": python_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    set_numpy_rng_state(state["numpy"])
    set_python_rng_state(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"the checkpoint holds the CUDA random state of {len(state['cuda'])} devices, this machine has "
                f"{torch.cuda.device_count()}; resume on the same devices for an exact continuation"
            )
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- camera sampling ----------------------------------------------------------------------
def datamanager_state(datamanager: Any) -> Dict[str, Any]:
    """The camera sampling state of nerfstudio's data managers (what of it this one has)."""
    state: Dict[str, Any] = {}
    for name in ("train_unseen_cameras", "eval_unseen_cameras"):
        cameras = getattr(datamanager, name, None)
        if cameras is not None:
            state[name] = [int(i) for i in cameras]
    generator = getattr(datamanager, "random_generator", None)
    if isinstance(generator, random.Random):
        state["random_generator"] = python_rng_state(generator)
    counts = getattr(datamanager, "train_unsampled_epoch_count", None)
    if counts is not None:
        state["train_unsampled_epoch_count"] = torch.from_numpy(np.asarray(counts, dtype=np.float64).copy())
    return state


def load_datamanager_state(datamanager: Any, state: Dict[str, Any]) -> None:
    for name in ("train_unseen_cameras", "eval_unseen_cameras"):
        if name in state:
            setattr(datamanager, name, list(state[name]))
    if "random_generator" in state:
        generator = random.Random()
        set_python_rng_state(state["random_generator"], generator)
        datamanager.random_generator = generator
    if "train_unsampled_epoch_count" in state:
        datamanager.train_unsampled_epoch_count = state["train_unsampled_epoch_count"].numpy().copy()


# ---- model state outside the state dict ---------------------------------------------------
def strategy_state(model: Any) -> Optional[Dict[str, Any]]:
    """gsplat's strategy state dict of a splatfacto-like model (tensors, numbers, None)."""
    state = getattr(model, "strategy_state", None)
    if not isinstance(state, dict):
        return None
    kept = {}
    for key, value in state.items():
        if value is None or isinstance(value, (bool, int, float)):
            kept[key] = value
        elif isinstance(value, torch.Tensor):
            kept[key] = value.detach().cpu().clone()
    return kept


def load_strategy_state(model: Any, state: Dict[str, Any]) -> None:
    device = next(iter(model.parameters())).device
    for key, value in state.items():
        model.strategy_state[key] = value.to(device) if isinstance(value, torch.Tensor) else value


def sampler_states(model: Any) -> Dict[str, Dict[str, Any]]:
    """The schedule counters of nerfstudio's proposal samplers, by module name."""
    from nerfstudio.model_components.ray_samplers import ProposalNetworkSampler

    return {
        name: {"anneal": float(module._anneal), "step": int(module._step), "since_update": int(module._steps_since_update)}
        for name, module in model.named_modules()
        if isinstance(module, ProposalNetworkSampler)
    }


def load_sampler_states(model: Any, states: Dict[str, Dict[str, Any]]) -> None:
    modules = dict(model.named_modules())
    for name, state in states.items():
        module = modules[name]
        module._anneal, module._step, module._steps_since_update = state["anneal"], state["step"], state["since_update"]


# ---- everything ---------------------------------------------------------------------------
def _parts(pipeline: Any) -> Dict[str, Any]:
    pipeline = getattr(pipeline, "module", pipeline)  # DDP
    return {"pipeline": pipeline, "datamanager": pipeline.datamanager, "model": pipeline.model}


def capture(pipeline: Any) -> Dict[str, Any]:
    """The resume state of a training pipeline (call where the checkpoint is taken)."""
    parts = _parts(pipeline)
    model = parts["model"]
    state: Dict[str, Any] = {
        "format": FORMAT,
        "rng": rng_state(),
        "datamanager": datamanager_state(parts["datamanager"]),
        "strategy": strategy_state(model),
        "samplers": sampler_states(model),
        "own": {name: obj.resume_state() for name, obj in parts.items() if hasattr(obj, "resume_state")},
    }
    return state


def restore(pipeline: Any, state: Optional[Dict[str, Any]]) -> bool:
    """Put back what ``capture`` took, after the checkpoint's parameters are loaded.

    Returns False (and changes nothing) for a checkpoint without resume state, e.g. one
    written by plain nerfstudio: training then continues, just not bit for bit.
    """
    if not state:
        return False
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint resume state has format {state.get('format')}, this version reads {FORMAT}")
    parts = _parts(pipeline)
    model = parts["model"]
    load_datamanager_state(parts["datamanager"], state["datamanager"])
    if state["strategy"] is not None and isinstance(getattr(model, "strategy_state", None), dict):
        load_strategy_state(model, state["strategy"])
    load_sampler_states(model, state["samplers"])
    for name, own in state["own"].items():
        parts[name].load_resume_state(own)
    set_rng_state(state["rng"])  # last: nothing above may draw from it
    return True
