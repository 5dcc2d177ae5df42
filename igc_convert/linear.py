"""``nn.Linear`` layers converted as 1×1 convs (``convert(..., linear=True)``, ``--linear``).

A Linear applied to a 2-D input ``N × C`` computes exactly what a 1×1 conv computes on the map
``N × C × 1 × 1``. :class:`LinearAsConv` holds that conv, so the whole conv pipeline — planning,
weight-space and data-aware fits, latency planning, export — treats the Linear as one more 1×1
conv, under the qualified name ``<linear>.conv``.

Names: a Linear at ``classifier.0`` becomes the site ``classifier.0.conv``; the converted model has
the IGC block at ``classifier.0.conv`` inside a :class:`LinearAsConv` at ``classifier.0``. A freshly
built original still has its ``nn.Linear`` at ``classifier.0``: :func:`linear_site` recognises such a
name there, and :func:`dense_conv` gives the equivalent 1×1 conv, so a plan can be applied to it and
a converted layer compared with (or reverted to) its original.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ConfigError, call_model

log = logging.getLogger(__name__)

#: The attribute of :class:`LinearAsConv` holding the conv: a Linear ``x`` becomes the site ``x.conv``.
CONV_ATTR = "conv"


class LinearAsConv(nn.Module):
    """An ``nn.Linear`` on 2-D inputs, computed as a 1×1 conv (``self.conv``) on ``N × C × 1 × 1``.

    >>> fc = nn.Linear(6, 4)
    >>> x = torch.randn(3, 6)
    >>> torch.allclose(LinearAsConv.from_linear(fc)(x), fc(x), atol=1e-6)
    True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 1, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearAsConv":
        """The wrapper computing what ``linear`` computes, with copies of its weights (same device and dtype)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.conv.weight.copy_(w[:, :, None, None])
            if linear.bias is not None:
                new.conv.bias.copy_(linear.bias)
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` again; only while ``self.conv`` is still a dense ``nn.Conv2d``."""
        conv = self.conv
        if type(conv) is not nn.Conv2d:
            raise ConfigError(f"cannot turn a {type(conv).__name__} back into an nn.Linear")
        w = conv.weight
        linear = nn.Linear(conv.in_channels, conv.out_channels, conv.bias is not None, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w[:, :, 0, 0])
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        linear.train(self.training)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x[:, :, None, None]).flatten(1)


def wrap_linears(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Swap, in place, every ``nn.Linear`` that ``model(example)`` calls only on 2-D inputs for a
    :class:`LinearAsConv`; return their names. The others stay, with the reason logged at info.

    Exact ``nn.Linear`` modules only (a subclass may compute something else), with their own weight
    (a weight shared with another module would stop being shared). Linears never called are left.
    """
    ranks: dict[str, set[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if name and isinstance(module, nn.Linear):  # the model itself has no parent to be swapped in
            ranks[name] = set()
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: ranks[name].add(args[0].dim() if args and torch.is_tensor(args[0]) else -1)))
    if not handles:
        return []
    try:
        call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    shared = _shared_parameter_ids(model)
    wrapped = []
    for name, seen in ranks.items():
        module = model.get_submodule(name)
        reason = _skip_reason(module, seen, shared)
        if reason:
            log.info("linear layer %s stays as it is: %s", name, reason)
            continue
        model.set_submodule(name, LinearAsConv.from_linear(module))
        wrapped.append(name)
    return wrapped


def unwrap_dense(model: nn.Module) -> list[str]:
    """Put a plain ``nn.Linear`` back, in place, wherever a :class:`LinearAsConv` still holds its dense
    conv (not converted, or reverted); return their names. The converted model then differs from the
    original only where a block was swapped in, so its plan alone rebuilds it."""
    names = [name for name, m in model.named_modules()
             if name and isinstance(m, LinearAsConv) and type(m.conv) is nn.Conv2d]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    return names


def linear_site(model: nn.Module, name: str) -> nn.Linear | None:
    """The ``nn.Linear`` of ``model`` that the site ``name`` (``<linear>.conv``) stands for, or None."""
    parent, _, attr = name.rpartition(".")
    if attr != CONV_ATTR or not parent:
        return None
    try:
        module = model.get_submodule(parent)
    except AttributeError:
        return None
    return module if type(module) is nn.Linear else None


def dense_conv(model: nn.Module, name: str) -> nn.Module:
    """``model``'s layer ``name``; for a site ``<linear>.conv`` whose parent is still an ``nn.Linear``,
    the equivalent dense 1×1 conv (a new module holding copies of the Linear's weights).

    Raises ``AttributeError`` (as ``get_submodule`` does) when there is no such layer.
    """
    linear = linear_site(model, name)
    if linear is not None:
        return LinearAsConv.from_linear(linear).conv
    return model.get_submodule(name)


def _skip_reason(module: nn.Module, ranks: set[int], shared: set[int]) -> str:
    if type(module) is not nn.Linear:
        return f"a {type(module).__name__}, not a plain nn.Linear"
    if not ranks:
        return "not called in forward"
    if ranks != {2}:
        got = ", ".join(str(r) for r in sorted(ranks))
        return f"called on {got}-d input (only a 2-d N×C input is a 1×1 conv)"
    if any(id(p) in shared for p in module.parameters(recurse=False)):
        return "its weight is shared with another module"
    return ""


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {pid for pid, count in owners.items() if count > 1}
