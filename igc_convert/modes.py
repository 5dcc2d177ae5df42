"""A model's state around a computation: eval mode for a while without changing any module's own
train/eval flag, and the device and dtype its inputs must have."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .errors import ModelError


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; afterwards every submodule gets its own ``training`` flag back.

    ``model.train(was_training)`` would flatten mixed modes: a model in train mode with frozen
    (eval-mode) BatchNorms would come back with them training.

    Example::

        with eval_mode(teacher, student), torch.no_grad():
            agreement = (teacher(x).argmax(1) == student(x).argmax(1)).float().mean()
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()  # through train(False): modules that override train() get their say
        yield
    finally:
        for m, mode in saved:  # the flags themselves, not train(mode)
            m.training = mode


def placement(model: nn.Module, device: torch.device | str | None = None) -> tuple[torch.device, torch.dtype]:
    """The device (``device`` if given) and floating dtype a model's inputs must have: its own.

    Data loaders give float32 images; a double, float16 or bfloat16 model needs them cast.
    """
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    dtype = tensors[0].dtype if tensors else torch.float32
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    return torch.device(device), dtype


def as_input(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on ``model``'s device, and in its floating dtype when ``x`` is floating."""
    device, dtype = placement(model)
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)


def require_module(obj: object, role: str = "model") -> None:
    """:class:`ModelError` unless ``obj`` is an ``nn.Module`` (a name or a path passed where a model goes).

    >>> require_module("resnet18", "teacher")
    Traceback (most recent call last):
    ...
    igc_convert.errors.ModelError: teacher must be a torch.nn.Module, got str
    """
    if not isinstance(obj, nn.Module):
        raise ModelError(f"{role} must be a torch.nn.Module, got {type(obj).__name__}")
