"""The torchvision zoo: does every classification model convert?

Every model of ``torchvision.models.list_models(module=torchvision.models)`` is built with random
weights (seeded, eval mode) and run on a small random input, then checked twice:

1. **lossless** — every convertible conv (plain ``Conv2d``, ``groups=1``, zero padding) is swapped by
   ``apply_plan(..., fit=True)`` for a full-rank IGCV1 block (``L = M = 1``,
   ``rank = min(C_out, C_in·kh·kw)``), which reproduces any dense conv exactly: the model's outputs
   must equal the original's, ``max|Δ| ≤ 1e-4 · max|y|`` (float32).
2. **compression** — ``convert(model, ParamsRatio(0.5), example_inputs=x)``: the output shape is
   unchanged and the conv parameters are at most 0.5 × the original's. Where the project says 0.5 is
   unreachable (convs that cannot be converted keep their size), the next of ``FALLBACK_RATIOS``.

The script runs each model in a fresh process with a wall-clock limit (``--timeout``); a model over
it, or over ``--max-params`` (memory of a shared machine), is recorded as skipped with the reason.
``zoo_row`` is the per-model check; ``tests/test_zoo.py`` imports it from here.

Usage::

    python3 benchmarks/zoo.py --out docs/results/zoo.md              # the full zoo
    python3 benchmarks/zoo.py --models subset                         # the default test's subset
    python3 benchmarks/zoo.py --models resnet50 vit_b_16 --timeout 600
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torchvision
from torch import nn
from tqdm import tqdm

from igc_convert.blocks import check_convertible
from igc_convert.convert import ConvSite, apply_plan, convert, find_convs
from igc_convert.errors import ConfigError, IGCError, UnsupportedLayerError
from igc_convert.files import atomic_write, check_writable
from igc_convert.plan import ParamsRatio

log = logging.getLogger(__name__)

#: Lossless tolerance: max |converted − original| over max |original|, float32 outputs.
TOLERANCE = 1e-4
#: Compression targets tried in order; the next is used only where the previous is unreachable.
FALLBACK_RATIOS = (0.5, 0.75, 0.9)
DEFAULT_INPUT = 64
#: One model per family, cheap enough for the default test run: 36 s of CPU in all (1 thread),
#: resnet18 the dearest at 9 s. ViT (a single patch conv) is left to the full zoo: 5 s, mostly its build.
SUBSET = ("resnet18", "regnet_x_400mf", "densenet121", "googlenet", "convnext_tiny", "efficientnet_b0",
          "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_1")


@dataclass(frozen=True)
class Setup:
    """How one model is built and fed: input side, builder kwargs, and why they differ from the default."""

    input_size: int = DEFAULT_INPUT
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def model_setup(name: str) -> Setup:
    """The smallest input (and builder kwargs) that ``name`` accepts.

    >>> model_setup("inception_v3").input_size
    75
    """
    if name in ("googlenet", "inception_v3"):
        # aux heads only run in training; pretrained inference models are built without them
        return Setup(75 if name == "inception_v3" else DEFAULT_INPUT, dict(aux_logits=False, init_weights=True),
                     "aux_logits=False" + ("; 75 px is its minimum input" if name == "inception_v3" else ""))
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        # ViT checks the input against image_size; 2x2 patches keep it small, the patch conv unchanged
        return Setup(2 * patch, dict(image_size=2 * patch), f"image_size={2 * patch} (2x2 patches)")
    if name.startswith("maxvit"):
        return Setup(224, {}, "224 px: its windows need a multiple of 224")
    return Setup()


# ------------------------------------------------------------------------------------------ checks
def lossless_plan(sites: Sequence[ConvSite]) -> list[dict[str, Any]]:
    """A plan with a full-rank IGCV1 (exact) for every convertible conv among ``sites``.

    >>> from torch import nn
    >>> lossless_plan([ConvSite("c", nn.Conv2d(4, 8, 3))])[0]["shape"]
    {'primary_groups': 1, 'secondary_groups': 1, 'rank': 8}
    """
    plan = []
    for s in sites:
        try:
            check_convertible(s.module, s.name)
        except UnsupportedLayerError:
            continue
        c = s.module
        rank = min(c.out_channels, c.in_channels * math.prod(c.kernel_size))
        plan.append(dict(name=s.name, block="igcv1", shape=dict(primary_groups=1, secondary_groups=1, rank=rank)))
    return plan


def _output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    if not isinstance(y, torch.Tensor):  # e.g. a namedtuple of logits and aux logits
        y = y[0]
    return y


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zoo_row(name: str, *, input_size: int | None = None, ratio: float = FALLBACK_RATIOS[0], seed: int = 0,
            ) -> dict[str, Any]:
    """Build ``name`` with random weights and run both checks; returns one row of the zoo table.

    ``status`` is ``"ok"`` when both checks ran (see :func:`problems` for whether they passed) or
    ``"skipped"`` with a ``reason``. ``ratio`` falls back along ``FALLBACK_RATIOS`` when unreachable.

    >>> row = zoo_row("squeezenet1_1")  # doctest: +SKIP
    >>> row["lossless_error"] < TOLERANCE and row["params_ratio"] <= 0.5
    True
    """
    start = time.perf_counter()
    setup = model_setup(name)
    size = input_size or setup.input_size
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **setup.kwargs).eval()
    note = setup.note
    # ViT zero-initialises its head: all-zero logits would make the lossless comparison vacuous
    zero_heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not m.weight.any()]
    for head in zero_heads:
        nn.init.normal_(model.get_submodule(head).weight, std=0.02)
    if zero_heads:
        note = "; ".join(filter(None, [note, f"zero-initialised {', '.join(zero_heads)} redrawn (std 0.02)"]))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    y = _output(model, x)
    sites, path, path_reason = find_convs(model)
    row: dict[str, Any] = dict(model=name, input=size, note=note, status="ok", reason="", path=path,
                               path_reason=path_reason, convs=len(sites), params=_params(model))
    plan = lossless_plan(sites)
    if not plan:
        row.update(status="skipped", reason="no convertible Conv2d (all grouped or custom)",
                   seconds=time.perf_counter() - start)
        return row

    lossless = apply_plan(copy.deepcopy(model), plan, fit=True)
    y_lossless = _output(lossless, x)
    scale = float(y.abs().max())
    row.update(lossless_convs=len(plan), output_scale=scale, output_finite=bool(torch.isfinite(y).all()),
               lossless_error=float((y_lossless - y).abs().max()) / scale if scale > 0 else math.inf)
    del lossless

    targets = [r for r in FALLBACK_RATIOS if r >= ratio] or [ratio]
    if targets[0] != ratio:
        targets.insert(0, ratio)
    unreachable = []
    for r in targets:
        try:
            result = convert(model, ParamsRatio(r), example_inputs=x, progress=False, model_name=name)
            break
        except ConfigError as err:
            if "not reachable" not in str(err) or r == targets[-1]:
                raise
            unreachable.append(f"{r:g}: {err}")
    totals = result.report.totals()
    y_conv = _output(result.model, x)
    row.update(target=r, unreachable=unreachable, converted=totals["converted"],
               params_ratio=totals["params_ratio"], model_params_ratio=_params(result.model) / row["params"],
               output_shape=list(y.shape), converted_shape=list(y_conv.shape),
               converted_finite=bool(torch.isfinite(y_conv).all()), convert_path=result.report.path,
               seconds=time.perf_counter() - start)
    return row


def problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with a row of status ``"ok"`` (empty: the model converts)."""
    if row["status"] != "ok":
        return []
    out = []
    if not row["output_finite"] or row["output_scale"] == 0:
        out.append(f"the original's outputs are degenerate (max |y| = {row['output_scale']:g}); nothing to compare")
    if not row["lossless_error"] <= TOLERANCE:
        out.append(f"lossless outputs differ: max|Δ|/max|y| = {row['lossless_error']:.3g} > {TOLERANCE:g}")
    if row["converted_shape"] != row["output_shape"]:
        out.append(f"output shape changed: {row['output_shape']} -> {row['converted_shape']}")
    if not row["converted_finite"]:
        out.append("the converted model's outputs contain NaN or Inf")
    if row["converted"] == 0:
        out.append(f"no conv converted at params ratio {row['target']:g}")
    if not row["params_ratio"] <= row["target"] + 1e-9:
        out.append(f"conv params ratio {row['params_ratio']:.4f} exceeds the target {row['target']:g}")
    if row["convert_path"] != row["path"]:
        out.append(f"convert used the {row['convert_path']} path, find_convs the {row['path']} path")
    return out


