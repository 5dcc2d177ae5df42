"""Latency measurement: alternation, medians and ratio, input shapes read from the models, file
errors, and the on-disk cache of per-module latencies. No test asserts a speed."""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from igc_convert import bench
from igc_convert.bench import (BenchResult, bench_onnx, compare_module_latency, measure_module_latency,
                               module_signature, time_alternating)
from igc_convert.errors import ConfigError, FileFormatError


def _conv_model(path, *, channels=4, out=4, batch="n", size=8, groups=1, seed=0):
    """A one-conv ONNX model written to ``path`` (batch ``"n"`` = dynamic)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, channels // groups, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=groups)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out, size, size])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.fixture()
def pair(tmp_path):
    return _conv_model(tmp_path / "a.onnx"), _conv_model(tmp_path / "b.onnx", groups=2, seed=1)


# --------------------------------------------------------------------------- alternation
def test_time_alternating_interleaves_and_times_each_call():
    calls = []
    clock = iter(range(1000))
    times = time_alternating([lambda: calls.append("a"), lambda: calls.append("b")], runs=3, warmup=2,
                             timer=lambda: float(next(clock)))
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]  # timed rounds start one later each time
    assert times == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    seen = []
    time_alternating([lambda i=i: seen.append(i) for i in range(3)], runs=3)
    assert seen == [0, 1, 2, 1, 2, 0, 2, 0, 1]


@pytest.mark.parametrize("spinning", [True, False])
def test_threads_spin_within_runs_unless_told_not_to(pair, monkeypatch, spinning):
    """By default the threads spin within a run, as in a session with onnxruntime's default options,
    and stop at its end (a pool still spinning would slow the other model's run); or never."""
    made = []
    real_session = bench._session

    def session(model_bytes, threads, **kw):
        s = real_session(model_bytes, threads, **kw)
        opts = s.get_session_options()
        made.append(tuple(opts.get_session_config_entry(k) for k in
                          ("session.intra_op.allow_spinning", "session.force_spinning_stop")))
        return s

    monkeypatch.setattr(bench, "_session", session)
    kw = {} if spinning else {"spinning": False}
    result = bench_onnx(*pair, batch_sizes=(1,), threads=1, runs=3, warmup=0, progress=False, **kw)
    expected = ("1", "1") if spinning else ("0", "0")
    assert made == [expected] * 2
    assert result.spinning is spinning and result.to_dict()["spinning"] is spinning
    assert ("threads spinning within runs" in result.table()) is spinning
    assert ("threads never spinning" in result.table()) is not spinning
    made.clear()
    bench.median_latencies([onnx.load(str(pair[0]))], np.zeros((1, 4, 8, 8), np.float32), threads=1, runs=2,
                           warmup=0, **kw)
    measure_module_latency(nn.Conv2d(4, 4, 1), (1, 4, 8, 8), threads=1, runs=1, warmup=0, use_cache=False)
    assert made == [expected, ("1", "1")]  # the planner measures the default deployment


def test_bench_alternates_sessions(pair, monkeypatch):
    """bench_onnx makes one runner per model (A then B) and must call them in turn, B first every other round."""
    order, made = [], []
    real_runner = bench._runner

    def spy(session, name, x):
        run, label = real_runner(session, name, x), "AB"[len(made) % 2]
        made.append(label)
        return lambda: (order.append(label), run())

    monkeypatch.setattr(bench, "_runner", spy)
    bench_onnx(*pair, batch_sizes=(2,), runs=4, warmup=1, progress=False)
    assert made == ["A", "B"]
    assert order == ["A", "B"] * 2 + ["B", "A", "A", "B", "B", "A"]


# --------------------------------------------------------------------------- two ONNX files
def test_bench_medians_ratio_and_table(pair):
    result = bench_onnx(*pair, batch_sizes=(1, 3), threads=1, runs=3, warmup=1, progress=False)
    assert isinstance(result, BenchResult) and result.notes == ()
    assert [r.batch_size for r in result.rows] == [1, 3]
    assert [r.input_shape for r in result.rows] == [(1, 4, 8, 8), (3, 4, 8, 8)]
    for row in result.rows:
        assert row.a_median_s > 0 and row.b_median_s > 0
        assert row.ratio == pytest.approx(row.b_median_s / row.a_median_s)
    table = result.table()
    assert "1 intra-op thread," in table and str(pair[0]) in table and str(pair[1]) in table
    # the CPU is named with onnxruntime's NCHWc block on it, which the ratios depend on
    block = bench.nchwc_block_size()
    assert f"CPU: {platform.machine()} " in table and f"NCHWc block {block or 'none'}" in table
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("batch"))
    assert len({len(line) for line in lines[header:header + 3]}) == 1  # aligned columns
    assert json.loads(json.dumps(result.to_dict()))["rows"][1]["batch_size"] == 3
    assert result.to_dict()["cpu"] == bench.cpu_description()


