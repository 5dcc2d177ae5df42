"""Latency in onnxruntime: two ONNX files side by side, and single modules for the planner.

Absolute times are noise on shared machines; ratios measured side by side are not. So every
comparison here runs its two models ALTERNATELY (A, B, then B, A, …) in one process, with the same input,
the same thread settings (``intra_op_num_threads=threads``, one inter-op thread, sequential
execution), and reports medians and the ratio B/A.

Spinning: by default onnxruntime's worker threads spin between the parallel sections of a run, as
in a session made with its default options, and stop at the end of each run
(``session.force_spinning_stop``): a pool left spinning after its run would steal the cores from the
other model's run. ``spinning=False`` turns spinning off altogether (for sessions that share their
cores with other work): every parallel section then wakes the threads, which costs a graph of many
small nodes more than one of a few large ones.

``measure_module_latency`` exports one module to ONNX in memory (static shapes), times it and caches
the median on disk, keyed by the module's structure, the input shape, the machine and the thread
count, so a plan over many layers is measured once per machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, ExportError, FileFormatError, ModelError
from .files import atomic_write

logger = logging.getLogger(__name__)

#: 2: timings with spinning threads (1: without).
CACHE_VERSION = 2


@dataclass(frozen=True)
class BenchRow:
    """One batch size of :class:`BenchResult`: medians in seconds and the ratio ``b / a``."""

    batch_size: int
    input_shape: tuple[int, ...]
    a_median_s: float
    b_median_s: float
    ratio: float


@dataclass(frozen=True)
class BenchResult:
    """Side-by-side latency of two ONNX files (``ratio`` = B/A: below 1 means B is faster)."""

    a_path: str
    b_path: str
    threads: int
    runs: int
    warmup: int
    rows: tuple[BenchRow, ...]
    notes: tuple[str, ...] = ()
    onnxruntime_version: str = ""
    #: The machine the times were taken on (:func:`cpu_description`): the ratios depend on it.
    cpu: str = ""
    #: onnxruntime's worker threads spin within a run (its default); False: they never spin.
    spinning: bool = True

    def table(self) -> str:
        """Aligned text table, with the settings the numbers depend on.

        Example::

            print(bench_onnx("original.onnx", "converted.onnx").table())
        """
        head = [f"onnxruntime {self.onnxruntime_version} CPUExecutionProvider, {self.threads} intra-op thread"
                f"{'s' if self.threads != 1 else ''}, 1 inter-op thread, sequential; median of {self.runs} "
                f"alternating runs (A, B, B, A, A, B, ...), {threads_setting(self.spinning)}, after {self.warmup} "
                f"warm-up",
                *([f"CPU: {self.cpu}"] if self.cpu else []), f"A = {self.a_path}", f"B = {self.b_path}"]
        cols = ("batch", "input", "A median (ms)", "B median (ms)", "B/A")
        cells = [(str(r.batch_size), "x".join(map(str, r.input_shape[1:])), f"{r.a_median_s * 1e3:.3f}",
                  f"{r.b_median_s * 1e3:.3f}", f"{r.ratio:.3f}") for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        fmt = lambda row: "  ".join(  # noqa: E731
            cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        lines = head + ["", fmt(cols)] + [fmt(row) for row in cells]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for reports)."""
        return {"a": self.a_path, "b": self.b_path, "threads": self.threads, "runs": self.runs,
                "warmup": self.warmup, "spinning": self.spinning, "onnxruntime": self.onnxruntime_version,
                "cpu": self.cpu,
                "notes": list(self.notes),
                "rows": [{"batch_size": r.batch_size, "input_shape": list(r.input_shape), "a_median_s": r.a_median_s,
                          "b_median_s": r.b_median_s, "ratio": r.ratio} for r in self.rows]}


def threads_setting(spinning: bool) -> str:
    """How the timed sessions' worker threads behave, in words (module docstring)."""
    return "threads spinning within runs (onnxruntime's default)" if spinning else "threads never spinning"


@dataclass(frozen=True)
class ModuleComparison:
    """:func:`compare_module_latency`: medians in seconds, ``ratio = b / a`` (below 1: ``b`` is faster)."""

    a_seconds: float
    b_seconds: float
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", self.b_seconds / self.a_seconds if self.a_seconds > 0 else math.inf)


