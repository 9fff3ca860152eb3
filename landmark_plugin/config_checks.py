"""Checks of a parsed command line that need no data: run before any process is spawned, any data
is loaded or anything big is allocated, and raise ``ConfigError`` naming the option to change.

``check_before_start`` runs in the launcher (``landmark-train``, each torchrun rank before its
rendezvous) and again in the trainer's setup (plain ``ns-train``).  ``check_tree_fits_points``
runs where the seed points are first known (retina-gs's model).
"""

from __future__ import annotations

from typing import Any

from landmark_plugin.errors import ConfigError

MAX_TREE_DEPTH = 16
"""Deepest kd-tree retina-gs accepts: 65,536 leaves.  Per-leaf tables (boxes, leaf order, rank
map, config.yml's layout) grow as 2**depth; depth 30 would take gigabytes before training."""


def check_tree_depth(depth: int) -> None:
    """0 <= depth <= MAX_TREE_DEPTH."""
    if not 0 <= depth <= MAX_TREE_DEPTH:
        raise ConfigError(
            f"--pipeline.model.tree-depth {depth} is out of range: use 0 to {MAX_TREE_DEPTH} "
            f"(2**depth leaves; {MAX_TREE_DEPTH} gives {2**MAX_TREE_DEPTH:,})"
        )


def check_world_size_fits_tree(config: Any, world_size: int) -> None:
    """Refuse a run whose ranks outnumber the kd-tree's leaves (each rank owns whole subtrees)."""
    depth = getattr(config.pipeline.model, "tree_depth", None)
    if depth is None:
        return
    check_tree_depth(depth)
    if world_size <= 2**depth:
        return
    need = (world_size - 1).bit_length()
    raise ConfigError(
        f"{world_size} ranks but --pipeline.model.tree-depth {depth} gives only {2**depth} leaves, and every "
        f"rank needs at least one: use --pipeline.model.tree-depth {need} or more, or at most {2**depth} ranks"
    )


def check_tree_fits_points(depth: int, num_points: int) -> None:
    """Every leaf of the initial kd-tree needs a point: 2**depth <= the number of seed points."""
    check_tree_depth(depth)
    if 2**depth > num_points:
        most = max(num_points.bit_length() - 1, 0)
        raise ConfigError(
            f"--pipeline.model.tree-depth {depth} makes {2**depth:,} leaves but the scene starts with only "
            f"{num_points:,} points (the data's point cloud, or --pipeline.model.num-random): use "
            f"--pipeline.model.tree-depth {most} or less"
        )


def check_offload(model: Any) -> None:
    """retina-gs's ``offload host`` keeps streamed training exact only with visible Adam and the
    default strategy."""
    offload = getattr(model, "offload", "none")
    if offload not in ("host", "stream"):
        return
    if not model.visible_adam:
        raise ConfigError(
            f"--pipeline.model.offload {offload} needs --pipeline.model.visible-adam True: a Gaussian left "
            "in host memory cannot take Adam's momentum step that standard Adam gives every Gaussian"
        )
    if model.strategy.kind != "default":
        raise ConfigError(f"--pipeline.model.offload {offload} works with the default strategy only (MCMC moves "
                          "every Gaussian at every step)")
    if getattr(model, "appearance_features", 0) > 0:
        raise ConfigError(f"--pipeline.model.offload {offload} does not stream per-Gaussian appearance yet: use "
                          "--pipeline.model.appearance-features 0 (--pipeline.model.affine-appearance True streams)")


def check_before_start(config: Any, world_size: int) -> None:
    """Everything about ``config`` on ``world_size`` ranks that can be refused without data."""
    check_world_size_fits_tree(config, world_size)
    model = config.pipeline.model
    check_offload(model)
    if hasattr(model, "parallel") and hasattr(model, "model_parallel_size"):  # landmark-grid
        from landmark_plugin.grid.parallel import check_parallel_config

        try:
            check_parallel_config(model, world_size)
        except ConfigError:
            raise
        except ValueError as error:  # the layout checks are shared with library code
            raise ConfigError(str(error)) from error