def test_fixed_batch_is_timed_at_its_own_size(tmp_path):
    a = _conv_model(tmp_path / "a.onnx", batch=2)
    b = _conv_model(tmp_path / "b.onnx", batch="n")
    result = bench_onnx(a, b, batch_sizes=(1, 32), runs=2, warmup=0, progress=False)
    assert [r.batch_size for r in result.rows] == [2]
    assert any("fixed batch size of 2" in n for n in result.notes)
    assert "note:" in result.table()


def test_dynamic_spatial_size_needs_input_size(tmp_path):
    a = _conv_model(tmp_path / "a.onnx", size="h")
    b = _conv_model(tmp_path / "b.onnx", size="h")
    with pytest.raises(ConfigError, match="give an input size"):
        bench_onnx(a, b, runs=1, progress=False)
    result = bench_onnx(a, b, batch_sizes=(1,), input_size=6, runs=1, warmup=0, progress=False)
    assert result.rows[0].input_shape == (1, 4, 6, 6)


@pytest.mark.parametrize("kind", ["missing", "text", "garbage", "empty-proto"])
def test_not_onnx_is_file_format_error(pair, tmp_path, kind):
    bad = tmp_path / f"{kind}.onnx"
    if kind == "text":
        bad.write_text("this is not a model\n")
    elif kind == "garbage":
        bad.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty-proto":
        bad.write_bytes(onnx.ModelProto().SerializeToString())
    with pytest.raises(FileFormatError, match=kind if kind == "missing" else "not an ONNX model|does not exist"):
        bench_onnx(pair[0], bad, runs=1, progress=False)


def test_different_inputs_are_refused(tmp_path):
    a = _conv_model(tmp_path / "a.onnx", channels=4)
    b = _conv_model(tmp_path / "b.onnx", channels=8)
    with pytest.raises(ConfigError, match="different inputs"):
        bench_onnx(a, b, runs=1, progress=False)


@pytest.mark.parametrize("kwargs", [dict(threads=0), dict(runs=0), dict(warmup=-1), dict(batch_sizes=(0,))],
                         ids=["threads", "runs", "warmup", "batch"])
def test_bad_settings(pair, kwargs):
    with pytest.raises(ConfigError):
        bench_onnx(*pair, progress=False, **kwargs)


# --------------------------------------------------------------------------- modules and the cache
def test_measure_module_latency_caches(tmp_path, monkeypatch):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    first = measure_module_latency(conv, (1, 8, 8, 8), threads=1, runs=3, warmup=1, cache_dir=tmp_path)
    assert first > 0
    data = json.loads((tmp_path / "latency.json").read_text())
    (entry_key,) = data["entries"]
    assert entry_key.startswith(module_signature(conv, (1, 8, 8, 8))) and "threads=1" in entry_key

    def no_timing(*args, **kwargs):
        raise AssertionError("a cache hit must not time again")

    monkeypatch.setattr(bench, "median_latencies", no_timing)
    monkeypatch.setattr(bench, "_module_proto", no_timing)
    # Same structure, other weights: same signature, so a hit.
    assert measure_module_latency(nn.Conv2d(8, 8, 3, padding=1), (1, 8, 8, 8), threads=1,
                                  cache_dir=tmp_path) == first


def test_cache_key_separates_threads_shapes_and_keys(tmp_path, monkeypatch):
    timed = []

    def fake(protos, x, *, threads, runs, warmup):
        timed.append((threads, x.shape))
        return [0.001 * len(timed)]

    monkeypatch.setattr(bench, "median_latencies", fake)
    conv = nn.Conv2d(4, 4, 1)

    def measure(shape=(1, 4, 4, 4), **kw):
        return measure_module_latency(conv, shape, cache_dir=tmp_path, **kw)

    assert measure(threads=1) == pytest.approx(0.001)
    assert measure(threads=2) == pytest.approx(0.002)
    assert measure(threads=1, shape=(1, 4, 6, 6)) == pytest.approx(0.003)
    assert measure(threads=1, key="my-layer") == pytest.approx(0.004)
    assert measure(threads=1, key="my-layer") == pytest.approx(0.004)  # hit
    assert measure(threads=1) == pytest.approx(0.001)  # hit
    assert measure(threads=1, use_cache=False) == pytest.approx(0.005)
    assert len(timed) == 5


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, monkeypatch):
    (tmp_path / "latency.json").write_text("{not json")
    monkeypatch.setattr(bench, "median_latencies", lambda *a, **k: [0.25])
    assert measure_module_latency(nn.Conv2d(2, 2, 1), (1, 2, 4, 4), cache_dir=tmp_path) == 0.25
    assert json.loads((tmp_path / "latency.json").read_text())["version"] == bench.CACHE_VERSION


