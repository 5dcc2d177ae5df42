"""Channel shuffle: the permutation that interleaves the groups of one grouped conv with the next.

``ChannelShuffle(a, b)`` views the channels as an ``a × b`` grid (row-major, each cell a run of
``C/(a·b)`` consecutive channels) and transposes it, so channel block ``(i, j)`` moves to ``(j, i)``.
With ``a`` = the number of groups of the conv before it, this is ShuffleNet's shuffle. It exports to
ONNX as exactly one Reshape → Transpose → Reshape, with no custom op; under :func:`as_gather` (the
export of a dynamic height and width, where those Reshapes would need the run-time size) as one
Gather of the channels.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError


def shuffle_permutation(channels: int, a: int, b: int) -> torch.Tensor:
    """Index tensor ``perm`` with ``shuffled = x[:, perm]`` equal to ``ChannelShuffle(a, b)(x)``."""
    if a < 1 or b < 1 or channels % (a * b):
        raise ConfigError(f"cannot shuffle {channels} channels as a {a}x{b} grid")
    return torch.arange(channels).view(a, b, channels // (a * b)).transpose(0, 1).reshape(-1)


class ChannelShuffle(nn.Module):
    """Transpose the channel grid ``(a, b)`` → ``(b, a)``.

    Example::

        >>> x = torch.arange(6.).view(1, 6, 1, 1)
        >>> ChannelShuffle(2, 3)(x).flatten().tolist()
        [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    """

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        if a < 1 or b < 1:
            raise ConfigError(f"ChannelShuffle needs a, b >= 1, got a={a}, b={b}")
        self.a, self.b = a, b
        self.gather = False  # set by as_gather()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        if self.gather:
            return x.index_select(1, shuffle_permutation(c, self.a, self.b).to(x.device))
        # Batch as -1 and the rest from static sizes keeps the exported graph to one
        # Reshape -> Transpose -> Reshape with constant shapes (no Shape/Gather nodes).
        return x.reshape(-1, self.a, self.b, (c // (self.a * self.b)) * h * w).transpose(1, 2).reshape(-1, c, h, w)

    def extra_repr(self) -> str:
        return f"{self.a}x{self.b}"


@contextlib.contextmanager
def as_gather(model: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`ChannelShuffle` of ``model`` permutes by indexing the channels
    (one ONNX Gather, whatever the height and width) instead of reshaping them."""
    shuffles = [m for m in model.modules() if isinstance(m, ChannelShuffle)]
    for m in shuffles:
        m.gather = True
    try:
        yield
    finally:
        for m in shuffles:
            m.gather = False