# ---------------------------------------------------------------------------------------------
# Two ONNX files
# ---------------------------------------------------------------------------------------------

def bench_onnx(a_path: str | os.PathLike, b_path: str | os.PathLike, *, batch_sizes: Sequence[int] = (1, 32),
               threads: int = 2, runs: int = 20, warmup: int = 3, input_size: int | Sequence[int] | None = None,
               progress: bool = True, seed: int = 0, spinning: bool = True) -> BenchResult:
    """Median onnxruntime latency of A and B per batch size, runs alternating A, B, B, A, ...

    ``spinning=False`` times the models with onnxruntime's worker threads never spinning (module
    docstring), as sessions that share their cores are often set up.

    The input shape is read from the models; a dynamic batch takes each of ``batch_sizes``, a fixed
    batch only its own size (said in ``notes``); dynamic spatial dims need ``input_size`` (``224`` or
    ``(h, w)``). Raises :class:`FileFormatError` for a missing or non-ONNX file, :class:`ConfigError`
    when the two inputs cannot be made the same.

    Example::

        print(bench_onnx("original.onnx", "converted.onnx", batch_sizes=(1, 32), threads=2).table())
    """
    _check_settings(threads, runs, warmup)
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    models = [_load_onnx(p) for p in (a_path, b_path)]
    specs = [_input_spec(m, p) for m, p in zip(models, (a_path, b_path))]
    dims, notes = _common_dims(specs, input_size)
    if dims[0] is not None:
        if set(batch_sizes) != {dims[0]}:
            notes.append(f"the models have a fixed batch size of {dims[0]}: timed at batch {dims[0]} only")
        batch_sizes = (dims[0],)
    sessions = [_session(m.SerializeToString(), threads, spinning=spinning) for m in models]
    names = [s.get_inputs()[0].name for s in sessions]
    rng = np.random.default_rng(seed)
    rows = []
    bar = tqdm(total=len(batch_sizes) * (runs + warmup), desc="bench A/B", unit="pair", disable=not progress,
               leave=False)
    with bar:
        for batch in batch_sizes:
            shape = (batch, *dims[1:])
            x = rng.standard_normal(shape).astype(specs[0][2])
            fns = [_runner(s, n, x) for s, n in zip(sessions, names)]
            times = time_alternating(fns, runs=runs, warmup=warmup, on_round=bar.update)
            a, b = (statistics.median(t) for t in times)
            rows.append(BenchRow(batch, shape, a, b, b / a if a > 0 else math.inf))
            logger.debug("batch %d: A %.3f ms, B %.3f ms", batch, a * 1e3, b * 1e3)
    import onnxruntime as ort

    return BenchResult(str(a_path), str(b_path), threads, runs, warmup, tuple(rows), tuple(notes), ort.__version__,
                       cpu_description(), spinning)


def time_alternating(fns: Sequence[Callable[[], object]], *, runs: int, warmup: int = 0,
                     timer: Callable[[], float] = time.perf_counter,
                     on_round: Callable[[int], object] | None = None) -> list[list[float]]:
    """Call ``fns`` in turn, ``warmup`` untimed then ``runs`` timed rounds, each round starting one
    function later (f0 f1 f2, f1 f2 f0, f2 f0 f1, …).

    Returns one list of ``runs`` durations per function: interleaving makes machine noise hit all
    of them alike, which is what makes their ratio meaningful, and the rotation spreads whatever
    the first call of a round pays (caches, waking threads) over all of them.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
        if on_round:
            on_round(1)
    times: list[list[float]] = [[] for _ in fns]
    n = len(fns)
    for r in range(runs):
        for i in (*range(r % n, n), *range(r % n)) if n else ():
            start = timer()
            fns[i]()
            times[i].append(timer() - start)
        if on_round:
            on_round(1)
    return times


def _check_settings(threads: int, runs: int, warmup: int) -> None:
    if int(threads) < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if int(runs) < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    if int(warmup) < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")


def _load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"an ONNX model path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{str(path)!r} does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        if not model.graph.node or not model.opset_import:
            raise ValueError("no graph")
    except Exception as err:  # protobuf's DecodeError and friends
        raise FileFormatError(f"{str(path)!r} is not an ONNX model ({type(err).__name__}: {err})") from err
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        model = onnx.load(str(path))  # weights stored next to it
    return model


_NP_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
              onnx.TensorProto.DOUBLE: np.float64}


def _input_spec(model: onnx.ModelProto, path: Any) -> tuple[str, list[int | None], type]:
    """``(name, dims with None for symbolic, numpy dtype)`` of the model's single real input."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConfigError(f"{path}: expected one input, found {len(inputs)} ({[i.name for i in inputs]})")
    tt = inputs[0].type.tensor_type
    if tt.elem_type not in _NP_DTYPES:
        kind = onnx.TensorProto.DataType.Name(tt.elem_type)
        raise ConfigError(f"{path}: input element type {kind} is not a float type")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if len(dims) < 2:
        raise ConfigError(f"{path}: input rank {len(dims)}; expected (batch, channels, ...)")
    return inputs[0].name, dims, _NP_DTYPES[tt.elem_type]