def test_signature_depends_on_structure_not_values():
    a, b = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
    assert module_signature(a, (1, 8, 8, 8)) == module_signature(b, (1, 8, 8, 8))
    assert module_signature(a, (1, 8, 8, 8)) != module_signature(nn.Conv2d(8, 8, 3, groups=2), (1, 8, 8, 8))
    assert module_signature(a, (1, 8, 8, 8)) != module_signature(a, (2, 8, 8, 8))


def test_compare_module_latency_dense_vs_block():
    from igc_convert.blocks import IGCV1

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    block = IGCV1.from_conv(conv, primary_groups=2, secondary_groups=2, rank=2)
    result = compare_module_latency(conv, block, (1, 16, 8, 8), threads=1, runs=3, warmup=1)
    assert result.a_seconds > 0 and result.b_seconds > 0
    assert result.ratio == pytest.approx(result.b_seconds / result.a_seconds)


@pytest.mark.parametrize("shape", [(8,), (1, 0, 4, 4), "abc"], ids=["no-channels", "zero", "not-ints"])
def test_bad_input_shape(shape):
    with pytest.raises(ConfigError):
        measure_module_latency(nn.Conv2d(8, 8, 1), shape, use_cache=False)


# --------------------------------------------------------------------------- CLI
def _cli(argv):
    from igc_convert.cli import bench as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_cli_bench(pair, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert _cli([str(pair[0]), str(pair[1]), "--batch-size", "1", "2", "--threads", "1", "--runs", "2",
                 "--warmup", "0", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "B/A" in out and "1 intra-op thread" in out and "threads spinning within runs" in out
    assert [r["batch_size"] for r in json.loads(out_json.read_text())["rows"]] == [1, 2]
    assert _cli([str(pair[0]), str(pair[1]), "--batch-size", "1", "--threads", "1", "--runs", "2", "--no-spinning",
                 "--json", str(out_json)]) == 0
    assert "threads never spinning" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["spinning"] is False


def test_cli_bench_missing_file(pair, tmp_path):
    with pytest.raises(FileFormatError):
        _cli([str(pair[0]), str(tmp_path / "nope.onnx")])


# ------------------------------------------------------------------------- NCHWc block of this CPU
def _nchwc_convs(module: nn.Module, shape) -> tuple[int, int]:
    """(NCHWc convs, all convs) in onnxruntime's optimised graph of ``module`` exported at ``shape``."""
    from igc_convert.export import to_onnx_model

    proto, _ = to_onnx_model(module.eval(), torch.randn(*shape), dynamic_batch=False, reference=False)
    convs = [n for n in bench.onnxruntime_optimised(proto).graph.node if n.op_type in ("Conv", "FusedConv")]
    return sum(map(bench.is_nchwc_conv, convs)), len(convs)


def test_nchwc_block_size_is_what_onnxruntime_rewrites():
    """The probe's answer is real: an IGCV1 block whose groups hold multiples of the block runs
    entirely in NCHWc; one with half the block per group (AVX-512) does not."""
    from igc_convert.blocks import IGCV1

    block = bench.nchwc_block_size()
    assert block in (None, 8, 16)
    assert bench.nchwc_block_size() == block  # cached
    assert f"/nchwc={block or 0}/" in bench.machine_fingerprint(2)
    if block is None:
        pytest.skip("onnxruntime has no NCHWc kernels on this CPU")
    on_path = IGCV1(4 * block, 4 * block, 3, padding=1, primary_groups=2, secondary_groups=2, rank=block)
    assert _nchwc_convs(on_path, (1, 4 * block, 8, 8)) == (2, 2)
    if block == 16:
        off_path = IGCV1(64, 64, 3, padding=1, primary_groups=2, secondary_groups=1, rank=8)  # 8 per group
        nchwc, total = _nchwc_convs(off_path, (1, 64, 8, 8))
        assert total == 2 and nchwc < 2
