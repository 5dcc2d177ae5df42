"""The whole-model check: a converted model against the original on held-out images."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from igc_convert.agreement import measure_agreement
from igc_convert.cli import main
from igc_convert.errors import DataError, ModelError
from igc_convert.report import Agreement, Report


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


def images(n: int = 10) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_the_same_model_agrees_fully():
    net = classifier()
    a = measure_agreement(net, net, images(), batch_size=3)
    assert (a.images, a.output_error, a.top1) == (10, 0.0, 1.0) and a.kl == pytest.approx(0, abs=1e-15)


def test_known_error_kl_and_top1():
    """The head scaled by 1.1: output error exactly 0.1; KL and top-1 as computed by hand."""
    net, scaled = classifier(), classifier()
    with torch.no_grad():
        scaled[4].weight.mul_(1.1)
        scaled[4].bias.mul_(1.1)
        net[4].bias.zero_()
        scaled[4].bias.zero_()
    x = images(12)
    a = measure_agreement(net, scaled, x, batch_size=5)  # batches of 5, 5, 2
    assert a.output_error == pytest.approx(0.1, rel=1e-6)
    with torch.no_grad():
        logp, logq = F.log_softmax(net(x).double(), 1), F.log_softmax(scaled(x).double(), 1)
    assert a.kl == pytest.approx(float((logp.exp() * (logp - logq)).sum(1).mean()), rel=1e-9) and a.kl > 0
    assert a.top1 == 1.0  # scaling the logits keeps the argmax


def test_outputs_other_than_logits_have_no_kl():
    conv = nn.Conv2d(3, 4, 3).eval()
    other = nn.Conv2d(3, 4, 3).eval()
    a = measure_agreement(conv, other, images(4))
    assert a.kl is None and a.top1 is None and a.output_error > 0


class NoBoxes(nn.Module):
    """A detector-like output that is empty on every image (a random-init detector finds nothing)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        scores = self.conv(x).amax((1, 2, 3))
        return [dict(boxes=torch.zeros(0, 4), scores=s[s > 1e9]) for s in scores[:, None]]


def test_outputs_empty_on_every_image_have_no_relative_error():
    a = measure_agreement(NoBoxes().eval(), NoBoxes().eval(), images(4))
    assert a.output_error is None and a.kl is None
    assert "no relative output error (both models' outputs are empty or zero on every image)" in a.text()
    again = Report.from_dict(json.loads(json.dumps(Report([], agreement=a).to_dict())))
    assert again.agreement == a


def test_modes_are_restored_and_inputs_checked():
    net, other = classifier(), classifier(1)
    net.train()
    net[0].eval()  # mixed modes come back as they were, module by module
    measure_agreement(net, other, images(4))
    assert net.training and not net[0].training and net[4].training and not other.training
    with pytest.raises(DataError, match="held-out images"):
        measure_agreement(net, other, [])
    with pytest.raises(DataError, match="held-out images"):
        measure_agreement(net, other, torch.zeros(2, 3))
    with pytest.raises(ModelError, match="original model failed on held-out images of shape"):
        measure_agreement(net, other, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ModelError, match="shapes"):
        measure_agreement(net, nn.Sequential(net, nn.Linear(5, 2)), images(4))


def test_report_keeps_the_agreement():
    report = Report([], agreement=Agreement(64, 0.25, 0.31, 0.625, "digits, validation split"))
    again = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.agreement == report.agreement
    assert "top-1 agreement 62.5%, logit KL 0.3100" in again.table()
    assert Report.from_dict(Report([]).to_dict()).agreement is None  # files written before it was measured


def test_cli_convert_checks_on_the_validation_split(tmp_path, capsys):
    """With --calib, the saved report holds the agreement measured on the source's validation split:
    the numbers the converted file itself gives against the original on those images."""
    from igc_convert.data import resolve_source
    from igc_convert.digits import digits_resnet
    from igc_convert.serialize import load

    out, rep = tmp_path / "m.safetensors", tmp_path / "r.json"
    code = main(["convert", "igc_convert.digits:digits_resnet", "-o", str(out), "--params-ratio", "0.2",
                 "--calib", "digits", "--calib-samples", "32", "--check-samples", "20", "--report", str(rep)])
    assert code == 0
    agreement = json.loads(rep.read_text())["agreement"]
    assert agreement["images"] == 20 and agreement["source"] == "digits, validation split"
    assert "held-out images (digits, validation split)" in capsys.readouterr().out
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the CLI's --seed: the weights it built
        original = digits_resnet().eval()
    held_out = resolve_source("digits", image_size=12, channels=1, split="val", samples=20, seed=0)
    again = measure_agreement(original, load(out).model, held_out)
    assert again.output_error == pytest.approx(agreement["output_error"], rel=1e-5)
    assert again.kl == pytest.approx(agreement["kl"], rel=1e-4, abs=1e-9) and again.top1 == agreement["top1"]
    assert load(out).report["agreement"] == agreement  # kept in the file, shown by `igc-convert report`

    code = main(["convert", "igc_convert.digits:digits_resnet", "-o", str(out), "--params-ratio", "0.2",
                 "--calib", "digits", "--calib-samples", "32", "--check-samples", "0", "--report", str(rep)])
    assert code == 0 and json.loads(rep.read_text())["agreement"] is None


def test_cli_rejects_a_negative_check_count(tmp_path, capsys):
    code = main(["convert", "resnet18", "-o", str(tmp_path / "x.safetensors"), "--check-samples", "-1"])
    assert code == 2 and "--check-samples" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [{"agreement": {"images": 3, "bogus": 1}}, {"layers": [{"name": "x"}]}, {"layers": 5}])
def test_a_malformed_report_is_a_file_format_error(bad, tmp_path, capsys):
    from igc_convert.errors import FileFormatError
    from igc_convert.serialize import save

    with pytest.raises(FileFormatError, match="malformed conversion report"):
        Report.from_dict(bad)
    path = tmp_path / "m.safetensors"
    save(path, nn.Conv2d(1, 1, 1), origin={"kind": "module", "name": "x"}, plan=[], report=bad)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "malformed conversion report" in err[0]


class _Segmenter(nn.Module):
    """torchvision's segmentation convention: a dict with per-pixel logits under "out" (and "aux")."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return {"out": self.head(features), "aux": features}


def test_segmentation_outputs_are_compared_per_pixel():
    """For per-pixel logits the KL and top-1 agreement are means over pixels (they were not given at all,
    the output being a dict of two tensors)."""
    net, other = _Segmenter(0), _Segmenter(1)
    x = images(6)
    a = measure_agreement(net, other, x, batch_size=4)
    with torch.no_grad():
        y, yhat = net(x)["out"].double(), other(x)["out"].double()
    logp, logq = F.log_softmax(y, 1), F.log_softmax(yhat, 1)
    assert a.per_pixel and a.kl == pytest.approx(float((logp.exp() * (logp - logq)).sum(1).mean()), rel=1e-9)
    assert a.top1 == pytest.approx(float((y.argmax(1) == yhat.argmax(1)).double().mean()), rel=1e-12)
    assert 0 < a.top1 < 1 and "per-pixel top-1 agreement" in a.text()
    same = measure_agreement(net, net, x)
    assert same.top1 == 1.0 and same.kl == pytest.approx(0, abs=1e-15)