def _common_dims(specs: list[tuple[str, list[int | None], type]], input_size: int | Sequence[int] | None
                 ) -> tuple[list[int | None], list[str]]:
    """One input shape for both models (batch may stay None = dynamic)."""
    notes: list[str] = []
    size = None if input_size is None else ([int(input_size)] * 2 if isinstance(input_size, int)
                                            else [int(s) for s in input_size])
    resolved = []
    for _, dims, _ in specs:
        dims = list(dims)
        spatial = dims[2:]
        if size is not None and spatial:
            if len(size) != len(spatial):
                raise ConfigError(f"--input-size {size} does not match the {len(spatial)} spatial dims of the input")
            for i, (d, s) in enumerate(zip(spatial, size)):
                if d is not None and d != s:
                    raise ConfigError(f"the model's input is fixed at {'x'.join(map(str, spatial))}; "
                                      f"input size {'x'.join(map(str, size))} cannot be used")
                spatial[i] = s
        if dims[1] is None or any(d is None for d in spatial):
            raise ConfigError(f"the model's input shape {['?' if d is None else d for d in dims]} has dynamic "
                              "channel or spatial dims: give an input size")
        resolved.append([dims[0], dims[1], *spatial])
    a, b = resolved
    if a[1:] != b[1:]:
        raise ConfigError(f"the two models take different inputs: {a[1:]} vs {b[1:]}")
    if a[0] is not None and b[0] is not None and a[0] != b[0]:
        raise ConfigError(f"the two models have different fixed batch sizes: {a[0]} vs {b[0]}")
    return [a[0] if a[0] is not None else b[0], *a[1:]], notes