# ------------------------------------------------------------------------------------------- table
def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The zoo table: one row per model, then a one-line summary."""
    head = ("model", "input", "convs converted/total", "target", "conv params ratio", "model params ratio",
            "lossless convs", "lossless max err", "graph path", "time s", "result")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        if row["status"] == "ok":
            bad = problems(row)
            result = "**FAIL**: " + "; ".join(bad) if bad else "ok"
            if row.get("unreachable"):
                result += f" (0.5 unreachable: {_short(row['unreachable'][0])})"
            path = row["path"] + (f" ({_short(row['path_reason'])})" if row["path_reason"] else "")
            cells = (row["model"], row["input"], f"{row['converted']}/{row['convs']}", f"{row['target']:g}",
                     f"{row['params_ratio']:.3f}", f"{row['model_params_ratio']:.3f}",
                     f"{row['lossless_convs']}/{row['convs']}", f"{row['lossless_error']:.1e}", path,
                     f"{row['seconds']:.0f}", result)
        else:
            cells = (row["model"], row.get("input", ""), f"-/{row['convs']}" if "convs" in row else "-", "", "",
                     "", "", "", row.get("path", ""), f"{row['seconds']:.0f}" if "seconds" in row else "",
                     f"{row['status']}: {row['reason']}")
        if row.get("note"):
            cells = cells[:-1] + (f"{cells[-1]}; {row['note']}",)
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n\n" + summary(rows) + "\n"


def summary(rows: Sequence[dict[str, Any]]) -> str:
    ok = [r for r in rows if r["status"] == "ok" and not problems(r)]
    failed = [r["model"] for r in rows if r["status"] == "error" or (r["status"] == "ok" and problems(r))]
    skipped = [r for r in rows if r["status"] == "skipped"]
    text = f"{len(ok)} of {len(rows)} models convert"
    if failed:
        text += f"; {len(failed)} FAIL ({', '.join(failed)})"
    if skipped:
        text += f"; {len(skipped)} skipped ({', '.join(r['model'] for r in skipped)})"
    return text + "."


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -------------------------------------------------------------------------------------------- main
def zoo_models() -> list[str]:
    """Every classification model torchvision lists."""
    return list(torchvision.models.list_models(module=torchvision.models))


def published_params(name: str) -> int | None:
    """Parameter count from torchvision's weights metadata (nothing built or downloaded), or None.

    Used to refuse models too large for the machine before building them (building on the meta
    device is no shortcut: RegNet builders compute their widths with real tensors).

    >>> published_params("resnet18")
    11689512
    """
    try:
        weights = list(torchvision.models.get_model_weights(name))
    except (ValueError, KeyError):
        return None
    counts = [w.meta.get("num_params") for w in weights if w.meta.get("num_params")]
    return int(counts[0]) if counts else None


def _run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    params = published_params(name)
    if params is not None and params > args.max_params:
        return dict(model=name, status="skipped", params=params,
                    reason=f"{params / 1e6:.0f} M params > --max-params {args.max_params / 1e6:.0f} M "
                           "(memory of this shared machine)")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--ratio", str(args.ratio),
           "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(model=name, status="skipped", params=params, seconds=time.perf_counter() - start,
                    reason=f"skipped for time: over --timeout {args.timeout:g} s on this machine")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return dict(model=name, status="error", params=params, seconds=seconds,
                    reason=f"exit {done.returncode}: {_short(last, 200)}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["wall_seconds"] = seconds  # with the worker's start-up: the clock --timeout counts
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["all"],
                   help="model names, 'all' (default: the whole zoo) or 'subset' (the default test's)")
    p.add_argument("--ratio", type=float, default=FALLBACK_RATIOS[0], help="params ratio target (default 0.5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model before it is skipped (120)")
    p.add_argument("--max-params", type=float, default=400e6, help="skip models with more parameters (4e8)")
    # 1 by default: on a shared, oversubscribed machine MKL's 2-thread eigvalsh (the planner's inner
    # loop) was measured 10-100x slower than 1 thread (512x512 float64: 1.7 s vs 0.09 s)
    p.add_argument("--threads", type=int, default=1, help="torch threads per model (default 1; 0: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the markdown table (with the command and versions) here")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: check one model, print its row as JSON
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the zoo; exit 0 when no model fails (skips allowed), 1 when one does, 2 on a usage error."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(zoo_row(args.worker, ratio=args.ratio, seed=args.seed)))
        return 0
    try:
        known = zoo_models()
        names = known if args.models == ["all"] else list(SUBSET) if args.models == ["subset"] else args.models
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown model(s) {', '.join(unknown)}; choose from torchvision's list_models()")
        if not 0 < args.ratio <= 1:
            raise ConfigError(f"--ratio must be in (0, 1], got {args.ratio}")
        if not args.timeout > 0:
            raise ConfigError(f"--timeout must be positive, got {args.timeout}")
        for path in (args.out, args.json):
            if path:
                check_writable(path)
    except IGCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = []
    bar = tqdm(names, desc="zoo", unit="model", file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        rows.append(_run_one(name, args))
        log.info("%s: %s", name, rows[-1]["status"])
    table = markdown_table(rows)
    print(table)
    if args.out:
        command = "python3 benchmarks/zoo.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
        header = (f"# Torchvision zoo\n\nGenerated by `{command}` on {datetime.date.today()} "
                  f"(torch {torch.__version__}, torchvision {torchvision.__version__}, "
                  f"{platform.machine()}, torch threads per model: {torch.get_num_threads()}). "
                  "Time is the check itself (build, lossless, convert); --timeout also counts the "
                  "worker's start-up.\n\n")
        with atomic_write(args.out, "w") as f:
            f.write(header + table)
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["status"] == "error" or problems(r) for r in rows) else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
