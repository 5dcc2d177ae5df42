"""The whole story on an embedded default, offline, in a few minutes on 2 cores.

A dense ResNet trained on the spot on scikit-learn's real handwritten digits → converted to IGC blocks
with a data-aware, sequential init → distilled from the original for a few epochs → both models
exported to ONNX and checked in onnxruntime → one summary table and a figure.

Example::

    from igc_convert.demo import DemoConfig, run_demo
    summary = run_demo(DemoConfig(out="demo-out"))
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo`; the defaults are the README's demo."""

    out: str | os.PathLike = "igc-demo"
    params_ratio: float = 0.25
    train_epochs: int = 6
    finetune_epochs: int = 3
    calib_samples: int = 256
    bench_runs: int = 30
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int = 2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.params_ratio <= 1:
            raise ConfigError(f"params ratio must be in (0, 1], got {self.params_ratio}")
        for name in ("train_epochs", "finetune_epochs", "calib_samples", "bench_runs", "threads"):
            if getattr(self, name) < (0 if name == "finetune_epochs" else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class DemoSummary:
    """The figures the demo prints and plots."""

    rows: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def table(self) -> str:
        width = max(len(k) for k in self.rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in self.rows.items()]
        lines += [f"{'files written'.ljust(width)}  {self.files[0]}"] + [f"{''.ljust(width)}  {f}" for f in self.files[1:]]
        return "\n".join(lines)


def run_demo(config: DemoConfig = DemoConfig()) -> DemoSummary:
    """Train → convert → distil → export → benchmark → summary table and figure (see module doc)."""
    from . import ParamsRatio, convert
    from .bench import bench_onnx
    from .data import resolve_source
    from .digits import CHANNELS, IMAGE_SIZE, evaluate, train_digits_model
    from .export import export_onnx
    from .files import check_writable, make_folder
    from .finetune import FinetuneConfig, finetune
    from .models import build_model
    from .serialize import save, save_state_dict

    out = make_folder(config.out, "output folder")
    check_writable(out / "summary.png")
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()

    log.info("1/5 training a dense ResNet on scikit-learn's digits (%d epochs)", config.train_epochs)
    dense, dense_acc = train_digits_model(epochs=config.train_epochs, seed=config.seed, progress=config.progress)
    train = resolve_source("digits", image_size=IMAGE_SIZE, channels=CHANNELS, split="train")
    val = resolve_source("digits", image_size=IMAGE_SIZE, channels=CHANNELS, split="val")
    calib = resolve_source("digits", image_size=IMAGE_SIZE, channels=CHANNELS, split="train",
                           samples=config.calib_samples, seed=config.seed)
    example = torch.zeros(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)

    log.info("2/5 converting at %.2f of the conv parameters (data-aware, sequential)", config.params_ratio)
    result = convert(dense, ParamsRatio(config.params_ratio), example_inputs=example, calibration=calib,
                     max_positions=IMAGE_SIZE * IMAGE_SIZE, progress=config.progress, seed=config.seed,
                     model_name="igc_convert.digits:digits_resnet")
    print(result.report.table(), flush=True)
    init_acc = evaluate(result.model, val)

    log.info("3/5 distilling from the dense model (%d epochs, no labels)", config.finetune_epochs)
    tuned_acc = init_acc
    if config.finetune_epochs:
        tuned = finetune(result.model, train, teacher=dense, val_data=val,
                         config=FinetuneConfig(epochs=config.finetune_epochs, lr=1e-3, seed=config.seed,
                                               progress=config.progress))
        tuned_acc = evaluate(tuned.model, val)
    model = result.model.eval()
    files = [out / "converted.safetensors", out / "original.onnx", out / "converted.onnx", out / "summary.png",
             out / "original.safetensors"]
    # The trained original's weights, named by the converted file's origin: `igc-convert finetune
    # --teacher auto` and `export --original` rebuild this very model from it.
    save_state_dict(files[4], dense)
    _, origin = build_model("igc_convert.digits:digits_resnet", files[4])
    save(files[0], model, origin=origin, plan=result.plan, report=result.report.to_dict())

    log.info("4/5 exporting both models to ONNX and checking them in onnxruntime")
    x = torch.randn(2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(config.seed))
    exp_dense = export_onnx(dense, files[1], x)
    exp_conv = export_onnx(model, files[2], x)

    log.info("5/5 onnxruntime latency, %d threads, alternating runs", config.threads)
    bench = bench_onnx(files[1], files[2], batch_sizes=config.batch_sizes, threads=config.threads,
                       runs=config.bench_runs, progress=config.progress, seed=config.seed)
    print(bench.table(), flush=True)

    t = result.report.totals()
    summary = DemoSummary()
    summary.rows = {
        "conv params": f"{t['params_before']:,} -> {t['params_after']:,} (x{t['params_ratio']:.3f})",
        "conv MACs / image": f"{t['macs_before']:,} -> {t['macs_after']:,} (x{t['macs_ratio']:.3f})",
        "accuracy (held-out digits)": f"dense {100 * dense_acc:.1f}% | converted, before fine-tuning "
                                      f"{100 * init_acc:.1f}% | after {config.finetune_epochs} epochs of "
                                      f"distillation {100 * tuned_acc:.1f}%",
        "onnxruntime parity": f"original {exp_dense.rel_diff:.1e}, converted {exp_conv.rel_diff:.1e} "
                              "(max error / output scale)",
        "onnxruntime latency": ", ".join(f"batch {r.batch_size}: x{r.ratio:.2f}" for r in bench.rows)
                               + f" (converted / original, {config.threads} threads)",
        "wall time": f"{time.perf_counter() - t0:.0f} s",
    }
    note = speed_note([r.ratio for r in bench.rows])
    if note:
        summary.rows["note"] = note
    summary.files = [str(f) for f in files]
    _figure(files[3], t, (dense_acc, init_acc, tuned_acc), bench, config)
    print(summary.table(), flush=True)
    return summary


def speed_note(ratios: list[float]) -> str | None:
    """What to make of a converted model measured slower than its original (None when it is not).

    >>> speed_note([0.8, 0.9]) is None
    True
    >>> speed_note([1.1, 0.9]).startswith("the converted model is slower here")
    True
    """
    if max(ratios, default=0.0) <= 1:
        return None
    return ("the converted model is slower here: the demo plans for size, and at 12x12 a block's extra, small "
            "convs cost more than the MACs they save on this CPU; a latency target (convert --latency-ratio "
            "1.0) keeps dense every layer whose block measures slower")


def _figure(path: Path, totals: dict, accs: tuple[float, float, float], bench, config: DemoConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=120)
    dense_c, conv_c = "#4c72b0", "#dd8452"
    ax = axes[0]
    ax.bar(["original", "converted"], [totals["params_before"] / 1e3, totals["params_after"] / 1e3],
           color=[dense_c, conv_c])
    ax.set_ylabel("conv parameters (thousands)")
    ax.set_title(f"Size: x{totals['params_ratio']:.2f} parameters")
    ax = axes[1]
    labels = ["original", "converted\n(init)", f"converted\n(+{config.finetune_epochs} ep. distil)"]
    bars = ax.bar(labels, [100 * a for a in accs], color=[dense_c, conv_c, "#55a868"])
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, 100 * a + 1, f"{100 * a:.1f}", ha="center")
    ax.set_ylim(0, 110)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy on real handwritten digits")
    ax = axes[2]
    xs = range(len(bench.rows))
    # Per image, so batch 1 and batch 32 share one readable scale.
    ax.bar([i - 0.2 for i in xs], [r.a_median_s * 1e3 / r.batch_size for r in bench.rows], width=0.4,
           label="original", color=dense_c)
    ax.bar([i + 0.2 for i in xs], [r.b_median_s * 1e3 / r.batch_size for r in bench.rows], width=0.4,
           label="converted", color=conv_c)
    for i, r in zip(xs, bench.rows):
        ax.text(i + 0.2, r.b_median_s * 1e3 / r.batch_size, f"x{r.ratio:.2f}", ha="center", va="bottom")
    ax.set_xticks(list(xs), [f"batch {r.batch_size}" for r in bench.rows])
    ax.set_ylabel("onnxruntime latency per image (ms, median)")
    ax.set_title(f"Speed ({config.threads} CPU threads)")
    ax.legend()
    fig.suptitle("igc-convert demo: dense ResNet on scikit-learn digits -> IGC blocks")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
