"""Saving and loading converted models: one safetensors file each, no pickle anywhere.

A converted model is ``origin`` (how to build the original architecture, see :mod:`.models`) +
``plan`` (which convs became which blocks, see :func:`igc_convert.convert.apply_plan`) + its state
dict. The file holds the state dict as safetensors tensors and everything else as JSON strings in
the safetensors header's metadata (a string→string map)::

    format               "igc-convert/1"
    origin               {"kind": "torchvision", "name": "resnet18", "weights": ..., "kwargs": {}}
    plan                 [{"name": "layer1.0.conv1", "block": "igcv1", "shape": {...}}, ...]
    report               {...}                       (optional)
    torch_version        "2.4.0"
    igc_convert_version  "0.1.0"

Loading rebuilds the architecture from ``origin`` *without* its weights (no download, the original
weights file is not needed), applies the plan, then loads the tensors strictly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import safetensors
import safetensors.torch
import torch
from torch import nn

from .errors import FileFormatError, IGCError, ModelError
from .files import atomic_path, check_writable
from .models import build_model_from_origin, describe_state_mismatch

log = logging.getLogger(__name__)

FORMAT = "igc-convert/1"

# A header longer than this is not one we wrote (ours are a few hundred kB even for big reports).
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class Converted:
    """A converted model loaded from a file, with the facts needed to reproduce it."""

    model: nn.Module
    origin: dict[str, Any]
    plan: list[dict[str, Any]]
    report: dict[str, Any] | None
    path: Path

    @property
    def params_ratio(self) -> float | None:
        """The conversion's params ratio, from its report (None without one)."""
        return (self.report or {}).get("totals", {}).get("params_ratio")


