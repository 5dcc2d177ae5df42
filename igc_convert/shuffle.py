"""Channel shuffle: the permutation that interleaves the groups of one grouped conv with the next.

``ChannelShuffle(a, b)`` views the channels as an ``a × b`` grid (row-major, each cell a run of
``C/(a·b)`` consecutive channels) and transposes it, so channel block ``(i, j)`` moves to ``(j, i)``.
With ``a`` = the number of groups of the conv before it, this is ShuffleNet's shuffle. It exports to
ONNX as exactly one Reshape → Transpose → Reshape, with no custom op.
"""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Batch as -1 and the rest from static sizes keeps the exported graph to one
        # Reshape -> Transpose -> Reshape with constant shapes (no Shape/Gather nodes).
        _, c, h, w = x.shape
        return x.reshape(-1, self.a, self.b, (c // (self.a * self.b)) * h * w).transpose(1, 2).reshape(-1, c, h, w)

    def extra_repr(self) -> str:
        return f"{self.a}x{self.b}"
