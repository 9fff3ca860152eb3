"""Layout edits of a trained scene: the serialisable edit list, and how a model's adapter installs it.

``LayoutEdits`` is what the viewer's controls build, what ``landmark-render --edits`` reads, and what
``apply_edits`` installs on a model.  Edits act at render time only (eval mode): trained parameters are
never touched, and training ignores them.  The maths is in ``core/edits.py``; here block indices become
boxes and the result is handed to the model's hooks by the method's adapter (``gaussians/layout.py``:
kd-tree leaves; ``grid/layout.py``: x-y blocks).

JSON (``version`` optional; README "Editing a scene")::

    {"version": 1,
     "ops": [{"op": "remove_block", "block": 3},
             {"op": "remove_box", "min": [x, y, z], "max": [x, y, z]},
             {"op": "copy_block", "block": 0, "to_block": 3},
             {"op": "copy_block", "block": 0, "offset": [dx, dy, dz]},
             {"op": "copy_box", "min": [x, y, z], "max": [x, y, z], "offset": [dx, dy, dz]}],
     "appearance": {"image": 4, "to_image": 7, "t": 0.25}}
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float
from torch import Tensor

from landmark_plugin.core.edits import BoxEdit
from landmark_plugin.errors import UserError

Vec3 = Tuple[float, float, float]
EDITS_VERSION = 1


class EditsError(UserError):
    """Bad layout edits; the message names the file (or source) and the entry at fault."""


@dataclass(frozen=True)
class RemoveBlock:
    """Hide a block (landmark-grid) or kd-tree leaf (retina-gs)."""

    block: int


@dataclass(frozen=True)
class RemoveBox:
    """Hide everything inside an axis-aligned box (Gaussians by their centre)."""

    min: Vec3
    max: Vec3


@dataclass(frozen=True)
class CopyBlock:
    """Show a block's content again, moved by ``offset`` or onto block ``to_block`` (one of the two)."""

    block: int
    to_block: Optional[int] = None
    offset: Optional[Vec3] = None


@dataclass(frozen=True)
class CopyBox:
    """Show the content of a box again, moved by ``offset`` (replacing what was at the target)."""

    min: Vec3
    max: Vec3
    offset: Vec3


Op = Union[RemoveBlock, RemoveBox, CopyBlock, CopyBox]
OP_NAMES = {RemoveBlock: "remove_block", RemoveBox: "remove_box", CopyBlock: "copy_block", CopyBox: "copy_box"}


@dataclass(frozen=True)
class Appearance:
    """Render with a training image's appearance code, or between two: ``(1 - t) e[image] + t e[to_image]``."""

    image: int
    to_image: Optional[int] = None
    t: float = 0.0


@dataclass(frozen=True)
class LayoutEdits:
    """An edit stack (applied first to last; ``undo`` drops the last) plus an appearance choice.

    Immutable: every change returns a new value, so a viewer callback can swap the model's edits in
    one assignment while the render thread reads the old ones.
    """

    ops: Tuple[Op, ...] = ()
    appearance: Optional[Appearance] = None

    def push(self, op: Op) -> "LayoutEdits":
        return dataclasses.replace(self, ops=self.ops + (op,))

    def undo(self) -> "LayoutEdits":
        return dataclasses.replace(self, ops=self.ops[:-1])

    def showing(self, block: int) -> "LayoutEdits":
        """Without the removals of ``block`` (toggling it back on)."""
        return dataclasses.replace(self, ops=tuple(op for op in self.ops if op != RemoveBlock(block)))

    def hidden_blocks(self) -> List[int]:
        return sorted({op.block for op in self.ops if isinstance(op, RemoveBlock)})

    def with_appearance(self, appearance: Optional[Appearance]) -> "LayoutEdits":
        return dataclasses.replace(self, appearance=appearance)

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        ops = [{"op": OP_NAMES[type(op)], **_set_fields(op)} for op in self.ops]
        out: Dict[str, Any] = {"version": EDITS_VERSION, "ops": _lists(ops)}
        if self.appearance is not None:
            out["appearance"] = _set_fields(self.appearance)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "edits") -> "LayoutEdits":
        if not isinstance(data, dict):
            raise EditsError(f"{source}: expected a JSON object with 'ops' and/or 'appearance', got {type(data).__name__}")
        _only_keys(data, {"version", "ops", "appearance"}, source)
        if data.get("version", EDITS_VERSION) != EDITS_VERSION:
            raise EditsError(f"{source}: version {data['version']!r} is not supported (this build reads version {EDITS_VERSION})")
        raw_ops = data.get("ops", [])
        if not isinstance(raw_ops, list):
            raise EditsError(f"{source}: 'ops' must be a list of edit objects")
        ops = tuple(_parse_op(entry, f"{source}: ops[{i}]") for i, entry in enumerate(raw_ops))
        appearance = None
        if data.get("appearance") is not None:
            appearance = _parse_appearance(data["appearance"], f"{source}: appearance")
        return cls(ops=ops, appearance=appearance)

    @classmethod
    def from_json(cls, text: str, source: str = "edits") -> "LayoutEdits":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise EditsError(f"{source}: not valid JSON ({error})") from None
        return cls.from_dict(data, source)

    # ---- resolution ----------------------------------------------------------------------
    def resolve(self, boxes: Float[Tensor, "B 2 3"], kind: str = "block", source: str = "edits") -> List[BoxEdit]:
        """The ops as boxes (``core.edits``): block ``b`` is ``boxes[b]``.

        Args:
            boxes: [B, 2, 3] the method's block (or leaf) boxes.
            kind: what a block is called in errors ('block' or 'leaf').
            source: names the edits in errors.
        """
        out: List[BoxEdit] = []
        for i, op in enumerate(self.ops):
            where = f"{source}: ops[{i}] ({OP_NAMES[type(op)]})"
            if isinstance(op, RemoveBlock):
                out.append(BoxEdit.remove(boxes[_block(op.block, boxes, kind, where)]))
            elif isinstance(op, RemoveBox):
                out.append(BoxEdit.remove(torch.tensor([op.min, op.max], dtype=torch.float64)))
            elif isinstance(op, CopyBox):
                out.append(BoxEdit.copy(torch.tensor([op.min, op.max], dtype=torch.float64), torch.tensor(op.offset)))
            else:
                box = boxes[_block(op.block, boxes, kind, where)]
                if op.to_block is not None:
                    target = boxes[_block(op.to_block, boxes, kind, where)]
                    offset = target.mean(0) - box.mean(0)
                else:
                    offset = torch.tensor(op.offset, dtype=torch.float64)
                out.append(BoxEdit.copy(box, offset))
        return out