def _session(model_bytes: bytes, threads: int, *, spinning: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # Alternating sessions share the cores: a pool still spinning after its run would slow the other
    # one's. On a 2-core AMD EPYC (Zen 3) a run right after the other session's took 1.7-2.1x its time
    # alone (ResNet-50 and its conversion at 0.26 of the MACs, batch 1); stopped at the end of each
    # run, the alternating medians matched those of each session run on its own, within the noise.
    opts.add_session_config_entry("session.force_spinning_stop", "1" if spinning else "0")
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's errors are untyped
        raise ModelError(f"onnxruntime cannot load the model: {err}") from err


def _runner(session, name: str, x: np.ndarray) -> Callable[[], object]:
    feed = {name: x}

    def run() -> object:
        try:
            return session.run(None, feed)
        except Exception as err:
            raise ModelError(f"onnxruntime fails on an input of shape {list(x.shape)}: {err}") from err

    return run


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, as a module that takes image batches and returns
    the graph's first output: for scoring an exported model on data (``igc-convert evaluate``).

    A graph with a fixed batch size is run in chunks of that size (the last one padded). ``origin``
    and ``params_ratio`` are what ``igc-convert export`` wrote into the file about the converted
    model (``None`` for other files).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        from .export import ORIGIN_KEY, PARAMS_RATIO_KEY

        proto = _load_onnx(path)
        self.path = str(path)
        self.input_name, self.dims, self.np_dtype = _input_spec(proto, path)
        self.session = _session(proto.SerializeToString(), threads or torch.get_num_threads())
        props = {p.key: p.value for p in proto.metadata_props}
        self.origin: dict | None = None
        self.params_ratio: float | None = None
        try:
            if ORIGIN_KEY in props:
                origin = json.loads(props[ORIGIN_KEY])
                self.origin = origin if isinstance(origin, dict) else None
            if PARAMS_RATIO_KEY in props:
                self.params_ratio = float(props[PARAMS_RATIO_KEY])
        except ValueError:
            pass
        if ORIGIN_KEY in props and self.origin is None:
            logger.warning("%s: its %s metadata is not a JSON object; the file is scored without it", path,
                           ORIGIN_KEY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().astype(self.np_dtype)
        fixed = self.dims[0]
        chunks = [arr] if fixed is None else [arr[i:i + fixed] for i in range(0, len(arr), fixed)]
        outs = []
        for chunk in chunks:
            n = len(chunk)
            if fixed is not None and n < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
            outs.append(_runner(self.session, self.input_name, chunk)()[0][:n])
        return torch.from_numpy(np.concatenate(outs)).float()


# ---------------------------------------------------------------------------------------------
# Modules (for the planner)
# ---------------------------------------------------------------------------------------------

def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/igc-convert/latency.json`` (``~/.cache/igc-convert/latency.json``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "igc-convert" / "latency.json"


#: The operator domain of onnxruntime's NCHWc kernels.
NCHWC_DOMAIN = "com.microsoft.nchwc"


def machine_fingerprint(threads: int) -> str:
    """What a latency depends on besides the module: CPU, core count, onnxruntime version, threads.

    The NCHWc block size is in it too: CPUs sold under one model name (e.g. "AMD EPYC" in a VM)
    differ in it, and it decides which grouped convs take onnxruntime's fast path.
    """
    import onnxruntime as ort

    return (f"{platform.system()}/{platform.machine()}/{_cpu_name()}/cpus={os.cpu_count()}"
            f"/ort={ort.__version__}/nchwc={nchwc_block_size() or 0}/threads={int(threads)}")


@functools.lru_cache(maxsize=None)
def nchwc_block_size() -> int | None:
    """Channel block of onnxruntime's NCHWc kernels on this CPU (8 with AVX2, 16 with AVX-512), or ``None``.

    onnxruntime's CPU provider rewrites a grouped conv into its blocked NCHWc layout only when the
    channels of every group are a multiple of this block (``MlasNchwcGetBlockSize``); other grouped
    convs fall back to a slower path and force layout reorders around them. Measured, not guessed
    from CPU flags: a one-conv model per candidate block is optimised by onnxruntime itself and the
    result inspected. ``None`` when no candidate is rewritten (e.g. on ARM, where MLAS has no NCHWc).
    """
    from onnx import TensorProto, helper, numpy_helper

    for block in (8, 16):
        c = 2 * block  # two groups of `block` channels each, in and out
        w = numpy_helper.from_array(np.zeros((c, block, 1, 1), np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], group=2)], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], [w])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        proto.ir_version = 8
        try:
            optimised = onnxruntime_optimised(proto)
        except Exception as err:  # onnxruntime's errors are untyped; no answer is not fatal
            logger.debug("NCHWc probe failed: %s", err)
            return None
        if any(is_nchwc_conv(n) for n in optimised.graph.node):
            return block
    return None


def is_nchwc_conv(node: onnx.NodeProto) -> bool:
    """Whether ``node`` of an onnxruntime-optimised graph is a conv in the blocked NCHWc layout."""
    return node.op_type == "Conv" and node.domain == NCHWC_DOMAIN


def onnxruntime_optimised(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs for ``proto`` (every optimisation level on)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "optimised.onnx")
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def cpu_description() -> str:
    """The CPU as latency figures need it named: model, cores, and onnxruntime's NCHWc block on it.

    CPUs sold under one model name differ in what decides the ratios (an "AMD EPYC" with AVX-512 runs
    onnxruntime's NCHWc kernels in blocks of 16, one without in blocks of 8), so the block is named too.
    """
    block = nchwc_block_size()
    return (f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores, onnxruntime NCHWc block "
            f"{block if block else 'none'}")


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def module_signature(module: nn.Module, input_shape: Sequence[int]) -> str:
    """Hash of a module's structure (types, hyper-parameters, parameter shapes; not values) and input shape."""
    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}\n".encode())
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
    h.update(f"input={tuple(int(s) for s in input_shape)}".encode())
    return h.hexdigest()[:24]


