"""ONNX export with an onnxruntime parity check and a lean graph.

``export_onnx(model, "model.onnx", x)`` exports ``model`` in eval mode, simplifies the graph, checks
it with ``onnx.checker``, runs it in onnxruntime (CPU) on ``x`` — and on another batch size when the
batch is dynamic, on another height and width when those are (``dynamic_size=True``, for fully
convolutional models) — compares with PyTorch, and only then writes the file (atomically). It returns the
node counts by op type before and after simplification and the parity figures.

Exporter choice (torch 2.14): the ``torch.export``-based exporter (``dynamo=True``) is used first.
Its graph, once ``onnxscript``'s optimizer has run, is the lean one: BatchNorm folded into the
preceding conv, batch kept symbolic without any Shape/Gather/Concat chains, and a
:class:`~igc_convert.shuffle.ChannelShuffle` is exactly one Reshape → Transpose → Reshape. The
TorchScript exporter (``dynamo=False``, deprecated since torch 2.9) traces ``x.shape`` into
Shape/Gather/Unsqueeze/Concat chains as soon as the batch is dynamic, so it is only the fallback
(for models ``torch.export`` cannot trace) — and the fast path for static-shape probes such as the
per-layer latency measurements of :mod:`igc_convert.bench`, where constant folding removes those
chains and the ~3 s fixed cost of the dynamo exporter would dominate.

Simplification (:func:`simplify`): ``onnxscript.optimizer.optimize_ir`` (constant folding, no-op
removal, BatchNorm fusion), Identity elimination, then :func:`fold_channel_permutations`, our one
hand-written pass (no library has it): a channel permutation (a Reshape/Transpose chain such as a
shuffle) is moved through per-channel ops and folded into the weights of a neighbouring dense conv,
or, when none is reachable, moved past per-channel affine ops so that they can fuse into the conv
before it. onnxruntime parity checks the result.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ExportError, IGCError, ModelError
from .files import atomic_write, check_writable
from .modes import eval_mode, require_module
from .shuffle import as_gather

logger = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")
INPUT_NAME = "input"
#: The ``metadata_props`` key under which ``igc-convert export`` stores a converted model's origin (JSON).
ORIGIN_KEY = "igc_convert.origin"
#: ... and the conversion's params ratio, when its report has one.
PARAMS_RATIO_KEY = "igc_convert.params_ratio"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how well it matches PyTorch.

    ``rel_diff`` is ``max|onnx - torch| / max|torch|`` over every output and every batch size
    checked (NaN when ``check=False``); ``op_counts`` are node counts by op type of the written graph,
    ``op_counts_before`` those of the graph as the exporter produced it.
    """

    path: Path
    op_counts: dict[str, int]
    max_abs_diff: float
    rel_diff: float
    opset: int
    op_counts_before: dict[str, int] = field(default_factory=dict)
    exporter: str = "dynamo"
    dynamic_batch: bool = True
    batch_sizes_checked: tuple[int, ...] = ()
    folded_permutations: int = 0
    moved_permutations: int = 0
    dynamic_size: bool = False
    sizes_checked: tuple[tuple[int, ...], ...] = ()

    def summary(self) -> str:
        """A few human lines: exporter, node counts before → after, parity."""
        lines = [f"{self.path}: {self.exporter} exporter, opset {self.opset}, "
                 f"{'dynamic' if self.dynamic_batch else 'static'} batch"
                 + (", dynamic height and width" if self.dynamic_size else "")]
        lines.append(format_op_counts(self.op_counts_before, self.op_counts))
        if self.folded_permutations or self.moved_permutations:
            lines.append(f"channel permutations folded into weights: {self.folded_permutations}, "
                         f"moved to let affine ops fuse: {self.moved_permutations}")
        if math.isnan(self.rel_diff):
            lines.append("parity: not checked")
        else:
            batches = " and ".join(str(b) for b in dict.fromkeys(self.batch_sizes_checked))
            sizes = " and ".join("x".join(map(str, s)) for s in dict.fromkeys(self.sizes_checked))
            lines.append(f"parity vs PyTorch (onnxruntime CPU, batch {batches}" + (f", size {sizes}" if sizes else "")
                         + f"): max|diff| {self.max_abs_diff:.3g}, relative to output scale {self.rel_diff:.3g}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SimplifyStats:
    """Node counts before/after :func:`simplify` and what the permutation pass did."""

    before: dict[str, int]
    after: dict[str, int]
    folded_permutations: int
    moved_permutations: int


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, *, dynamic_batch: bool = True,
                opset: int | None = None, rtol: float = 1e-4, check: bool = True,
                exporter: str = "auto", dynamic_size: bool = False,
                metadata: Mapping[str, str] | None = None) -> ExportResult:
    """Export ``model`` (eval mode) to ONNX at ``path``, simplified and checked against onnxruntime.

    ``metadata`` is written into the file's ``metadata_props`` (onnxruntime reads it back with
    ``session.get_modelmeta().custom_metadata_map``); ``igc-convert export`` stores the converted
    model's origin there (:data:`ORIGIN_KEY`), so ``igc-convert evaluate`` can compare the file with
    its original.

    ``dynamic_size=True`` makes the input's height and width symbolic too (segmentation, detection
    backbones, image-to-image models), and parity is also checked on a larger size than the example's
    that keeps its divisibility by powers of two up to 32 (224 → 256).

    Raises :class:`ExportError` when the exporter fails (naming the op and, when found, the module)
    when onnxruntime's outputs differ from PyTorch's by more than ``rtol`` relative to the output
    scale, or when a PyTorch output is NaN/Inf everywhere (nothing to check parity against);
    :class:`ConfigError` when the input is too small for the network or not finite. On any failure an
    existing file at ``path`` is left untouched. The model's train/eval mode is restored.

    Example::

        res = export_onnx(model, "model.onnx", torch.randn(1, 3, 224, 224))
        res.rel_diff < 1e-4, res.op_counts["Conv"]
    """
    path = check_writable(path)
    if not (rtol > 0):
        raise ConfigError(f"rtol must be positive, got {rtol}")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"ONNX metadata keys and values must be strings, got {key!r}: {type(value).__name__}")
    proto, info = to_onnx_model(model, example_input, dynamic_batch=dynamic_batch, opset=opset,
                                exporter=exporter, reference=True, dynamic_size=dynamic_size)
    max_abs, rel, checked, shapes = math.nan, math.nan, (), ()
    if check:
        checked, shapes = info.batch_sizes, tuple(tuple(x.shape[2:]) for x in info.inputs)
        max_abs, rel = parity(proto, info.inputs, info.references)
        if not any(out.size for outs in info.references for out in outs):
            logger.warning("every output was empty on the example input (a detector that found nothing, say): the "
                           "parity check compared no value; check %s on inputs that give outputs", path)
        if not rel <= rtol:
            raise ExportError(f"onnxruntime outputs differ from PyTorch: max|diff| {max_abs:.3g}, relative to output "
                              f"scale {rel:.3g} > rtol {rtol:g} (input shapes {[list(x.shape) for x in info.inputs]}); "
                              f"{path} not written")
    if metadata:
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
    try:
        data = proto.SerializeToString()
    except ValueError as err:  # protobuf's 2 GiB limit
        raise ExportError(f"the ONNX model is too large for a single file ({err}); {path} not written") from err
    with atomic_write(path, "wb") as f:
        f.write(data)
    result = ExportResult(path=path, op_counts=info.stats.after, max_abs_diff=max_abs, rel_diff=rel,
                          opset=opset_of(proto), op_counts_before=info.stats.before, exporter=info.exporter,
                          dynamic_batch=dynamic_batch, batch_sizes_checked=tuple(checked),
                          folded_permutations=info.stats.folded_permutations,
                          moved_permutations=info.stats.moved_permutations, dynamic_size=dynamic_size,
                          sizes_checked=shapes)
    logger.info("wrote %s (%s exporter, opset %d, %d nodes)", path, info.exporter, result.opset,
                sum(result.op_counts.values()))
    return result


