"""Weight-standardised convs (timm's ``StdConv2d``, ``ScaledStdConv2d``) converted like plain convs.

BiT ResNets (``resnetv2_50x1_bit``) and NFNets (``nf_resnet50``, ``eca_nfnet_l0``) compute every conv
with a standardised weight: ``forward`` normalises each output channel of ``weight`` to zero mean and
unit variance (times a learnt gain for ``ScaledStdConv2d``) before the conv. Such a module is an
``nn.Conv2d`` with its own ``forward``, so the pass would leave it dense, and these models had
nothing to convert. The conv a forward really computes is a plain one with the standardised weight:
:func:`with_plain_convs` swaps each for that ``nn.Conv2d`` (checked equal on a probe input), the
pass converts what it chooses, and :func:`restore` puts the original modules back where the layer
stayed dense. A converted layer's block approximates the standardised weight; fine-tuning trains
the block directly (a block has no standardisation of its own).

With ``convert(..., inplace=True)`` the swap happens in the caller's model (a conversion that fails
part-way puts the standardised convs back, with every other module it swapped); without ``inplace``
it is made on a copy.

The ``...Same`` variants are swapped only when their padding is static (``same_pad`` false); with
TensorFlow-style dynamic padding the conv depends on the input size and stays as it is.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: timm's weight-standardised conv classes, by name (timm is optional: no import needed to recognise them).
STANDARDISED = ("StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame")


def is_standardised(module: nn.Module) -> bool:
    """Whether ``module`` is one of timm's weight-standardised convs with static padding."""
    cls = type(module)
    return (isinstance(module, nn.Conv2d) and cls.__name__ in STANDARDISED
            and cls.__module__.startswith("timm.") and not getattr(module, "same_pad", False))


def standardised_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight ``conv``'s forward uses: each output channel standardised (times ``gain·scale`` if scaled)."""
    gain = getattr(conv, "gain", None)
    scale = (gain * conv.scale).reshape(-1) if gain is not None else None
    w = conv.weight.reshape(1, conv.out_channels, -1)
    return F.batch_norm(w, None, None, weight=scale, training=True, momentum=0.0, eps=conv.eps).reshape_as(conv.weight)


def as_plain_conv(conv: nn.Conv2d) -> nn.Conv2d | None:
    """A plain ``nn.Conv2d`` computing what ``conv`` computes, or ``None`` when a probe input disagrees."""
    w = conv.weight
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device=w.device,
                      dtype=w.dtype)
    with torch.no_grad():
        plain.weight.copy_(standardised_weight(conv))
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
        # A probe: the formula above must be what this timm version's forward computes.
        size = [max(2 * (k - 1) * d + s + 1, 5) for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride)]
        x = torch.randn(2, conv.in_channels, *size, device=w.device, dtype=w.dtype,
                        generator=torch.Generator(w.device).manual_seed(0))
        ref, out = conv(x), plain(x)
    if ref.shape != out.shape or not torch.allclose(out, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()) + 1e-6):
        return None
    plain.train(conv.training)
    plain.requires_grad_(w.requires_grad)
    return plain


def with_plain_convs(model: nn.Module, inplace: bool) -> tuple[nn.Module, dict[str, nn.Module]]:
    """``model`` (itself when ``inplace``, else a copy when there is anything to swap) with its
    weight-standardised convs swapped for plain ones; and the swapped-out modules by name."""
    names = [n for n, m in model.named_modules() if is_standardised(m)]
    if not names:
        return model, {}
    working = model if inplace else copy.deepcopy(model)
    swapped: dict[str, nn.Module] = {}
    for name in names:
        module = working.get_submodule(name)
        plain = as_plain_conv(module)
        if plain is None:
            log.warning("%s: this %s does not compute a standardised weight as expected; kept as it is",
                        name, type(module).__name__)
            continue
        working.set_submodule(name, plain)
        swapped[name] = module
    if swapped:
        log.info("%d weight-standardised convs (%s) are converted as the plain convs they compute",
                 len(swapped), ", ".join(sorted({type(m).__name__ for m in swapped.values()})))
    return working, swapped


def restore(model: nn.Module, swapped: dict[str, nn.Module]) -> None:
    """Put the swapped-out modules back wherever ``model`` still has the plain conv (the layer stayed dense)."""
    for name, module in swapped.items():
        if type(model.get_submodule(name)) is nn.Conv2d:
            model.set_submodule(name, module)