def measure_module_latency(module: nn.Module, input_shape: Sequence[int], *, threads: int = 2, runs: int = 20,
                           warmup: int = 3, cache_dir: str | os.PathLike | None = None, key: str | None = None,
                           use_cache: bool = True, seed: int = 0) -> float:
    """Median onnxruntime latency (seconds) of ``module`` alone on an input of ``input_shape``.

    Cached in ``cache_dir/latency.json`` (default :func:`default_cache_path`) under
    ``(key or module_signature(module, input_shape), machine_fingerprint(threads))``.

    Example::

        measure_module_latency(nn.Conv2d(64, 64, 3, padding=1), (1, 64, 56, 56), threads=2)  # seconds
    """
    _check_settings(threads, runs, warmup)
    shape = _check_shape(input_shape)
    cache = _cache_file(cache_dir)
    entry = f"{key or module_signature(module, shape)}|{machine_fingerprint(threads)}"
    if use_cache:
        hit = _cache_read(cache).get(entry)
        if hit is not None:
            logger.debug("latency cache hit for %s", entry)
            return float(hit["seconds"])
    proto = _module_proto(module, shape, seed)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    (seconds,) = median_latencies([proto], x, threads=threads, runs=runs, warmup=warmup)
    if use_cache:
        _cache_put(cache, entry, {"seconds": seconds, "runs": runs, "module": type(module).__name__,
                                  "input_shape": list(shape), "when": datetime.now(timezone.utc).isoformat()})
    return seconds


def compare_module_latency(a: nn.Module, b: nn.Module, input_shape: Sequence[int], *, threads: int = 2,
                           runs: int = 20, warmup: int = 3, seed: int = 0) -> ModuleComparison:
    """Time ``a`` and ``b`` side by side (alternating runs, same input): is ``b`` faster than ``a``?

    Not cached: the answer is a ratio measured in one run, which is what makes it trustworthy.

    Example::

        compare_module_latency(dense_conv, IGCV1.from_conv(dense_conv, ...), (1, 64, 56, 56)).ratio < 1
    """
    _check_settings(threads, runs, warmup)
    shape = _check_shape(input_shape)
    protos = [_module_proto(m, shape, seed) for m in (a, b)]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ta, tb = median_latencies(protos, x, threads=threads, runs=runs, warmup=warmup)
    return ModuleComparison(ta, tb)


def median_latencies(protos: Sequence[onnx.ModelProto], x: np.ndarray, *, threads: int, runs: int,
                     warmup: int, spinning: bool = True) -> list[float]:
    """Median seconds per model, all timed in alternation on the same input (``spinning``: as in
    :func:`bench_onnx`)."""
    sessions = [_session(p.SerializeToString(), threads, spinning=spinning) for p in protos]
    fns = [_runner(s, s.get_inputs()[0].name, x) for s in sessions]
    return [statistics.median(t) for t in time_alternating(fns, runs=runs, warmup=warmup)]


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"input_shape must be a sequence of ints, got {input_shape!r}") from err
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (batch, channels, ...) with positive sizes, got {list(shape)}")
    return shape


def _module_proto(module: nn.Module, shape: tuple[int, ...], seed: int) -> onnx.ModelProto:
    """Static-shape, simplified ONNX of one module; TorchScript first (fast), dynamo if it fails."""
    from .export import to_onnx_model

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    try:
        proto, _ = to_onnx_model(module, x, dynamic_batch=False, exporter="torchscript", reference=False)
    except ExportError:
        proto, _ = to_onnx_model(module, x, dynamic_batch=False, exporter="dynamo", reference=False)
    return proto


def _cache_file(cache_dir: str | os.PathLike | None) -> Path:
    return default_cache_path() if cache_dir is None else Path(cache_dir) / "latency.json"


def _cache_read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable latency cache %s (%s); it will be rewritten", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        logger.warning("ignoring latency cache %s of another format; it will be rewritten", path)
        return {}
    return data["entries"]


def _cache_put(path: Path, key: str, value: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _cache_read(path)  # re-read: another process may have added entries meanwhile
        entries[key] = value
        with atomic_write(path, "w") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
    except (OSError, FileFormatError) as err:
        # A read-only cache folder must not stop the planner: the measurement is still returned.
        logger.warning("could not write latency cache %s: %s", path, err)