def export_pair(original: nn.Module, converted: nn.Module, out_dir: str | Path, example_input: torch.Tensor, *,
                names: tuple[str, str] = ("original.onnx", "converted.onnx"), **kwargs: Any
                ) -> tuple[ExportResult, ExportResult]:
    """Export the original and the converted model the same way, for side-by-side comparison.

    Example::

        orig, conv = export_pair(resnet, converted, "out/", torch.randn(1, 3, 224, 224))
        bench_onnx(orig.path, conv.path)
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ConfigError(f"output folder {str(out_dir)!r} does not exist")
    return (export_onnx(original, out_dir / names[0], example_input, **kwargs),
            export_onnx(converted, out_dir / names[1], example_input, **kwargs))


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`to_onnx_model` did: exporter used, node counts, and the inputs/PyTorch outputs for parity."""

    exporter: str
    stats: SimplifyStats
    batch_sizes: tuple[int, ...]
    inputs: tuple[np.ndarray, ...]
    references: tuple[tuple[np.ndarray, ...], ...]


def to_onnx_model(model: nn.Module, example_input: torch.Tensor, *, dynamic_batch: bool = True,
                  opset: int | None = None, exporter: str = "auto", reference: bool = True,
                  dynamic_size: bool = False) -> tuple[onnx.ModelProto, ExportInfo]:
    """Export to a simplified, checked, in-memory ``ModelProto`` (no file, no parity check).

    With ``reference=True`` PyTorch's outputs on the example input (for a dynamic batch, also on a
    batch one larger; for a dynamic size, on the example resized to :func:`second_size`) are
    computed first — which also turns "input too small" into a clear error — and returned for
    :func:`parity`.
    """
    require_module(model)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ConfigError("example_input must be a tensor with a batch dimension, "
                          f"got {type(example_input).__name__}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise ConfigError(f"opset must be a positive integer (or None: the exporter's), got {opset!r}")
    if dynamic_size and (example_input.dim() != 4 or not example_input.is_floating_point()):
        raise ConfigError("dynamic_size needs a float image batch N×C×H×W as example input, "
                          f"got shape {list(example_input.shape)} ({example_input.dtype})")
    if example_input.is_floating_point() and not bool(torch.isfinite(example_input).all()):
        raise ConfigError("example_input contains NaN or Inf")
    kinds = sorted({str(t.dtype).replace("torch.", "") for t in (*model.parameters(), *model.buffers())
                    if t.is_floating_point() and t.dtype != torch.float32})
    if kinds:
        # onnxruntime's CPU kernels are float32 (no bfloat16 Conv; float16 Conv off the fast path and
        # off PyTorch's numbers by more than the parity tolerance): deploy a float32 graph.
        logger.warning("exporting a float32 copy of the model (its weights are %s): onnxruntime's CPU kernels "
                       "are float32; convert the ONNX file to float16 afterwards if you need it", ", ".join(kinds))
        model = copy.deepcopy(model).float()
    device = _device_of(model)
    x = example_input.detach().to(device)
    if x.is_floating_point():
        x = x.float()
    with eval_mode(model):
        inputs, refs = [x], []
        if reference:
            refs.append(_reference(model, x))
            # An output with no finite value matches anything (NaN positions agree): parity would be a
            # vacuous 0, so refuse, and before the (slow) export.
            dead = [i for i, ref in enumerate(refs[0]) if ref.dtype.kind in "fc" and ref.size
                    and not np.isfinite(ref).any()]
            if dead:
                raise ExportError(f"PyTorch's output {dead[0]} is NaN/Inf everywhere on the example input, so "
                                  "parity cannot be checked (NaN/Inf weights, or activations that overflow)")
            if dynamic_batch:
                # A different batch size, with data that is not a copy of the first row.
                x2 = torch.cat([x, x[:1].flip(-1)])
                inputs.append(x2)
                refs.append(_reference(model, x2))
            if dynamic_size:  # the same images at another height and width
                x3 = F.interpolate(x, size=second_size(x.shape[2:]), mode="bilinear", align_corners=False)
                try:
                    refs.append(_reference(model, x3))
                except ModelError as err:
                    raise ConfigError(f"{err}; {NOT_DYNAMIC_SIZE}") from err
                inputs.append(x3)
        n_out = len(refs[0]) if refs else len(_flatten(_forward(model, x)))

    def exported(choice: str) -> tuple[ir.Model, str]:
        # A shuffle's Reshapes would need the run-time height and width (Shape, Concat, ... nodes): with a
        # dynamic size, shuffles export as one Gather of the channels instead.
        with eval_mode(model), as_gather(model) if dynamic_size else contextlib.nullcontext():
            return _export(model, x, dynamic_batch=dynamic_batch, opset=opset, exporter=choice, n_outputs=n_out,
                           dynamic_size=dynamic_size)

    raw, used = exported(exporter)
    stats = simplify(raw)
    try:
        proto = _checked_proto(raw, dynamic_size)
    except ExportError as err:
        # onnxscript's optimizer has left dangling references in some graphs with subgraphs (torchvision's
        # detection models): the exporter's own graph, exported again, is kept, correct if longer.
        proto = _checked_proto(exported(used)[0], dynamic_size)
        logger.warning("the simplified graph fails onnx.checker (%s); writing the graph as exported, "
                       "unsimplified", str(err).splitlines()[0])
        stats = SimplifyStats(stats.before, stats.before, 0, 0)
    logger.info("ONNX nodes (%s exporter): %s", used, format_op_counts(stats.before, stats.after, one_line=True))
    info = ExportInfo(exporter=used, stats=stats, batch_sizes=tuple(int(t.shape[0]) for t in inputs),
                       inputs=tuple(t.cpu().numpy() for t in inputs), references=tuple(refs))
    return proto, info


def _checked_proto(model: ir.Model, dynamic_size: bool) -> onnx.ModelProto:
    """``model`` as a ``ModelProto`` that passes ``onnx.checker`` (an :class:`ExportError` otherwise)."""
    proto = ir.to_proto(model)
    if dynamic_size:
        _name_spatial_dims(proto)
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as err:  # ValueError: over protobuf's 2 GiB
        raise ExportError(f"the exported graph fails onnx.checker: {err}") from err
    return proto


def _name_spatial_dims(proto: onnx.ModelProto) -> None:
    """Call the input's symbolic height and width ``height`` and ``width`` everywhere in the graph
    (torch.export names them ``s53``, ``s0``, ...): what a deployment reads off the input."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {d.dim_param: new for d, new in zip(dims[2:4], ("height", "width")) if d.dim_param}
    if not names:
        return
    token = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = token.sub(lambda m: names[m.group(1)], d.dim_param)


def second_size(hw: Sequence[int]) -> tuple[int, int]:
    """The height and width a dynamic-size export is also checked at: each side grown by its largest
    power-of-two divisor up to 32, so a network that needs sides divisible by 2, 4, ... 32 (U-Nets,
    FPNs) still gets them (224 → 256, 20 → 24, 15 → 16)."""
    return tuple(int(s) + min(int(s) & -int(s), 32) for s in hw)


NOT_DYNAMIC_SIZE = "the model may not allow a dynamic input size: export without dynamic_size (--dynamic-size)"


def _dynamic_hint(x: np.ndarray, example: np.ndarray) -> str:
    """Why an input other than the example may fail: the dynamic size or batch it was made for."""
    if x.shape[2:] != example.shape[2:]:
        return f"; {NOT_DYNAMIC_SIZE}"
    if x is not example:
        return "; the model may not allow a dynamic batch: export with dynamic_batch=False (--static-batch)"
    return ""


def parity(proto: onnx.ModelProto, inputs: Sequence[np.ndarray], references: Sequence[Sequence[np.ndarray]]
           ) -> tuple[float, float]:
    """``(max|a-b|, max|a-b| / max|a|)`` between onnxruntime (CPU) and the reference outputs.

    NaN/Inf in one output but not the other counts as an infinite difference.
    """
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise ExportError(f"onnxruntime cannot load the exported graph: {err}") from err
    name = sess.get_inputs()[0].name
    max_abs, rel = 0.0, 0.0
    for x, ref in zip(inputs, references):
        try:
            outs = sess.run(None, {name: x})
        except Exception as err:
            raise ExportError(f"onnxruntime fails on an input of shape {list(x.shape)}: {err}"
                              f"{_dynamic_hint(x, inputs[0])}") from err
        if len(outs) != len(ref):
            raise ExportError(f"the ONNX graph has {len(outs)} outputs, PyTorch returned {len(ref)}")
        for a, b in zip(ref, outs):
            if a.shape != b.shape:
                raise ExportError(f"output shape {list(b.shape)} from onnxruntime, {list(a.shape)} from PyTorch "
                                  f"(input shape {list(x.shape)}){_dynamic_hint(x, inputs[0])}")
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
                return math.inf, math.inf
            finite = np.isfinite(a64)
            diff = float(np.max(np.abs(a64 - b64)[finite], initial=0.0))
            scale = float(np.max(np.abs(a64[finite]), initial=0.0))
            max_abs = max(max_abs, diff)
            rel = max(rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return max_abs, rel


def op_counts(model: onnx.ModelProto | ir.Model) -> dict[str, int]:
    """Node counts by op type of the main graph, most frequent first."""
    nodes = model.graph.node if isinstance(model, onnx.ModelProto) else model.graph
    return dict(Counter(n.op_type for n in nodes).most_common())


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset version of ``model``."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def format_op_counts(before: dict[str, int], after: dict[str, int], *, one_line: bool = False) -> str:
    """Aligned table ``op  before  after`` (or one line ``Conv 20→20, Reshape 3→1, ...``)."""
    ops = sorted(set(before) | set(after), key=lambda op: (-max(before.get(op, 0), after.get(op, 0)), op))
    if one_line:
        return ", ".join(f"{op} {before.get(op, 0)}→{after.get(op, 0)}" for op in ops)
    width = max([len(op) for op in ops] + [len("total")])
    rows = [f"{'op':<{width}}  {'exported':>8}  {'simplified':>10}"]
    rows += [f"{op:<{width}}  {before.get(op, 0):>8}  {after.get(op, 0):>10}" for op in ops]
    rows.append(f"{'total':<{width}}  {sum(before.values()):>8}  {sum(after.values()):>10}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# PyTorch side: eval mode, reference outputs, export
# ---------------------------------------------------------------------------------------------

def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    raise ExportError(f"model output of type {type(out).__name__} is not a tensor, tuple, list or dict of tensors")


# PyTorch's messages when a spatial size shrinks below a kernel somewhere in the network.
_TOO_SMALL = re.compile(r"too small|can't be greater than|smaller than kernel|output size .*(negative|non-positive)"
                        r"|Given input size: .* Calculated output size", re.IGNORECASE)


def _forward(model: nn.Module, x: torch.Tensor) -> Any:
    try:
        with torch.no_grad():
            return model(x)
    except IGCError:
        raise
    except Exception as err:  # user model code can raise anything; say what input it failed on
        first = (str(err).splitlines() or [type(err).__name__])[0]
        if isinstance(err, RuntimeError) and _TOO_SMALL.search(str(err)):
            raise ConfigError(f"input size {list(x.shape)} is too small for this network (PyTorch: {first}); "
                              "use a larger input size") from err
        raise ModelError(f"the model's forward fails on an input of shape {list(x.shape)}: "
                         f"{type(err).__name__}: {first}") from err


def _reference(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, ...]:
    return tuple(t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
                 for t in _flatten(_forward(model, x)))


def _export(model: nn.Module, x: torch.Tensor, *, dynamic_batch: bool, opset: int | None, exporter: str,
            n_outputs: int, dynamic_size: bool = False) -> tuple[ir.Model, str]:
    """Run the chosen exporter(s); ``auto`` = dynamo, falling back to TorchScript."""
    names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    order = {"auto": ("dynamo", "torchscript"), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
    errors: list[tuple[str, BaseException]] = []
    for name in order:
        fn = _export_dynamo if name == "dynamo" else _export_torchscript
        try:
            model_ir = fn(model, x, dynamic_batch=dynamic_batch, opset=opset, output_names=names,
                          dynamic_size=dynamic_size)
        except (ConfigError, ModelError):
            raise
        except Exception as err:  # exporters raise many untyped errors; they are reported below
            logger.warning("%s exporter failed: %s", name, _first_line(err))
            errors.append((name, err))
            continue
        written = model_ir.opset_imports.get("", model_ir.opset_imports.get("ai.onnx"))
        if opset is not None and written != opset:
            # The dynamo exporter converts its opset-18+ graph down only where onnx's version converter
            # can, and otherwise keeps it: a file of another opset than asked is no answer.
            err = ValueError(f"it wrote opset {written}, not the opset {opset} asked for")
            logger.warning("%s exporter: %s", name, err)
            errors.append((name, err))
            continue
        if errors:
            logger.warning("exported with the %s exporter after the %s exporter failed", name, errors[0][0])
        return model_ir, name
    raise _export_error(model, x, errors)


def _export_dynamo(model: nn.Module, x: torch.Tensor, *, dynamic_batch: bool, opset: int | None,
                   output_names: list[str], dynamic_size: bool = False) -> ir.Model:
    dims = {0: torch.export.Dim("batch")} if dynamic_batch else {}
    if dynamic_size:
        # AUTO (torch >= 2.6): torch.export finds what the model needs (sides divisible by 32, ...)
        # instead of failing on it; where a side cannot vary, parity at another size says so.
        dims.update({i: getattr(torch.export.Dim, "AUTO", None) or torch.export.Dim(name)
                     for i, name in ((2, "height"), (3, "width"))})
    dynamic_shapes = (dims,) if dims else None
    if dynamic_batch and x.shape[0] == 1:
        # torch.export takes a dimension of size 1 in the example as the constant 1, and a model with a
        # check on it (circular padding, Hugging Face's ConvNeXt) then fails as "Invalid ranges [2:1]":
        # trace on two images instead (the graph is the same; parity still runs on the caller's input).
        x = torch.cat([x, x.flip(-1)])
    # torch.export logs whole tracebacks at ERROR level when it cannot trace a model; that failure is
    # ours to report, in one line (see _export).
    # torch.export also print()s the partial graph of a failed trace to stderr (dozens of lines);
    # it is kept for the debug log.
    printed = io.StringIO()
    with warnings.catch_warnings(), _quiet("onnxscript", "onnx_ir"), \
            _quiet(*_TORCH_EXPORT_LOGGERS, level=logging.CRITICAL + 1), contextlib.redirect_stderr(printed):
        warnings.simplefilter("ignore")
        # optimize=False: simplify() runs the same onnxscript optimizer plus our own pass, and the
        # raw graph gives the "before" node counts.
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False,
                                        opset_version=opset, input_names=[INPUT_NAME], output_names=output_names,
                                        dynamic_shapes=dynamic_shapes)
        finally:
            if printed.getvalue().strip():
                logger.debug("torch.export printed:\n%s", printed.getvalue())
    return program.model


def _export_torchscript(model: nn.Module, x: torch.Tensor, *, dynamic_batch: bool, opset: int | None,
                        output_names: list[str], dynamic_size: bool = False) -> ir.Model:
    buf = io.BytesIO()
    axes = {n: {0: "batch"} for n in (INPUT_NAME, *output_names)} if dynamic_batch else {}
    if dynamic_size:
        axes.setdefault(INPUT_NAME, {}).update({2: "height", 3: "width"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=output_names, dynamic_axes=axes or None, do_constant_folding=True)
    _warn_constant_trace(caught)
    return ir.from_proto(onnx.load_from_string(buf.getvalue()))


def _warn_constant_trace(caught: Sequence[warnings.WarningMessage]) -> None:
    """Say where the trace froze a tensor's value into Python control flow.

    The TorchScript exporter records only the branch the example input took: ``if x.mean() > 0`` in
    a forward becomes a constant, the parity check passes on that input, and other inputs may get
    the wrong output. The tracer says so in a ``TracerWarning`` that would otherwise be lost.
    """
    frozen = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
              and "might not generalize" in str(w.message)]
    if frozen:
        first = frozen[0]
        logger.warning("the TorchScript trace may not generalise to other inputs: %s (%s:%d%s)",
                       str(first.message).split(". ")[0], first.filename, first.lineno,
                       f"; {len(frozen) - 1} more such place(s)" if len(frozen) > 1 else "")


def _first_line(err: BaseException) -> str:
    """The informative line of an exporter error (the dynamo exporter's first line is boilerplate)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    summary = re.search(r"^<class '[\w.]+'>: (.+)$", text, re.MULTILINE)
    if summary:
        return summary.group(1).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


# "target=torch.ops.aten.histc.default" (dynamo), "operator 'aten::histc'" / "namespace igctest::twist" (TorchScript)
_OP_PATTERNS = (re.compile(r"target=torch\.ops\.([\w]+)\.([\w]+)"),
                re.compile(r"operator '([\w]+)::([\w]+)'"),
                re.compile(r"namespace ([\w]+)::([\w]+)"),
                re.compile(r"\b(aten|prims)[.:]{1,2}([a-z_][\w]*)"))


def _failing_op(errors: Iterable[BaseException]) -> str | None:
    for err in errors:
        chain, seen = [], set()
        e: BaseException | None = err
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            chain.append(str(e))
            e = e.__cause__ or e.__context__
        text = "\n".join(chain)
        for pattern in _OP_PATTERNS:
            m = pattern.search(text)
            if m:
                return f"{m.group(1)}::{m.group(2)}"
    return None


def _module_of_op(model: nn.Module, x: torch.Tensor, op: str) -> str | None:
    """Qualified name (and class) of the module calling ``op``, from a plain ``torch.export`` trace."""
    namespace, name = op.split("::")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (x,), strict=False)
    except Exception:  # the trace itself may be what fails; then we only know the op
        return None
    for node in program.graph.nodes:
        target = str(node.target)
        if node.op == "call_function" and (f"{namespace}.{name}." in target or target.endswith(f"{namespace}.{name}")):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                qualname, cls = list(stack.values())[-1]
                cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                return f"{qualname or '<root>'} ({cls_name.rsplit('.', 1)[-1]})"
    return None


def _export_error(model: nn.Module, x: torch.Tensor, errors: list[tuple[str, BaseException]]) -> ExportError:
    op = _failing_op(err for _, err in errors)
    tried = "; ".join(f"{name}: {_first_line(err)}" for name, err in errors)
    if op is None:
        return ExportError(f"ONNX export failed ({tried})")
    module = _module_of_op(model, x, op)
    where = f" in module {module}" if module else ""
    return ExportError(f"ONNX export cannot handle the op {op}{where} ({tried})")


# ---------------------------------------------------------------------------------------------
# Graph simplification
# ---------------------------------------------------------------------------------------------

def simplify(model: ir.Model) -> SimplifyStats:
    """Simplify ``model`` in place: constant folding, no-op/Identity removal, BatchNorm fusion, and
    channel permutations folded into neighbouring weights. Returns node counts before/after.

    Example::

        stats = simplify(ir.load("model.onnx")); stats.before["Identity"], stats.after.get("Identity", 0)
    """
    from onnxscript import optimizer
    from onnx_ir.passes import common as passes

    before = op_counts(model)
    with _quiet("onnxscript", "onnx_ir"):
        optimizer.optimize_ir(model)
        passes.IdentityEliminationPass()(model)
        folded, moved = fold_channel_permutations(model)
        if folded or moved:
            # Ops the pass made adjacent (a BatchNorm now right after a conv) fuse on this round.
            optimizer.optimize_ir(model)
            passes.IdentityEliminationPass()(model)
    return SimplifyStats(before=before, after=op_counts(model), folded_permutations=folded,
                         moved_permutations=moved)


#: Loggers of torch.export / dynamo that print tracebacks of a failed trace (the fallback handles it).
_TORCH_EXPORT_LOGGERS = ("torch._guards", "torch._dynamo", "torch.export", "torch.fx.experimental.symbolic_shapes",
                         "torch.onnx")


@contextlib.contextmanager
def _quiet(*names: str, level: int = logging.WARNING):
    """The optimizer logs every pass at INFO; keep the user's INFO log to our own summary."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < level:
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass
class _Permutation:
    """``y = x[:, perm]`` computed by the Reshape/Transpose ``nodes``."""

    nodes: list[ir.Node]
    x: ir.Value
    y: ir.Value
    perm: np.ndarray
    channels: int
    rank: int


# Ops that act on each channel separately with no per-channel parameter (permutation-equivariant).
_UNARY = frozenset("Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Softplus Softsign Gelu Mish "
                   "Exp Log Abs Neg Sqrt Reciprocal Erf Floor Ceil Round Sign Sin Cos Clip ThresholdedRelu".split())
_POOLS = frozenset("MaxPool AveragePool LpPool".split())
_BINARY = frozenset("Add Sub Mul Div Pow Max Min PRelu".split())
_AFFINE = frozenset("BatchNormalization InstanceNormalization Add Sub Mul Div PRelu".split())
_MAX_SIMULATED = 1 << 24  # elements of the index array used to recognise a permutation


def fold_channel_permutations(model: ir.Model) -> tuple[int, int]:
    """Remove channel permutations where a neighbour absorbs them exactly; returns ``(folded, moved)``.

    A permutation ``y = x[:, p]`` (any Reshape/Transpose chain that maps ``(N, C, …)`` back to itself
    and only reorders channels, e.g. a shuffle) commutes with per-channel ops (elementwise, pools,
    depthwise conv, BatchNorm, Add/Mul by per-channel constants — their constants get permuted), and
    a dense conv (``group=1``) absorbs it into its weights: ``W[:, p⁻¹]`` after it, ``W[p], b[p]``
    before it. When neither side reaches a dense conv, the permutation is moved forward past
    shape-preserving per-channel ops if one of them is affine, so that the optimizer can fuse it
    into the (grouped) conv before. Anything else is left as it is.
    """
    graph = model.graph
    folded = moved = 0
    taken: set[int] = set()
    for perm in _find_permutations(graph):
        if any(id(n) in taken for n in perm.nodes):
            continue
        action = _fold_forward(graph, perm) or _fold_backward(graph, perm) or _move_forward(graph, perm)
        if action:
            taken.update(id(n) for n in perm.nodes)
            folded += action == "folded"
            moved += action == "moved"
    if folded or moved:
        graph.sort()
    return folded, moved


def _static_dims(value: ir.Value) -> list[int | None] | None:
    """Dims of ``value`` with a symbolic batch as None; None unless every other dim is static."""
    if value.shape is None or len(value.shape) < 2:
        return None
    dims = [d if isinstance(d, int) else None for d in value.shape.dims]
    return dims if all(d is not None for d in dims[1:]) else None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _find_permutations(graph: ir.Graph) -> list[_Permutation]:
    found: list[_Permutation] = []
    taken: set[int] = set()
    for node in list(graph):
        if node.op_type not in ("Reshape", "Transpose") or node.domain not in ("", "ai.onnx") or id(node) in taken:
            continue
        x = node.inputs[0]
        dims = _static_dims(x)
        if dims is None:
            continue
        chain, cur = [node], node.outputs[0]
        while True:
            # Shape inference may lose the batch name after a Reshape to -1: the simulation decides.
            if len(chain) >= 2:
                perm = _simulate(chain, dims)
                if perm is not None:
                    found.append(_Permutation(chain, x, cur, perm, dims[1], len(dims)))
                    taken.update(id(n) for n in chain)
                    break
            uses = cur.uses()
            if cur.is_graph_output() or len(uses) != 1:
                break
            nxt = uses[0][0]
            if nxt.op_type not in ("Reshape", "Transpose") or nxt.domain not in ("", "ai.onnx") or uses[0][1] != 0:
                break
            chain.append(nxt)
            cur = nxt.outputs[0]
    return found


def _simulate(chain: list[ir.Node], dims: list[int | None]) -> np.ndarray | None:
    """The channel permutation ``chain`` computes, by running it on an index array; None if it is not one.

    A symbolic batch is tried at two sizes so that a chain that only works for one batch size is
    not mistaken for a permutation.
    """
    perms = []
    for n in ((2, 3) if dims[0] is None else (dims[0],)):
        shape = [n, *dims[1:]]
        size = math.prod(shape)
        if size > _MAX_SIMULATED:
            return None
        a = np.arange(size, dtype=np.int64).reshape(shape)
        for node in chain:
            a = _apply(node, a)
            if a is None:
                return None
        if list(a.shape) != shape:
            return None
        c = shape[1]
        flat, base = a.reshape(n, c, -1), np.arange(size).reshape(n, c, -1)
        perm = flat[0, :, 0] // flat.shape[2] % c
        if not np.array_equal(flat, base[:, perm, :]):
            return None
        perms.append(perm)
    return perms[0] if all(np.array_equal(p, perms[0]) for p in perms) else None


def _apply(node: ir.Node, a: np.ndarray) -> np.ndarray | None:
    if node.op_type == "Transpose":
        attr = node.attributes.get("perm")
        perm = list(attr.as_ints()) if attr is not None else list(range(a.ndim))[::-1]
        return a.transpose(perm) if sorted(perm) == list(range(a.ndim)) else None
    target = _const(node.inputs[1] if len(node.inputs) > 1 else None)
    if target is None:
        return None
    allowzero = node.attributes.get("allowzero")
    target = [int(t) for t in target.reshape(-1)]
    if not (allowzero is not None and allowzero.as_int()):
        target = [a.shape[i] if t == 0 and i < a.ndim else t for i, t in enumerate(target)]
    try:
        return a.reshape(target)
    except ValueError:
        return None


def _single_use(value: ir.Value) -> tuple[ir.Node, int] | None:
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    return uses[0][0], uses[0][1]


def _per_channel(node: ir.Node, data_index: int, channels: int, rank: int) -> list[tuple[int, int]] | None:
    """If ``node`` acts on each channel of input ``data_index`` separately, the ``(input, axis)`` of its
    per-channel constants (to be permuted along with the data); None if it does not."""
    op, n_in = node.op_type, len(node.inputs)
    if node.domain not in ("", "ai.onnx") or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None
    if op in _UNARY or op in _POOLS:
        # Clip's min/max are scalars; other inputs must be constants too.
        ok = data_index == 0 and all(v is None or _const(v) is not None for v in node.inputs[1:])
        return [] if ok else None
    if op in _BINARY and n_in == 2:
        if op == "PRelu" and data_index != 0:
            return None
        c = _const(node.inputs[1 - data_index])
        if c is None or c.ndim > rank:
            return None
        axis = c.ndim - rank + 1
        if axis < 0 or c.shape[axis] == 1:
            return []
        return [(1 - data_index, axis)] if c.shape[axis] == channels else None
    if op in ("BatchNormalization", "InstanceNormalization") and data_index == 0:
        params = range(1, n_in)
        if all((c := _const(node.inputs[i])) is not None and c.shape == (channels,) for i in params):
            return [(i, 0) for i in params]
        return None
    if op == "Conv" and data_index == 0:
        group = node.attributes.get("group")
        w = _const(node.inputs[1])
        if group is None or group.as_int() != channels or w is None or w.shape[:2] != (channels, 1):
            return None
        bias = node.inputs[2] if n_in > 2 else None
        if bias is not None and _const(bias) is None:
            return None
        return [(1, 0)] + ([(2, 0)] if bias is not None else [])
    return None


def _dense_conv(node: ir.Node, data_index: int) -> bool:
    group = node.attributes.get("group")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return (node.op_type == "Conv" and node.domain in ("", "ai.onnx") and data_index == 0
            and (group is None or group.as_int() == 1) and _const(node.inputs[1]) is not None
            and (bias is None or _const(bias) is not None))


def _permute_input(graph: ir.Graph, node: ir.Node, index: int, order: np.ndarray, axis: int) -> None:
    """Replace constant input ``index`` of ``node`` by a copy taken along ``axis`` in ``order``.

    Always a new initializer: the old one may be shared with other nodes.
    """
    old = node.inputs[index]
    data = np.ascontiguousarray(np.take(_const(old), order, axis=axis))
    base, k = f"{old.name or 'const'}_perm", 0
    while f"{base}{k}" in graph.initializers:
        k += 1
    new = ir.Value(name=f"{base}{k}", const_value=ir.tensor(data), shape=ir.Shape(data.shape), type=old.type)
    graph.register_initializer(new)
    node.replace_input_with(index, new)


def _walk_forward(perm: _Permutation) -> tuple[list[tuple[ir.Node, int, list[tuple[int, int]]]], tuple | None]:
    """Per-channel ops after ``perm.y`` (node, data input, constants) and the dense conv ending the walk."""
    path, cur = [], perm.y
    while (use := _single_use(cur)) is not None:
        node, index = use
        if _dense_conv(node, index):
            return path, (node, index)
        consts = _per_channel(node, index, perm.channels, perm.rank)
        if consts is None:
            break
        path.append((node, index, consts))
        cur = node.outputs[0]
    return path, None


def _fold_forward(graph: ir.Graph, perm: _Permutation) -> str | None:
    path, end = _walk_forward(perm)
    if end is None:
        return None
    conv, _ = end
    inverse = np.argsort(perm.perm)
    if _const(conv.inputs[1]).shape[1] != perm.channels:
        return None
    for node, _, consts in path:
        for i, axis in consts:
            _permute_input(graph, node, i, inverse, axis)
    _permute_input(graph, conv, 1, inverse, 1)
    first, index = (path[0][0], path[0][1]) if path else end
    first.replace_input_with(index, perm.x)
    graph.remove(perm.nodes, safe=True)
    return "folded"


def _fold_backward(graph: ir.Graph, perm: _Permutation) -> str | None:
    if perm.y.is_graph_output() or _single_use(perm.x) is None:
        return None
    path, cur = [], perm.x
    while True:
        producer = cur.producer()
        if producer is None or cur.is_graph_output():
            return None
        if cur is not perm.x and _single_use(cur) is None:
            return None
        index = next((i for i, v in enumerate(producer.inputs) if v is not None and _const(v) is None), None)
        if producer.op_type == "Conv" and _dense_conv(producer, 0):
            conv = producer
            break
        consts = None if index is None else _per_channel(producer, index, perm.channels, perm.rank)
        if consts is None:
            return None
        path.append((producer, consts))
        cur = producer.inputs[index]
    w = _const(conv.inputs[1])
    if w.shape[0] != perm.channels:
        return None
    for node, consts in path:
        for i, axis in consts:
            _permute_input(graph, node, i, perm.perm, axis)
    _permute_input(graph, conv, 1, perm.perm, 0)
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        _permute_input(graph, conv, 2, perm.perm, 0)
    perm.y.replace_all_uses_with(perm.x)
    graph.remove(perm.nodes, safe=True)
    return "folded"


def _move_forward(graph: ir.Graph, perm: _Permutation) -> str | None:
    path, _ = _walk_forward(perm)
    # Only shape-preserving ops (the chain's reshape sizes stay valid), never past a graph output.
    keep = []
    for node, index, consts in path:
        out = node.outputs[0]
        inp = node.inputs[index]
        if (out.is_graph_output() or out.shape is None or inp.shape is None
                or list(out.shape.dims) != list(inp.shape.dims)):
            break
        keep.append((node, index, consts))
    while keep and keep[-1][0].op_type not in _AFFINE:
        keep.pop()
    if not keep:
        return None
    inverse = np.argsort(perm.perm)
    for node, _, consts in keep:
        for i, axis in consts:
            _permute_input(graph, node, i, inverse, axis)
    first, index, _ = keep[0]
    last = keep[-1][0].outputs[0]
    first.replace_input_with(index, perm.x)
    last.replace_all_uses_with(perm.y)
    perm.nodes[0].replace_input_with(0, last)
    return "moved"
