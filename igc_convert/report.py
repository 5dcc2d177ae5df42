"""The account of a conversion: one record per conv seen, totals, as a table, JSON, or a PNG plot."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import FileFormatError
from .files import atomic_path, atomic_write


@dataclass
class LayerRecord:
    """What happened to one conv: its block and shape, or ``"dense"`` and why."""

    name: str
    kernel_size: tuple[int, int]
    in_channels: int
    out_channels: int
    stride: tuple[int, int]
    block: str = "dense"
    shape: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    weight_error: float | None = None
    #: Relative output error on the calibration images (data-aware fits, unweighted), after the bias
    #: correction; for a layer followed by a BatchNorm relative to how its output varies (the
    #: BatchNorm removes the mean), else to the whole output.
    output_error: float | None = None
    calls: int = 1
    #: Where the mean of the fit's output error went (bias correction): ``"bias"`` (the block's), the
    #: name of the following BatchNorm (its running mean), or ``""``.
    shifted_into: str = ""

    @property
    def converted(self) -> bool:
        return self.block != "dense"

    def shape_text(self) -> str:
        if not self.converted:
            return self.reason or "dense"
        s = self.shape
        if self.block == "igcv1":
            return f"L={s['primary_groups']} M={s['secondary_groups']} r={s['rank']}"
        if self.block == "igcv2":
            return f"L={s['primary_groups']} K={'x'.join(map(str, s['factors']))}"
        if self.block == "igcv3":
            return f"G1={s['expand_groups']} G2={s['reduce_groups']} C_int={s['mid_channels']}"
        return json.dumps(s)


@dataclass
class Agreement:
    """How closely the converted model's outputs follow the original's on images that the fit did not
    see (:func:`igc_convert.agreement.measure_agreement`)."""

    images: int
    #: ``‖ŷ − y‖ / ‖y‖`` over every output of every image; None when the original's outputs are empty
    #: or zero on every image (and the converted model's too): there is nothing to compare.
    output_error: float | None
    #: For N × classes outputs: mean ``KL(softmax(y) ‖ softmax(ŷ))`` per image (nats) and the fraction
    #: of images with the same top-1 class; with ``per_pixel`` (segmentation logits) both are means over
    #: pixels; None for other outputs.
    kl: float | None = None
    top1: float | None = None
    source: str = ""
    per_pixel: bool = False

    def text(self) -> str:
        pixel = "per-pixel " if self.per_pixel else ""
        parts = ([f"{pixel}top-1 agreement {100 * self.top1:.1f}%", f"{pixel}logit KL {self.kl:.4f}"]
                 if self.top1 is not None else [])
        parts.append(f"relative output error {self.output_error:.4f}" if self.output_error is not None else
                     "no relative output error (both models' outputs are empty or zero on every image)")
        where = f" ({self.source})" if self.source else ""
        return f"against the original on {self.images} held-out images{where}: " + ", ".join(parts)


@dataclass
class Report:
    """Per-layer records plus how the model was analysed (``path``: ``fx`` or ``by-name``), and, when it
    was measured, the whole model's agreement with the original on held-out images."""

    records: list[LayerRecord]
    path: str = "fx"
    path_reason: str = ""
    target: str = ""
    mode: str = "weight"
    model: str = ""
    agreement: Agreement | None = None

    # ------------------------------------------------------------------------------------- totals
    def totals(self) -> dict[str, Any]:
        def total(attr):
            vals = [getattr(r, attr) for r in self.records]
            return None if any(v is None for v in vals) else sum(vals)

        pb, pa = total("params_before"), total("params_after")
        mb, ma = total("macs_before"), total("macs_after")
        return dict(
            convs=len(self.records),
            converted=sum(r.converted for r in self.records),
            params_before=pb, params_after=pa, params_ratio=(pa / pb) if pb else None,
            macs_before=mb, macs_after=ma, macs_ratio=(ma / mb) if mb and ma is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(model=self.model, target=self.target, mode=self.mode, path=self.path,
                    path_reason=self.path_reason, totals=self.totals(),
                    agreement=None if self.agreement is None else asdict(self.agreement),
                    layers=[asdict(r) for r in self.records])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """The report :meth:`to_dict` wrote; :class:`FileFormatError` for anything else (a damaged or
        foreign file's metadata)."""
        try:
            records = [LayerRecord(**{**r, "kernel_size": tuple(r["kernel_size"]), "stride": tuple(r["stride"])})
                       for r in data.get("layers", [])]
            agreement = data.get("agreement")
            return cls(records, data.get("path", ""), data.get("path_reason", ""), data.get("target", ""),
                       data.get("mode", ""), data.get("model", ""),
                       None if agreement is None else Agreement(**agreement))
        except (AttributeError, KeyError, TypeError) as err:
            raise FileFormatError(f"malformed conversion report: {err}") from err

    # -------------------------------------------------------------------------------------- output
    def table(self) -> str:
        """Aligned text table, one row per conv, then totals."""
        head = ["layer", "kernel", "in", "out", "stride", "block", "shape / reason", "params", "after",
                "MACs", "after", "w.err", "out.err"]
        rows = []
        for r in self.records:
            rows.append([r.name, "x".join(map(str, r.kernel_size)), r.in_channels, r.out_channels,
                         "x".join(map(str, r.stride)), r.block, r.shape_text(), _n(r.params_before),
                         _n(r.params_after), _n(r.macs_before), _n(r.macs_after), _f(r.weight_error),
                         _f(r.output_error)])
        t = self.totals()
        rows.append(["TOTAL", "", "", "", "", f"{t['converted']}/{t['convs']}", _ratio_text(t),
                     _n(t["params_before"]), _n(t["params_after"]), _n(t["macs_before"]), _n(t["macs_after"]),
                     "", ""])
        cells = [head] + [[str(c) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i in (0, 5, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in cells]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        header = f"model: {self.model}  target: {self.target}  fit: {self.mode}  graph: {self.path}"
        if self.path_reason:
            header += f" ({self.path_reason})"
        into_bn = sum(1 for r in self.records if r.shifted_into and r.shifted_into != "bias")
        into_bias = sum(1 for r in self.records if r.shifted_into == "bias")
        footer = ([f"bias correction: the mean of the output error of {into_bn} layer(s) moved into the running "
                   f"mean of the BatchNorm after it, of {into_bias} into the block's bias"]
                  if into_bn or into_bias else [])
        if self.agreement is not None:
            footer.append(self.agreement.text())
        return "\n".join([header] + lines + footer)

    def save_json(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def plot(self, path: str | os.PathLike) -> None:
        """PNG: relative error against parameter ratio, one point per converted layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        conv = [r for r in self.records if r.converted]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for kind in sorted({r.block for r in conv}):
            rs = [r for r in conv if r.block == kind]
            ratio = [r.params_after / r.params_before for r in rs]
            ax.scatter(ratio, [r.weight_error for r in rs], label=f"{kind}: weight error", marker="o")
            if any(r.output_error is not None for r in rs):
                ax.scatter([x for x, r in zip(ratio, rs) if r.output_error is not None],
                           [r.output_error for r in rs if r.output_error is not None],
                           label=f"{kind}: output error (calibration)", marker="x")
        ax.set_xlabel("layer parameters after / before")
        ax.set_ylabel("relative error (Frobenius)")
        t = self.totals()
        ax.set_title(f"{self.model}: {t['converted']}/{t['convs']} convs converted, "
                     f"params ratio {t['params_ratio']:.3f}" if t["params_ratio"] else self.model)
        ax.grid(alpha=0.3)
        if conv:
            ax.legend()
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


def _n(v: int | None) -> str:
    if v is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return str(v)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _ratio_text(t: dict[str, Any]) -> str:
    parts = []
    if t["params_ratio"] is not None:
        parts.append(f"params x{t['params_ratio']:.3f}")
    if t["macs_ratio"] is not None:
        parts.append(f"MACs x{t['macs_ratio']:.3f}")
    return ", ".join(parts)
