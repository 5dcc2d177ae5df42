"""Running a model in eval mode for a while without changing any module's own train/eval flag."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


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
