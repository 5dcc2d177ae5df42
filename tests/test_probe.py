"""Planning by the logits: shapes scored by the KL they cause in the model's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igc_convert import MaxError, ParamsRatio, convert
from igc_convert.agreement import measure_agreement
from igc_convert.errors import ConfigError, ModelError
from igc_convert.plan import Candidate
from igc_convert.probe import _interpolate, _spread

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoPaths(nn.Module):
    """Two convs with the same kernel side by side; ``quiet``'s output reaches the logits 100× weaker."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.loud = nn.Conv2d(16, 16, 3, padding=1)
        self.quiet = nn.Conv2d(16, 16, 3, padding=1)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight)
            self.quiet.bias.copy_(self.loud.bias)
        self.head = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = torch.relu(self.loud(h) + 0.01 * self.quiet(h))
        return self.head(y.mean((2, 3))) * 4


def _params(result, name):
    return sum(p.numel() for p in result.model.get_submodule(name).parameters())


def test_planning_by_the_logits_spends_the_budget_where_the_output_feels_it():
    torch.manual_seed(0)
    model = TwoPaths().eval()
    images = torch.randn(48, 3, 10, 10)
    common = dict(calibration=images[:32], exclude=["stem"], sequential=False, progress=False)
    by_error = convert(model, ParamsRatio(0.5), **common)
    by_logits = convert(model, ParamsRatio(0.5), plan_by="logits", **common)
    # The same kernel in both: by their own errors the layers are alike; by the logits the quiet one
    # gives up far more.
    assert abs(_params(by_error, "loud") - _params(by_error, "quiet")) <= 0.25 * _params(by_error, "loud")
    assert _params(by_logits, "quiet") < 0.5 * _params(by_logits, "loud")
    assert by_logits.report.mode == "data-aware, planned by the logits"
    assert by_logits.report.totals()["params_ratio"] <= 0.5 + 1e-9
    held_out = images[32:]
    kl_error = measure_agreement(model, by_error.model, held_out).kl
    kl_logits = measure_agreement(model, by_logits.model, held_out).kl
    assert kl_logits < 0.5 * kl_error, (kl_logits, kl_error)


def test_planning_by_the_logits_needs_calibration_a_budget_and_logits():
    model = TwoPaths().eval()
    images = torch.randn(8, 3, 10, 10)
    with pytest.raises(ConfigError, match="calibration"):
        convert(model, ParamsRatio(0.5), example_inputs=images[:1], plan_by="logits", progress=False)
    with pytest.raises(ConfigError, match="max-error"):
        convert(model, MaxError(0.3), calibration=images, plan_by="logits", progress=False)
    with pytest.raises(ConfigError, match="plan_by"):
        convert(model, ParamsRatio(0.5), calibration=images, plan_by="kl", progress=False)

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)

        def forward(self, x):
            return {"features": self.conv(x).flatten(1)}

    with pytest.raises(ModelError, match="class logits"):
        convert(Features().eval(), ParamsRatio(0.5), calibration=images, plan_by="logits", progress=False)


def test_interpolation_is_exact_at_the_probes_monotone_and_extended():
    points = [(0.2, 1.0), (0.4, 3.0), (0.3, 0.5)]  # a noisy probe: 0.3 below 0.2's KL
    assert _interpolate(points, 0.0) == 0.0
    assert _interpolate(points, 0.1) == pytest.approx(0.5)
    assert _interpolate(points, 0.2) == pytest.approx(1.0)
    assert _interpolate(points, 0.3) == pytest.approx(1.0)  # made non-decreasing
    assert _interpolate(points, 0.4) == pytest.approx(3.0)
    assert _interpolate(points, 0.5) == pytest.approx(5.0)  # the last segment's slope, 20 per unit
    values = [_interpolate(points, e / 100) for e in range(60)]
    assert values == sorted(values)


def test_probes_are_spread_along_the_hull_with_both_ends():
    hull = [Candidate("igcv1", {"r": r}, params=r) for r in range(1, 21)]
    picked = _spread(hull, 6)
    assert len(picked) == 6 and picked[0] is hull[0] and picked[-1] is hull[-1]
    assert [c.params for c in picked] == sorted(c.params for c in picked)
    assert _spread(hull[:4], 6) == hull[:4]


def test_cli_plan_by_logits_reaches_the_conversion_and_its_report(tmp_path, capsys):
    from igc_convert.cli import main
    from igc_convert.serialize import read_metadata

    out = tmp_path / "m.safetensors"
    assert main(["convert", "igc_convert.digits:digits_resnet", "-o", str(out), "--params-ratio", "0.3",
                 "--calib", "digits", "--calib-samples", "32", "--check-samples", "0", "--plan-by", "logits"]) == 0
    # this random-init model's logits plan may measure worse than the plan by errors: either is said
    assert read_metadata(out)["report"]["mode"] in ("data-aware, sequential, planned by the logits",
                                                   "data-aware, sequential, planned by the layers' errors "
                                                   "(the logits' plan measured worse)")
    capsys.readouterr()
    assert main(["convert", "igc_convert.digits:digits_resnet", "-o", str(tmp_path / "n.safetensors"),
                 "--params-ratio", "0.3", "--plan-by", "logits"]) == 2
    assert "calibration" in capsys.readouterr().err and not (tmp_path / "n.safetensors").exists()


def test_the_plan_by_errors_is_kept_when_the_logits_plan_measures_worse(monkeypatch):
    """Probes change one layer at a time; with all blocks in, the two plans are compared on the logits."""
    import igc_convert.probe as probe

    torch.manual_seed(0)
    model = TwoPaths().eval()
    images = torch.randn(32, 3, 10, 10)
    common = dict(calibration=images, exclude=["stem"], sequential=False, progress=False)
    by_error = convert(model, ParamsRatio(0.5), **common)
    measured = []
    real = probe.plan_kls

    def worse_for_the_logits(model, convs, specs, plans, images, **kwargs):
        measured.extend(real(model, convs, specs, plans, images, **kwargs))
        return [measured[0] + 1.0, *measured[1:]]  # the first plan is the logits' one

    monkeypatch.setattr(probe, "plan_kls", worse_for_the_logits)
    kept = convert(model, ParamsRatio(0.5), plan_by="logits", **common)
    assert len(measured) == 2 and measured[0] < measured[1]  # really better by the logits, made to look worse
    assert kept.plan == by_error.plan
    assert kept.report.mode == "data-aware, planned by the layers' errors (the logits' plan measured worse)"


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_a_probed_change_is_what_the_changed_conv_computes_whatever_its_padding(mode):
    """The probe adds ``(Ŵ − W) ∗ x`` to a conv's output: with the conv's own padding mode, that is the
    output of the conv with kernel ``Ŵ``."""
    import copy

    from igc_convert.agreement import kl_and_top1
    from igc_convert.probe import _kl_with, _logits

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(4, 3, 6, 6)
    delta = 0.3 * torch.randn_like(net[0].weight)
    changed = copy.deepcopy(net)
    with torch.no_grad():
        changed[0].weight += delta
        expected = kl_and_top1(net(x), changed(x))[0] / len(x)
    got = _kl_with(net, [(net[0], delta)], x, _logits(net, x), remove_mean=False)
    assert expected > 1e-3 and got == pytest.approx(expected, rel=1e-5)