def save(path: str | os.PathLike, model: nn.Module, *, origin: Mapping[str, Any],
         plan: Sequence[Mapping[str, Any]], report: Any = None) -> Path:
    """Write ``model`` to ``path`` atomically (an existing file is replaced only on success).

    ``report`` is a JSON-able dict or an object with ``to_dict()`` (a :class:`~igc_convert.report.Report`).

    Example::

        result = convert(model, ParamsRatio(0.3))
        save("resnet18-igc.safetensors", result.model, origin=origin, plan=result.plan, report=result.report)
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"cannot save a {type(model).__name__}: expected a torch.nn.Module")
    from . import __version__  # lazy: the package __init__ imports the modules that import this one

    metadata = {
        "format": FORMAT,
        "origin": _to_json(origin, "origin", dict),
        "plan": _to_json(plan, "plan", list),
        "torch_version": torch.__version__,
        "igc_convert_version": __version__,
    }
    if report is not None:
        if callable(getattr(report, "to_dict", None)):
            report = report.to_dict()
        metadata["report"] = _to_json(report, "report", dict)
    return save_state_dict(path, model, metadata)


def save_state_dict(path: str | os.PathLike, model: nn.Module, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s state dict to a ``.safetensors`` file atomically: a plain weights file, such
    as :func:`igc_convert.models.build_model` loads.

    Example::

        save_state_dict("resnet18-tuned.safetensors", model)
        model, origin = build_model("resnet18", "resnet18-tuned.safetensors")
    """
    path = check_writable(path)  # before the tensors are copied: an unwritable destination fails fast, untouched
    tensors = _plain_tensors(model.state_dict())
    try:
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
    except OSError as err:  # disk full, permissions changed meanwhile: the old file is untouched
        raise FileFormatError(f"cannot write {str(path)!r}: {err}") from err
    log.info("saved %d tensors to %s", len(tensors), path)
    return path


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Converted:
    """Rebuild a converted model saved by :func:`save` (eval mode, on ``map_location``).

    Example::

        converted = load("resnet18-igc.safetensors")
        logits = converted.model(images)
    """
    path = Path(path)
    meta = read_metadata(path)
    origin, plan = meta["origin"], meta["plan"]
    try:
        model = build_model_from_origin(origin, architecture_only=True)
    except ModelError as err:
        raise ModelError(f"{str(path)!r}: cannot rebuild the original architecture: {err}") from err
    if plan:
        from .convert import apply_plan  # lazy: convert pulls in fx tracing and the planner

        try:
            model = apply_plan(model, plan)
        except (IGCError, TypeError, ValueError) as err:  # TypeError: a shape argument no block takes
            raise FileFormatError(f"{str(path)!r}: its plan does not fit the rebuilt {origin['name']}: "
                                  f"{err if isinstance(err, IGCError) else f'{type(err).__name__}: {err}'}") from err
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises several unrelated types for corrupt files
        raise FileFormatError(f"{str(path)!r}: cannot read its tensors (truncated or corrupt?): {err}") from err
    problem = describe_state_mismatch(model.state_dict(), tensors)
    if problem:
        raise FileFormatError(f"{str(path)!r}: its tensors do not fit the rebuilt {origin['name']} "
                              f"with {len(plan)} converted layer(s): {problem}")
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FileFormatError(f"{str(path)!r}: tensor {key!r} holds NaN/Inf values")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:  # e.g. a BatchNorm counter left out: still the file's fault
        raise FileFormatError(f"{str(path)!r}: its tensors do not load into the rebuilt model: {err}") from err
    model = model.to(map_location).eval()
    return Converted(model=model, origin=origin, plan=plan, report=meta["report"], path=path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a file written by :func:`save` (reads the header only).

    Example::

        meta = read_metadata("resnet18-igc.safetensors")
        meta["origin"]["name"], len(meta["plan"]), meta["report"]
    """
    path = Path(path)
    raw = _read_raw_metadata(path)
    if raw.get("format") != FORMAT:
        found = f"format tag {raw['format']!r}" if "format" in raw else "no igc-convert format tag"
        raise FileFormatError(f"{str(path)!r} is not an igc-convert model file: {found} (expected {FORMAT!r}; "
                              "a plain safetensors state dict is loaded with --weights instead)")
    origin = _from_json(raw, "origin", dict, path)
    plan = _from_json(raw, "plan", list, path)
    report = _from_json(raw, "report", dict, path) if "report" in raw else None
    for key in ("kind", "name"):
        if not isinstance(origin.get(key), str):
            raise FileFormatError(f"{str(path)!r}: its origin has no {key!r} string: {origin!r}")
    for entry in plan:
        problem = _plan_entry_problem(entry)
        if problem:
            raise FileFormatError(f"{str(path)!r}: its plan entry {entry!r} {problem}")
    return {"format": FORMAT, "origin": origin, "plan": plan, "report": report,
            "torch_version": raw.get("torch_version"), "igc_convert_version": raw.get("igc_convert_version")}


# ------------------------------------------------------------------------------------------ helpers
def _plain_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, each owning its memory (safetensors refuses shared storage).

    Tied weights appear under several keys of a state dict; each key gets its own copy, and
    ``load_state_dict`` copies the values back into the one shared parameter.
    """
    seen: set[tuple[int, str]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        t = value.detach().cpu()
        storage = (t.untyped_storage().data_ptr(), str(t.device))
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == \
            t.untyped_storage().nbytes()
        if storage in seen or not whole:
            t = t.contiguous().clone()
        seen.add((t.untyped_storage().data_ptr(), str(t.device)))
        out[key] = t
    return out


def _plan_entry_problem(entry: Any) -> str:
    """What is wrong with one plan entry's structure (``""`` if nothing): the name and block strings and
    the shape object :func:`~igc_convert.convert.apply_plan` needs. Shape *values* are the block's to
    judge (user-registered blocks may take any JSON value); :func:`load` turns its refusal into a
    :class:`FileFormatError`."""
    if not isinstance(entry, dict):
        return "is not an object"
    for key in ("name", "block"):
        if not isinstance(entry.get(key), str):
            return f"has no {key!r} string"
    if not isinstance(entry.get("shape"), dict):
        return "has no 'shape' object"
    return ""


def _read_raw_metadata(path: Path) -> dict[str, str]:
    if not path.exists():
        raise FileFormatError(f"{str(path)!r} does not exist")
    if not path.is_file():
        raise FileFormatError(f"{str(path)!r} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise FileFormatError(f"{str(path)!r} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or head[8:9] != b"{" or not 2 <= header_len <= min(size - 8, _MAX_HEADER_BYTES):
        raise FileFormatError(f"{str(path)!r} is not a safetensors file (no valid header; "
                              "truncated, or another format such as a pickle?)")
    try:
        # safe_open also checks that every tensor's byte range lies inside the file (catches truncation).
        with safetensors.safe_open(str(path), framework="pt") as f:
            raw = f.metadata()
    except Exception as err:  # safetensors raises several unrelated types for corrupt files
        raise FileFormatError(f"{str(path)!r} is a damaged safetensors file (truncated?): {err}") from err
    if not raw:
        raise FileFormatError(f"{str(path)!r} is not an igc-convert model file: its header has no metadata "
                              "(a plain safetensors state dict is loaded with --weights instead)")
    return dict(raw)


def _to_json(value: Any, what: str, kind: type) -> str:
    if not isinstance(value, (Mapping if kind is dict else (list, tuple))):
        raise FileFormatError(f"cannot save: {what} must be a {kind.__name__}, got {type(value).__name__}")
    try:
        return json.dumps(value if kind is dict else list(value), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"cannot save: {what} is not JSON-serialisable: {err}") from err


def _from_json(raw: Mapping[str, str], key: str, kind: type, path: Path) -> Any:
    if key not in raw:
        raise FileFormatError(f"{str(path)!r}: its metadata has no {key!r} entry")
    try:
        value = json.loads(raw[key])
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{str(path)!r}: its {key!r} metadata is not valid JSON ({err})") from err
    if not isinstance(value, kind):
        raise FileFormatError(f"{str(path)!r}: its {key!r} metadata is a {type(value).__name__}, "
                              f"not a {kind.__name__}")
    return value
