"""Distillation on the converted layers' outputs, for models whose outputs are not class logits.

A detector returns boxes after its own post-processing (a list of dicts whose lengths vary with the
image), an embedding model a feature vector: there are no class logits to distil. What can always be
matched is what conversion changed: each converted block's output against the original layer's, at
the same name, each model on its *own* activations. The student's error at a layer then includes what
upstream blocks got wrong, so fine-tuning on it corrects the drift end to end rather than layer by
layer (unlike ``FinetuneConfig.feature_weight``, which matches each block on its own input).

Both forwards stop once the last converted layer has given its output (:class:`LayerOutputs`): a
detector's heads after it, proposal selection and box decoding are never run.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ModelError
from .modes import as_input, eval_mode

Tensor = torch.Tensor


class _Stop(BaseException):
    """Raised by a hook to end a forward pass early (a BaseException: a model's ``except Exception``
    does not catch it)."""


class LayerOutputs:
    """The outputs of the modules at ``names`` of ``model``, in call order, from one forward pass.

    ``stop_after`` ends the pass once that many outputs are in (what comes after them is not run);
    ``labels`` name the outputs (default: ``names``).
    A module called several times (a detector's head shared by every feature level) gives one output
    per call. The hooks act only while the recorder runs the model (a forward of the model called
    elsewhere is neither recorded nor cut short).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], stop_after: int | None = None, *,
                 labels: Sequence[str] | None = None) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ModelError(f"no module named {missing[0]!r} to match outputs at")
        self.model, self.stop_after = model, stop_after
        self.labels = list(labels if labels is not None else names)
        self.outputs: list[tuple[str, Tensor]] = []
        self.armed = False
        # Outputs are labelled (by the student's names, so that the two models' outputs pair up).
        self.handles = [modules[n].register_forward_hook(self._hook(label)) for n, label in zip(names, self.labels)]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not self.armed:
                return
            self.outputs.append((name, output))
            if self.stop_after is not None and len(self.outputs) >= self.stop_after:
                raise _Stop
        return hook

    def __call__(self, x: Tensor) -> list[tuple[str, Tensor]]:
        self.outputs, self.armed = [], True
        try:
            self.model(as_input(x, self.model))
        except _Stop:
            pass
        finally:
            self.armed = False
        outputs, self.outputs = self.outputs, []
        return outputs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def relative_error(student: list[tuple[str, Tensor]], teacher: list[tuple[str, Tensor]]) -> Tensor | None:
    """Mean over matched calls of ``‖s − t‖² / ‖t‖²`` (each output flattened per image).

    Calls pair up in order, by layer; a pair whose shapes differ (a layer after box selection, whose
    input depends on how many boxes each model kept) is left out. None when no pair is left.
    """
    terms = []
    for (name_s, s), (name_t, t) in zip(student, teacher):
        if name_s != name_t:
            raise ModelError(f"the student called {name_s!r} where the teacher called {name_t!r}: the two models "
                             "do not run their converted layers in the same order")
        s, t = s.float().reshape(len(s), -1), t.float().reshape(len(t), -1)
        if s.shape != t.shape:
            continue
        terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean() if terms else None


def pair_names(student: nn.Module, teacher: nn.Module, pairs: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    """The student's block names and the teacher's names of the layers they replace (``pairs`` from
    ``finetune._feature_pairs``: a converted Linear is ``<linear>.conv`` in the student, ``<linear>``
    in the teacher)."""
    names = {id(m): n for n, m in teacher.named_modules()}
    student_names = list(pairs)
    return student_names, [names[id(pairs[n])] for n in student_names]


def calls_per_forward(model: nn.Module, names: Sequence[str], x: Tensor) -> int:
    """How many outputs the modules at ``names`` give in one (whole) forward pass of ``model`` on ``x``
    (in eval mode)."""
    recorder = LayerOutputs(model, names)
    try:
        with torch.no_grad(), eval_mode(model):
            return len(recorder(x))
    finally:
        recorder.remove()


class RecordedOutputs(nn.Module):
    """A model whose forward returns the outputs a :class:`LayerOutputs` records: what
    DistributedDataParallel wraps, so that it sees the forward return (though cut short) and finds
    the parameters that the recorded outputs do not depend on."""

    def __init__(self, recorder: LayerOutputs) -> None:
        super().__init__()
        self.model = recorder.model
        self.recorder = recorder

    def forward(self, x: Tensor) -> list[tuple[str, Tensor]]:
        return self.recorder(x)


class FeatureDistiller:
    """The student's converted blocks against the teacher's original layers, each model on its own
    activations; both forwards end after the last converted layer's output.

    ``pairs`` maps each block's name to the teacher's layer (``finetune._feature_pairs``); ``example``
    (a batch) counts the calls of one forward. ``student_outputs`` is the student as a module that
    returns the outputs matched (for DistributedDataParallel to wrap).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: dict[str, nn.Module], example: Tensor) -> None:
        student_names, teacher_names = pair_names(student, teacher, pairs)
        calls = calls_per_forward(student, student_names, example)
        if calls == 0:
            raise ModelError("no converted layer of the student ran on the training images: nothing to distil")
        self.calls = calls
        self.student = LayerOutputs(student, student_names, calls)
        self.teacher = LayerOutputs(teacher, teacher_names, calls, labels=student_names)
        self.student_outputs = RecordedOutputs(self.student)

    def loss(self, x: Tensor, forward: Callable[[Tensor], list[tuple[str, Tensor]]] | None = None) -> Tensor | None:
        """:func:`relative_error` on ``x``, with gradients through the student (``forward``: what runs
        :attr:`student_outputs`, its DistributedDataParallel wrapper say)."""
        outputs = (forward or self.student_outputs)(x)
        with torch.no_grad():
            targets = self.teacher(x)
        return relative_error(outputs, targets)

    def remove(self) -> None:
        self.student.remove()
        self.teacher.remove()
