"""igc_convert.features: the converted layers' outputs recorded, forwards cut short, their error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igc_convert.errors import ModelError
from igc_convert.features import LayerOutputs, calls_per_forward, relative_error


class Chain(nn.Module):
    """Three convs, the middle one called twice (a shared head), then a part that must not run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 3, 1)
        self.tail_runs = 0

    def forward(self, x):
        y = self.b(self.b(self.a(x)))
        try:  # a model's own `except Exception` must not swallow the early stop
            y = self.c(y)
        except Exception:
            pass
        self.tail_runs += 1
        return y


def test_outputs_are_recorded_in_call_order_and_the_forward_stops_after_the_last():
    model, x = Chain(), torch.randn(2, 2, 5, 5)
    assert calls_per_forward(model, ["b", "c"], x) == 3 and model.tail_runs == 1
    recorder = LayerOutputs(model, ["b", "c"], stop_after=3, labels=["B", "C"])
    outputs = recorder(x)
    assert [name for name, _ in outputs] == ["B", "B", "C"] and model.tail_runs == 1  # the tail never ran
    model(x)  # called elsewhere while the hooks are on: not recorded, not cut short
    assert model.tail_runs == 2 and recorder.outputs == []
    recorder.remove()
    with torch.no_grad():
        torch.testing.assert_close(outputs[2][1], model.c(model.b(model.b(model.a(x)))))
    assert not model.b._forward_hooks and not model.c._forward_hooks
    model(x)
    assert model.tail_runs == 3
    with pytest.raises(ModelError, match="no module named 'd'"):
        LayerOutputs(model, ["d"])


def test_relative_error_pairs_calls_by_layer_and_leaves_out_shapes_that_differ():
    y, y2 = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    yhat, y2hat = y * 1.1, y2 + 0.5
    expected = ((0.1 * y).pow(2).mean() / y.pow(2).mean() + 0.25 / y2.pow(2).mean()) / 2
    err = relative_error([("a", yhat), ("b", y2hat)], [("a", y), ("b", y2)])
    torch.testing.assert_close(err, expected)
    # a layer after box selection: the two models kept different numbers of boxes
    err = relative_error([("a", yhat), ("m", torch.randn(3, 4))], [("a", y), ("m", torch.randn(5, 4))])
    torch.testing.assert_close(err, (0.1 * y).pow(2).mean() / y.pow(2).mean())
    assert relative_error([("m", torch.randn(3, 4))], [("m", torch.randn(5, 4))]) is None
    with pytest.raises(ModelError, match="same order"):
        relative_error([("a", y)], [("b", y)])
