"""The project's exceptions.

One root class, :class:`IGCError`; every user mistake raises a subclass carrying the offending values
and, where there is one, the qualified name of the layer. Only the CLI boundary catches them (exit 2,
one line on stderr); library callers can catch ``IGCError`` to handle them all.
"""

from __future__ import annotations

from typing import Any


class IGCError(Exception):
    """Root of every error igc-convert raises on purpose."""

    def __init__(self, message: str, *, layer: str | None = None) -> None:
        self.layer = layer
        message = one_line(message)
        super().__init__(f"{layer}: {message}" if layer else message)

    def in_layer(self, layer: str) -> "IGCError":
        """Return a copy of this error that names ``layer`` (used by passes to add context)."""
        if self.layer:
            return self
        err = type(self).__new__(type(self))
        err.__dict__.update(self.__dict__)
        IGCError.__init__(err, str(self), layer=layer)
        return err


class ConfigError(IGCError, ValueError):
    """A block shape, target or option that cannot work (bad groups, ratio out of range, ...)."""


class UnsupportedLayerError(ConfigError):
    """A layer this tool refuses to convert (grouped conv, non-zero padding mode, NaN weights, ...)."""


class ModelError(IGCError):
    """A model that cannot be built, traced, loaded with the given weights, or run."""


class FileFormatError(IGCError):
    """A file that is missing, truncated, tampered with, or not what it claims to be."""


class DataError(IGCError):
    """A calibration or training data source that is empty, unreadable or of the wrong shape."""


class ExportError(IGCError):
    """An ONNX export that failed, or whose onnxruntime outputs do not match PyTorch's."""


class CheckpointError(FileFormatError):
    """A fine-tuning checkpoint that does not belong to this model or run."""


def one_line(message: object) -> str:
    """``message`` folded into one line (the CLI prints every error as exactly one line on stderr).

    Messages often quote a library's own error, and those span lines (``torch.load``'s
    weights-only refusal, ``load_state_dict``, onnxruntime), so the folding happens here, once.

    >>> one_line("cannot read x: Weights only load failed.\\n\\tCheck the documentation.")
    'cannot read x: Weights only load failed. Check the documentation.'
    """
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def call_model(model: Any, example: Any) -> None:
    """Run ``model(example)`` once in eval mode without gradients (hooks on it see the forward), then
    restore its mode; a failure of the model's own code becomes a :class:`ModelError`."""
    import torch

    from .modes import eval_mode

    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    except IGCError:
        raise
    except Exception as err:
        raise ModelError(f"the model failed on an input of shape {tuple(example.shape)}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