def load_edits(path: Union[str, Path]) -> LayoutEdits:
    """Read an edits JSON file; every error names the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise EditsError(f"{path}: cannot read the edits file ({error.strerror or error})") from None
    return LayoutEdits.from_json(text, source=str(path))


def save_edits(edits: LayoutEdits, path: Union[str, Path]) -> None:
    Path(path).write_text(edits.to_json() + "\n")


# ---- parsing helpers ---------------------------------------------------------------------
def _set_fields(item: Any) -> Dict[str, Any]:
    """A dataclass's fields that are not None (unset options stay out of the JSON)."""
    return {k: v for k, v in dataclasses.asdict(item).items() if v is not None}


def _lists(value: Any) -> Any:
    """Tuples as lists (JSON arrays), recursively."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def _only_keys(data: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise EditsError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EditsError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _vec3(value: Any, where: str) -> Vec3:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise EditsError(f"{where}: expected 3 finite numbers [x, y, z], got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _box(entry: dict, where: str) -> Tuple[Vec3, Vec3]:
    for key in ("min", "max"):
        if key not in entry:
            raise EditsError(f"{where}: missing '{key}'")
    lo, hi = _vec3(entry["min"], f"{where}.min"), _vec3(entry["max"], f"{where}.max")
    if not all(a < b for a, b in zip(lo, hi)):
        raise EditsError(f"{where}: 'min' {list(lo)} must be below 'max' {list(hi)} on every axis")
    return lo, hi


def _parse_op(entry: Any, where: str) -> Op:
    if not isinstance(entry, dict) or "op" not in entry:
        raise EditsError(f"{where}: expected an object with an 'op' key ({', '.join(OP_NAMES.values())})")
    name = entry["op"]
    if name == "remove_block":
        _only_keys(entry, {"op", "block"}, where)
        return RemoveBlock(_int(entry.get("block"), f"{where}.block"))
    if name == "remove_box":
        _only_keys(entry, {"op", "min", "max"}, where)
        return RemoveBox(*_box(entry, where))
    if name == "copy_box":
        _only_keys(entry, {"op", "min", "max", "offset"}, where)
        return CopyBox(*_box(entry, where), offset=_vec3(entry.get("offset"), f"{where}.offset"))
    if name == "copy_block":
        _only_keys(entry, {"op", "block", "to_block", "offset"}, where)
        if ("to_block" in entry) == ("offset" in entry):
            raise EditsError(f"{where}: give exactly one of 'to_block' and 'offset'")
        block = _int(entry.get("block"), f"{where}.block")
        if "to_block" in entry:
            return CopyBlock(block, to_block=_int(entry["to_block"], f"{where}.to_block"))
        return CopyBlock(block, offset=_vec3(entry["offset"], f"{where}.offset"))
    raise EditsError(f"{where}: unknown op {name!r}; expected one of {', '.join(OP_NAMES.values())}")


def _parse_appearance(entry: Any, where: str) -> Appearance:
    if not isinstance(entry, dict) or "image" not in entry:
        raise EditsError(f"{where}: expected {{'image': i}} or {{'image': i, 'to_image': j, 't': 0..1}}")
    _only_keys(entry, {"image", "to_image", "t"}, where)
    t = entry.get("t", 0.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise EditsError(f"{where}.t: expected a number in [0, 1], got {t!r}")
    to_image = entry.get("to_image")
    return Appearance(
        image=_int(entry["image"], f"{where}.image"),
        to_image=None if to_image is None else _int(to_image, f"{where}.to_image"),
        t=float(t),
    )


def appearance_mix(edits: LayoutEdits, num_images: int, source: str, missing: str) -> Optional[Tuple[int, Optional[int], float]]:
    """The edit's appearance as (image, to_image, t), checked against a model with per-image
    appearance for ``num_images`` training images; ``missing`` says what a model without any
    lacks.  None when the edit picks no appearance."""
    a = edits.appearance
    if a is None:
        return None
    if num_images == 0:
        raise EditsError(f"{source}: 'appearance' needs {missing}; remove it")
    for key, index in (("image", a.image), ("to_image", a.to_image)):
        if index is not None and index >= num_images:
            raise EditsError(
                f"{source}: appearance.{key} {index} does not exist; the model has per-image appearance for "
                f"{num_images} training images (0..{num_images - 1})"
            )
    return (a.image, a.to_image, a.t)


def plural(kind: str) -> str:
    """'leaves' / 'blocks'."""
    return "leaves" if kind == "leaf" else f"{kind}s"


def _block(index: int, boxes: Tensor, kind: str, where: str) -> int:
    if not 0 <= index < boxes.shape[0]:
        raise EditsError(
            f"{where}: {kind} {index} does not exist; this model has {boxes.shape[0]} {plural(kind)} (0..{boxes.shape[0] - 1})"
        )
    return index


# ---- adapters ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockStats:
    """What one block (leaf) holds: ``items`` Gaussians (retina-gs) or parameters (grid), and their bytes."""

    items: int
    bytes: int


def contiguous_ranks(count: int, world_size: int) -> List[int]:
    """Rank of each of ``count`` blocks when ranks own contiguous ranges (``partition.leaf_ranks``'s rule)."""
    world_size = max(1, min(world_size, count))
    starts = [r * count // world_size for r in range(world_size)]
    return [max(r for r, s in enumerate(starts) if s <= i) for i in range(count)]


def scene_layout(model) -> Any:
    """The edit adapter of a retina-gs or landmark-grid model: ``RetinaEditLayout`` or
    ``GridEditLayout``, each beside its method (the model names its own, so this module needs
    no model import).  An adapter has ``kind``, ``item_name``, ``num_blocks``, ``num_images``,
    ``boxes()``, ``stats()`` and ``install(edits, source)``."""
    make = getattr(model, "scene_layout", None)
    if make is None:
        raise EditsError(f"layout edits support retina-gs and landmark-grid models, not {type(model).__name__}")
    return make()


def apply_edits(model, edits: LayoutEdits, source: str = "edits") -> None:
    """Install ``edits`` on ``model`` (replacing earlier ones); checked against the model first."""
    scene_layout(model).install(edits, source)


def apply_pipeline_edits(pipeline, edits: LayoutEdits, source: str = "edits") -> None:
    """Install ``edits`` on a loaded pipeline's model.  Our pipelines install them themselves
    (``apply_edits``; collective on several ranks, where a retina-gs model holds one shard)."""
    install = getattr(pipeline, "apply_edits", None)
    if install is None:
        apply_edits(pipeline.model, edits, source)
    else:
        install(edits, source)


def describe(edits: LayoutEdits, kind: str = "block") -> Sequence[str]:
    """One line per edit, for the viewer."""
    lines = []
    for i, op in enumerate(edits.ops):
        if isinstance(op, RemoveBlock):
            text = f"hide {kind} {op.block}"
        elif isinstance(op, RemoveBox):
            text = f"remove box {_fmt(op.min)}..{_fmt(op.max)}"
        elif isinstance(op, CopyBox):
            text = f"copy box {_fmt(op.min)}..{_fmt(op.max)} by {_fmt(op.offset)}"
        elif op.to_block is not None:
            text = f"copy {kind} {op.block} onto {kind} {op.to_block}"
        else:
            text = f"copy {kind} {op.block} by {_fmt(op.offset)}"
        lines.append(f"{i + 1}. {text}")
    return lines


def _fmt(v: Optional[Vec3]) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in (v or ())) + ")"
