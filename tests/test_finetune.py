"""Fine-tuning: distillation works, never returns worse than the start, resumes exactly, runs under torchrun."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from igc_convert.blocks import IGCV1
from igc_convert.cli import main as cli_main
from igc_convert.data import resolve_source
from igc_convert.errors import CheckpointError, ConfigError, DataError, FileFormatError, ModelError
from igc_convert.finetune import (FAR_AGREEMENT, FinetuneConfig, _FeatureHooks, _feature_pairs, checkpoint_path,
                                  embedding_reason, finetune, load_checkpoint, score)
from igc_convert.linear import LinearAsConv

TESTS = Path(__file__).parent


class Tiny(nn.Module):
    """Two 3×3 convs (the second one convertible), BatchNorm, dropout: every state a run must carry."""

    def __init__(self, width: int = 8, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 2).flatten(1)))  # 2×2: digits need layout


pytestmark = pytest.mark.usefixtures("one_thread")


def digits(split: str, samples: int | None = None):
    return resolve_source("digits", image_size=8, channels=1, split=split, samples=samples)


@pytest.fixture(scope="module")
def data():
    return digits("train", 384), digits("val", 128)


@pytest.fixture(scope="module")
def teacher(data):
    """A real (if small) digits classifier, trained with finetune's labels-only path."""
    torch.manual_seed(0)
    model = Tiny(width=16, dropout=0.0)
    result = finetune(model, digits("train"), val_data=digits("val"),
                      config=FinetuneConfig(epochs=3, lr=1e-2, kd_weight=0, ce_weight=1, freeze_bn=False,
                                            progress=False))
    assert result.best.accuracy > 0.8, result.best  # a teacher worth distilling from
    return result.model


def noisy_copy(model: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    student = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale if p.numel() > 1 else 0)
    return student


def converted(teacher: nn.Module) -> nn.Module:
    """The teacher with conv2 replaced by a (lossy) IGCV1 block fitted to it."""
    student = copy.deepcopy(teacher)
    student.conv2 = IGCV1.from_conv(teacher.conv2, primary_groups=2, secondary_groups=2, rank=2)
    return student


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ quality
def test_distillation_improves_agreement_with_teacher(teacher, data):
    train, val = data
    student = noisy_copy(teacher, 0.5)
    result = finetune(student, train, teacher=teacher, val_data=val,
                      config=FinetuneConfig(epochs=2, lr=3e-3, progress=False))
    start, best = result.start, result.best
    assert best.metric == "accuracy"  # labelled val: ranked by accuracy, agreement reported too
    assert best.agreement >= start.agreement + 0.1, [e.summary() for e in result.history]
    assert best.kl < start.kl / 2
    assert result.model is student


def test_feature_matching_trains_converted_blocks(teacher, data):
    train, val = data
    student = converted(teacher)
    before = copy.deepcopy(student)
    result = finetune(student, train, teacher=teacher, val_data=val,
                      config=FinetuneConfig(epochs=1, lr=1e-3, kd_weight=0.0, feature_weight=1.0, progress=False))
    assert result.steps > 0
    # With only the feature loss, the block moves towards the original conv on the same inputs.
    x = torch.stack([train[i][0] for i in range(64)])
    with torch.no_grad():
        h = F.relu(teacher.bn1(teacher.conv1(x)))
        err = [F.mse_loss(m.conv2(F.relu(m.bn1(m.conv1(x)))), teacher.conv2(h)).item() for m in (before, student)]
    assert err[1] < err[0] or result.best.epoch == 0, err


def test_feature_loss_is_zero_for_an_exact_block_and_positive_otherwise():
    torch.manual_seed(0)
    teacher = Tiny(dropout=0.0).eval()
    exact = copy.deepcopy(teacher)
    exact.conv2 = IGCV1.from_conv(teacher.conv2, rank=8)  # full rank: the dense conv exactly
    lossy = converted(teacher)
    x = torch.randn(4, 1, 8, 8)
    losses = []
    for student in (exact, lossy):
        hooks = _FeatureHooks({"conv2": teacher.conv2}, student)
        hooks.recording = True
        student.eval()(x)
        losses.append(hooks.loss().item())
        hooks.remove()
    assert losses[0] < 1e-10 and losses[1] > 1e-3, losses


def test_feature_loss_pads_as_the_original_conv_does():
    """The target of a conv that reflects its border was computed with zero padding, so an exact block
    had a feature loss and fine-tuning pulled it away from the original."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
    student = nn.Sequential(IGCV1.from_conv(conv, rank=8))  # full rank: exact
    hooks = _FeatureHooks({"0": conv}, student)
    hooks.recording = True
    student(torch.randn(2, 8, 6, 6))
    assert hooks.loss().item() < 1e-10
    hooks.remove()


def test_feature_loss_pairs_a_converted_linear_with_the_teachers_linear():
    torch.manual_seed(0)
    teacher = Tiny(dropout=0.0).eval()  # fc: 32 -> 10
    losses = []
    for shape in (dict(primary_groups=2, secondary_groups=2, rank=5), dict(primary_groups=2, secondary_groups=2, rank=1)):
        student = copy.deepcopy(teacher)
        student.fc = LinearAsConv.from_linear(teacher.fc)
        student.fc.conv = IGCV1.from_conv(student.fc.conv, **shape)
        pairs = _feature_pairs(student, teacher)
        assert pairs == {"fc.conv": teacher.fc}
        hooks = _FeatureHooks(pairs, student)
        hooks.recording = True
        student.eval()(torch.randn(4, 1, 8, 8))
        losses.append(hooks.loss().item())
        hooks.remove()
    assert losses[0] < 1e-10 and losses[1] > 1e-3, losses  # full rank is the Linear exactly


def test_never_worse_than_the_start_with_a_destructive_learning_rate(teacher, data):
    train, val = data
    student = copy.deepcopy(teacher)
    result = finetune(student, train, teacher=teacher, val_data=val,
                      config=FinetuneConfig(epochs=2, lr=50.0, optimizer="sgd", clip_grad_norm=None,
                                            progress=False))
    assert [e.epoch for e in result.history] == [0, 1, 2]
    assert all(e.value < result.start.value for e in result.history[1:])  # the run really was destructive
    assert result.best.epoch == 0
    assert states_equal(result.model, teacher)


def test_batchnorm_statistics_frozen_on_small_data_unless_asked(teacher, data):
    train, val = data
    cfg = dict(epochs=1, lr=1e-3, progress=False)
    frozen = finetune(noisy_copy(teacher, 0.2), train, teacher=teacher, val_data=val,
                      config=FinetuneConfig(**cfg)).model
    updated = finetune(noisy_copy(teacher, 0.2), train, teacher=teacher, val_data=val,
                       config=FinetuneConfig(freeze_bn=False, **cfg)).model
    assert torch.equal(frozen.bn1.running_mean, teacher.bn1.running_mean)
    assert not torch.equal(updated.bn1.running_mean, teacher.bn1.running_mean)


@pytest.mark.parametrize("noise, settings, hinted", [
    (3.0, dict(), True),                            # far start, gentle defaults: say what to try
    (3.0, dict(lr=1e-2, freeze_bn=False), False),   # far start, already the heavy-compression settings
    (0.0, dict(), False),                           # a start that agrees with the teacher
], ids=["far-gentle", "far-strong", "near-gentle"])
def test_a_far_start_under_gentle_settings_gets_a_hint(teacher, data, caplog, noise, settings, hinted):
    train, val = data
    student = noisy_copy(teacher, noise) if noise else copy.deepcopy(teacher)
    with caplog.at_level(logging.WARNING, logger="igc_convert.finetune"):
        result = finetune(student, train, teacher=teacher, val_data=val,
                          config=FinetuneConfig(epochs=1, progress=False, **settings))
    assert (result.start.agreement < FAR_AGREEMENT) == bool(noise)
    hints = [r for r in caplog.records if "starts far from the teacher" in r.getMessage()]
    assert len(hints) == int(hinted), [r.getMessage() for r in caplog.records]


def test_callers_rng_state_is_restored(teacher, data):
    train, val = data
    torch.manual_seed(123)
    before = torch.get_rng_state()
    finetune(noisy_copy(teacher, 0.1), train, teacher=teacher, config=FinetuneConfig(epochs=1, progress=False))
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------ checkpoints
# 256 images, 32 per batch: 8 steps per epoch; checkpoints at steps 5, 10, 15 and at each epoch end (8, 16).
# augment: its crops and flips draw from the generator a checkpoint carries, so a resumed run repeats them
RESUME_CFG = dict(epochs=2, batch_size=32, lr=2e-3, feature_weight=0.5, freeze_bn=False, progress=False,
                  checkpoint_every=5, augment=True)


class Kill(KeyboardInterrupt):
    """Stands for a SIGKILL/Ctrl-C between two steps."""


@pytest.fixture(scope="module")
def resume_setup(teacher, tmp_path_factory):
    train, val = digits("train", 256), digits("val", 64)
    start = converted(teacher)
    start.drop = nn.Dropout(0.3)  # random masks: the RNG state must be carried too
    reference = finetune(copy.deepcopy(start), train, teacher=teacher, val_data=val,
                         config=FinetuneConfig(checkpoint_dir=tmp_path_factory.mktemp("ref"), **RESUME_CFG))
    return start, train, val, reference


@pytest.mark.parametrize("kill_step, checkpoint_step", [(4, None), (7, 5), (9, 8), (13, 10)],
                         ids=["before-any-checkpoint", "mid-epoch", "after-epoch-end", "second-epoch"])
def test_resume_ends_with_exactly_the_uninterrupted_weights(teacher, resume_setup, tmp_path, kill_step,
                                                            checkpoint_step):
    start, train, val, reference = resume_setup

    def on_step(step: int) -> None:
        if step == kill_step:
            raise Kill

    with pytest.raises(Kill):
        finetune(copy.deepcopy(start), train, teacher=teacher, val_data=val,
                 config=FinetuneConfig(checkpoint_dir=tmp_path, **RESUME_CFG), on_step=on_step)
    path = checkpoint_path(tmp_path)
    # The steps after the checkpoint are redone from it, skipping the batches it had already seen.
    assert (load_checkpoint(path)["step"] if path.exists() else None) == checkpoint_step
    resumed = finetune(copy.deepcopy(start), train, teacher=teacher, val_data=val,
                       config=FinetuneConfig(checkpoint_dir=tmp_path, resume=True, **RESUME_CFG))
    assert resumed.resumed_from_step == checkpoint_step
    assert resumed.steps == reference.steps == 16
    assert states_equal(resumed.model, reference.model)
    assert resumed.history == reference.history


def test_checkpoint_loads_with_weights_only(teacher, data, tmp_path):
    train, val = data
    finetune(noisy_copy(teacher, 0.1), train, teacher=teacher, val_data=val,
             config=FinetuneConfig(epochs=1, checkpoint_dir=tmp_path, progress=False))
    ckpt = torch.load(checkpoint_path(tmp_path), weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "epoch", "rng", "best", "run"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["batch"] == 0
    assert isinstance(ckpt["rng"][0]["torch"], torch.Tensor)


def test_resume_with_a_checkpoint_of_another_model_fails_and_keeps_it(teacher, data, tmp_path):
    train, val = data
    finetune(noisy_copy(teacher, 0.1), train, teacher=teacher, val_data=val,
             config=FinetuneConfig(epochs=1, checkpoint_dir=tmp_path, progress=False))
    before = checkpoint_path(tmp_path).read_bytes()
    other = Tiny(width=8)
    with pytest.raises(CheckpointError, match="different model"):
        finetune(other, train, teacher=teacher, val_data=val,
                 config=FinetuneConfig(epochs=1, checkpoint_dir=tmp_path, resume=True, progress=False))
    with pytest.raises(CheckpointError, match="different run.*seed"):
        finetune(noisy_copy(teacher, 0.1), train, teacher=teacher, val_data=val,
                 config=FinetuneConfig(epochs=1, seed=5, checkpoint_dir=tmp_path, resume=True, progress=False))
    assert checkpoint_path(tmp_path).read_bytes() == before


@pytest.mark.parametrize("where", ["a file", "under a file", "not creatable"])
def test_an_unusable_checkpoint_folder_fails_before_any_training(teacher, data, tmp_path, refuse_new_files, where):
    train, val = data
    (tmp_path / "file").write_bytes(b"x")
    folder = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "ckpt",
              "not creatable": tmp_path / "ro" / "ckpt"}[where]
    if where == "not creatable":
        refuse_new_files(tmp_path, PermissionError(13, "Permission denied"))
    steps = []
    with pytest.raises(FileFormatError, match="checkpoint folder"):
        finetune(noisy_copy(teacher, 0.1), train, teacher=teacher, val_data=val, on_step=steps.append,
                 config=FinetuneConfig(epochs=1, checkpoint_dir=folder, progress=False))
    assert steps == [] and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_checkpoint_folder_probe_creates_nothing_and_a_failed_mkdir_is_a_file_error(tmp_path):
    from igc_convert.files import check_creatable_folder, make_folder

    assert check_creatable_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_creatable_folder(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []  # probed, and nothing left behind
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FileFormatError, match="cannot create the checkpoint folder"):
        make_folder(tmp_path / "file" / "sub", "checkpoint folder")
    assert make_folder(tmp_path / "a" / "b").is_dir()


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    path = checkpoint_path(tmp_path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize("kwargs", [dict(epochs=0), dict(lr=-1.0), dict(optimizer="adam"), dict(warmup=2.0),
                                    dict(kd_weight=0.0), dict(resume=True), dict(batch_size=True),
                                    dict(clip_grad_norm=0.0)],
                         ids=["epochs", "lr", "optimizer", "warmup", "no-loss", "resume-no-dir", "bool-batch",
                              "clip"])
def test_bad_config_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        FinetuneConfig(**kwargs)


def test_options_given_to_finetune_are_the_config_s_fields(teacher, data):
    train, val = data
    config = FinetuneConfig(epochs=1, lr=3e-3, progress=False)
    by_config = finetune(noisy_copy(teacher, 0.5), train, teacher=teacher, val_data=val, config=config).model
    by_options = finetune(noisy_copy(teacher, 0.5), train, teacher=teacher, val_data=val, epochs=1, lr=3e-3,
                          progress=False).model
    # options override the config's own values: the same run whichever way it is asked for
    overridden = finetune(noisy_copy(teacher, 0.5), train, teacher=teacher, val_data=val,
                          config=FinetuneConfig(epochs=2, lr=1.0, progress=False), epochs=1, lr=3e-3).model
    assert not states_equal(by_config, noisy_copy(teacher, 0.5))  # it trained
    assert states_equal(by_config, by_options) and states_equal(by_config, overridden)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epoch=1), "unknown option epoch; it takes teacher, val_data, config, on_step and FinetuneConfig's fields: "
                    "amp, augment, batch_size"),
    (dict(epochs=0), "fine-tune option epochs=0: must be a positive integer"),
    (dict(config=dict(epochs=1)), "config must be a FinetuneConfig, got dict"),
], ids=["misspelt", "invalid", "config-not-a-config"])
def test_a_bad_option_is_a_config_error_before_any_training(teacher, data, kwargs, match):
    student = noisy_copy(teacher, 0.5)
    before = copy.deepcopy(student)
    with pytest.raises(ConfigError, match=match):
        finetune(student, data[0], teacher=teacher, **kwargs)
    assert states_equal(student, before)


def test_loss_and_data_mismatches_are_clear_errors(teacher, data):
    train, val = data
    unlabelled = torch.randn(16, 1, 8, 8)
    with pytest.raises(ConfigError, match="without a teacher"):
        finetune(Tiny(), train, config=FinetuneConfig(progress=False))
    with pytest.raises(DataError, match="needs labels"):
        finetune(Tiny(), unlabelled, config=FinetuneConfig(kd_weight=0, ce_weight=1, progress=False))
    with pytest.raises(ConfigError, match="resolve"):
        finetune(Tiny(), "digits", teacher=teacher, config=FinetuneConfig(progress=False))
    with pytest.raises(DataError, match="N×C×H×W"):
        finetune(Tiny(), torch.randn(4, 1, 8), teacher=teacher, config=FinetuneConfig(progress=False))
    with pytest.raises(ModelError, match="conv2"):  # feature matching needs the original conv there
        finetune(converted(teacher), train, teacher=nn.Sequential(),
                 config=FinetuneConfig(feature_weight=1, progress=False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float32_images_fine_tune_a_model_of_another_dtype(teacher, data, dtype):
    """Data loaders give float32 images: a double or bfloat16 student and teacher take them in their own
    dtype (torch's dtype mismatch error before), and the student stays in its dtype."""
    from igc_convert.agreement import measure_agreement

    train, val = data
    student, teacher = converted(teacher).to(dtype), copy.deepcopy(teacher).to(dtype)
    result = finetune(student, train, teacher=teacher, val_data=val,
                      config=FinetuneConfig(epochs=1, lr=3e-3, progress=False))
    assert result.best.agreement > 0.5 and all(p.dtype == dtype for p in student.parameters())
    agreement = measure_agreement(teacher, student, [val[i][0] for i in range(32)])
    assert agreement.images == 32 and agreement.top1 > 0.5


def _two_class_folder(root: Path, per_class: int = 12) -> Path:
    """Digits images saved as PNGs under two class sub-folders: labels 0 and 1 of a 2-class set."""
    from PIL import Image

    images = digits("all", 2 * per_class)
    for i in range(len(images)):
        x, _ = images[i]
        sub = root / ("ants" if i % 2 else "bees")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = ((x[0] - x.min()) / (x.max() - x.min() + 1e-9) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(sub / f"{i}.png")
    return root


def test_folder_labels_that_are_not_the_models_classes(teacher, tmp_path, caplog):
    """Two class sub-folders against ten outputs: the labels are not the model's classes. Distillation
    ignores them (before, top-1 against them picked the epoch, and the start was always kept); a loss on
    them is refused."""
    root = _two_class_folder(tmp_path / "imgs")
    train = resolve_source(root, image_size=8, channels=1, split="train")
    val = resolve_source(root, image_size=8, channels=1, split="val")
    assert train.num_classes() == 2 and val.num_classes() == 2
    with caplog.at_level(logging.WARNING, logger="igc_convert.finetune"):
        result = finetune(converted(teacher), train, teacher=teacher, val_data=val,
                          config=FinetuneConfig(epochs=1, progress=False))
    assert result.best.metric == "agreement" and result.best.accuracy is None
    assert "2 classes, but the model has 10 outputs" in caplog.text
    with pytest.raises(DataError, match="2 classes, but the model has 10 outputs"):
        finetune(converted(teacher), train, teacher=teacher, val_data=val,
                 config=FinetuneConfig(epochs=1, ce_weight=1, progress=False))


def test_labels_past_the_models_outputs_are_refused_before_training(teacher):
    """Labels from a tensor source index up to 11 for a 10-output model: a clear error, not torch's
    cross-entropy IndexError in the first step."""
    x = torch.randn(24, 1, 8, 8)
    y = torch.arange(24) % 12
    with pytest.raises(DataError, match="labels up to 11, but the model has 10 outputs"):
        finetune(copy.deepcopy(teacher), list(zip(x, y)), config=FinetuneConfig(kd_weight=0, ce_weight=1,
                                                                               progress=False))


# ------------------------------------------------------------------------------------ torchrun
@pytest.mark.parametrize("distil", ["auto", "features"])
def test_torchrun_two_processes_identical_weights_rank0_writes(tmp_path, distil):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "_ddp_worker.py"), str(tmp_path), distil]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == 12  # 192 images / 2 ranks / 16 per batch = 6 steps, 2 epochs
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert r0["history"] == r1["history"]  # validation summed over both ranks' shards: one verdict
    ckpt = checkpoint_path(tmp_path / "ckpt")
    assert r0["writes"] and set(r0["writes"]) == {str(ckpt)}
    assert r1["writes"] == []
    saved = load_checkpoint(ckpt)
    assert saved["run"]["world_size"] == 2 and len(saved["rng"]) == 2
    if distil == "features":  # the converted layer's error against the original's output went down
        assert min(r0["history"][1:]) < r0["history"][0], r0["history"]


# ------------------------------------------------------------------------------------ CLI
def test_cli_finetune_writes_a_loadable_model_with_its_history(converted_files, tmp_path, capsys):
    from igc_convert.serialize import load

    _, files = converted_files
    out = tmp_path / "ft.safetensors"
    rc = cli_main(["finetune", str(files["a"]), "-o", str(out), "--data", "digits", "--epochs", "1",
                   "--batch-size", "128", "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert rc == 0, capsys.readouterr().err
    assert "accuracy: start" in capsys.readouterr().out
    result = load(out)
    before = load(files["a"])
    assert result.plan == before.plan and result.origin == before.origin
    history = result.report["finetune"]["history"]
    assert [e["epoch"] for e in history] == [0, 1] and history[0]["count"] == 359  # the held-out digits
    assert result.report["layers"] == before.report["layers"]  # the conversion report is kept
    assert checkpoint_path(tmp_path / "ckpt").exists()


def test_cli_fine_tunes_a_converted_torchvision_detector(tmp_path, capsys):
    """A detector's file (boxes, no class logits) goes through the finetune command: the teacher rebuilt
    from its origin, feature distillation chosen by itself, the history in the written file."""
    from igc_convert.serialize import load

    conv, tuned = tmp_path / "det.safetensors", tmp_path / "det-ft.safetensors"
    assert cli_main(["convert", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "none", "--params-ratio", "0.5",
                     "-o", str(conv)]) == 0
    capsys.readouterr()
    assert cli_main(["finetune", str(conv), "-o", str(tuned), "--data", "photos", "--samples", "8", "--val-samples",
                     "4", "--epochs", "1", "--batch-size", "4"]) == 0
    assert re.match(r"feature_error: start [\d.]+ -> kept [\d.]+ \(epoch [01] of 1, 2 steps\)",
                    capsys.readouterr().out)
    history = load(tuned).report["finetune"]["history"]
    assert [e["metric"] for e in history] == ["feature_error"] * 2 and all(e["feature_error"] > 0 for e in history)
    config = load(tuned).report["finetune"]["config"]
    assert config["distil"] == "auto" and config["lr"] == 1e-4  # feature distillation's default, not given
    out = tmp_path / "scores.json"  # evaluate gives a detector's feature error against its original
    assert cli_main(["evaluate", str(conv), str(tuned), "--data", "photos", "--samples", "4", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "feature error" in table and "original" not in table  # no class logits: no accuracy row
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == [str(conv), str(tuned)]
    assert all(r["feature_error"] > 0 and r["accuracy"] is None and r["agreement"] is None for r in rows)


def _cli_config(converted_files, tmp_path, monkeypatch, flags: list[str]) -> FinetuneConfig:
    """The FinetuneConfig the finetune command builds from ``flags`` (it stops before training)."""
    ft = importlib.import_module("igc_convert.finetune")  # the package binds the function to "finetune"

    seen = {}

    def fake(model, data, **kw):
        seen["config"] = kw["config"]
        raise ConfigError("stop here")

    monkeypatch.setattr(ft, "finetune", fake)
    _, files = converted_files
    out = tmp_path / "ft.safetensors"
    assert cli_main(["finetune", str(files["a"]), "-o", str(out), "--data", "digits", *flags]) == 2
    assert not out.exists()
    return seen["config"]


@pytest.mark.parametrize("flags,distil", [([], "auto"), (["--distil", "features"], "features")])
def test_cli_finetune_distil_option_reaches_the_config(converted_files, tmp_path, monkeypatch, flags, distil):
    assert _cli_config(converted_files, tmp_path, monkeypatch, flags).distil == distil


@pytest.mark.parametrize("flag,freeze", [("auto", None), ("frozen", True), ("live", False)])
def test_cli_finetune_bn_option_reaches_the_config(converted_files, tmp_path, monkeypatch, flag, freeze):
    assert _cli_config(converted_files, tmp_path, monkeypatch, ["--bn", flag]).freeze_bn is freeze


@pytest.mark.parametrize("flags, augment, flip", [([], False, True), (["--augment"], True, True),
                                                   (["--augment", "crop"], True, False)])
def test_cli_finetune_augment_option_reaches_the_config(converted_files, tmp_path, monkeypatch, flags, augment, flip):
    config = _cli_config(converted_files, tmp_path, monkeypatch, flags)
    assert (config.augment, config.augment and config.flip) == (augment, augment and flip)


@pytest.mark.parametrize("source, samples, val_samples, want", [
    ("photos", ["--samples", "48"], [], (48, 64)),  # crops: 48 asked for, 64 by default
    ("photos", ["--samples", "40"], ["--val-samples", "8"], (40, 8)),
    ("digits", ["--samples", "100"], ["--val-samples", "30"], (100, 30)),  # a seeded subset of each split
    ("digits", [], [], (1438, 359)),
])
def test_cli_finetune_sample_counts(converted_files, tmp_path, monkeypatch, source, samples, val_samples, want):
    finetune_module = importlib.import_module("igc_convert.finetune")

    if source == "photos":
        pytest.importorskip("skimage")
    _, files = converted_files
    seen = {}

    class Stop(Exception):
        pass

    def capture(model, data, teacher=None, val_data=None, **kwargs):
        seen["counts"] = (len(data), len(val_data))
        raise Stop

    monkeypatch.setattr(finetune_module, "finetune", capture)
    with pytest.raises(Stop):
        cli_main(["finetune", str(files["a"]), "-o", str(tmp_path / "ft.safetensors"), "--data", source]
                 + samples + val_samples)
    assert seen["counts"] == want


@pytest.mark.parametrize("flag", ["--samples", "--val-samples"])
def test_cli_finetune_sample_count_must_be_positive(converted_files, tmp_path, capsys, flag):
    _, files = converted_files
    assert cli_main(["finetune", str(files["a"]), "-o", str(tmp_path / "ft.safetensors"), "--data", "digits",
                     flag, "0"]) == 2
    assert f"{flag} must be positive" in capsys.readouterr().err
    assert not (tmp_path / "ft.safetensors").exists()


@pytest.mark.parametrize("case", ["teacher-gone", "labels-on-unlabelled", "empty-folder", "no-teacher-no-labels",
                                  "other-model-checkpoint"])
def test_cli_finetune_bad_input_is_exit_2_and_writes_nothing(converted_files, tmp_path, capsys, case):
    folder, files = converted_files
    out = tmp_path / "ft.safetensors"
    out.write_bytes(b"previous result")
    args = ["finetune", str(files["a"]), "-o", str(out), "--epochs", "1", "--batch-size", "128"]
    if case == "teacher-gone":
        moved = folder / "teacher.moved"
        (folder / "teacher.pt").rename(moved)
        try:
            rc = cli_main(args + ["--data", "digits"])
        finally:
            moved.rename(folder / "teacher.pt")
        expected = "cannot rebuild the teacher"
    elif case == "labels-on-unlabelled":
        rc, expected = cli_main(args + ["--data", "sample-images", "--labels"]), "labels were requested"
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        rc, expected = cli_main(args + ["--data", str(tmp_path / "empty")]), "holds no images"
    elif case == "no-teacher-no-labels":
        rc, expected = cli_main(args + ["--data", "digits", "--teacher", "none"]), "--labels"
    else:
        ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
        other = ["finetune", str(files["b"]), "-o", str(tmp_path / "b.safetensors"), "--epochs", "1",
                 "--batch-size", "128", "--data", "digits"]
        assert cli_main(other + ckpt) == 0
        capsys.readouterr()
        rc, expected = cli_main(args + ["--data", "digits", "--resume"] + ckpt), "different model"
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert out.read_bytes() == b"previous result"


def test_cli_teacher_of_a_random_init_conversion_is_that_very_model(tmp_path, monkeypatch):
    """`convert --weights none` then `finetune --teacher auto`: the teacher is the model that was
    converted (same seeded init), not another random draw of its architecture."""
    finetune_module = importlib.import_module("igc_convert.finetune")
    from igc_convert.models import build_model, state_digest

    out = tmp_path / "c.safetensors"
    assert cli_main(["convert", "igc_convert.digits:digits_resnet", "--weights", "none", "--seed", "4",
                     "--params-ratio", "0.5", "-o", str(out)]) == 0
    seen = {}

    class Stop(Exception):
        pass

    def capture(model, data, teacher=None, **kwargs):
        seen["teacher"] = teacher
        raise Stop

    monkeypatch.setattr(finetune_module, "finetune", capture)
    torch.manual_seed(99)  # the rebuild must not depend on the global generator
    with pytest.raises(Stop):
        cli_main(["finetune", str(out), "-o", str(tmp_path / "ft.safetensors"), "--data", "digits"])
    original, _ = build_model("igc_convert.digits:digits_resnet", seed=4)
    assert state_digest(seen["teacher"]) == state_digest(original)
    assert not (tmp_path / "ft.safetensors").exists()


class Segmenter(nn.Module):
    """torchvision's segmentation convention: ``{"out": N × classes × H × W, "aux": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        features = self.body(x)
        return {"out": self.head(features), "aux": features.mean(1, keepdim=True)}


def test_a_segmentation_model_is_distilled_per_pixel(data, caplog):
    """Fine-tuning a segmentation model failed on its dict output ('dict' has no attribute 'float').
    It now distils the per-pixel logits under "out"; the per-image labels of the data cannot be per-pixel
    classes, so they are set aside with a warning, and refused as a loss."""
    torch.manual_seed(0)
    teacher = Segmenter().eval()
    student = copy.deepcopy(teacher)
    student.body[3] = IGCV1.from_conv(teacher.body[3], primary_groups=2, secondary_groups=2, rank=2)
    train, val = data
    with caplog.at_level(logging.WARNING):
        result = finetune(student, train, teacher=teacher, val_data=val,
                          config=FinetuneConfig(epochs=2, lr=5e-3, progress=False))
    assert "one label per image, but the model classifies each pixel (5 classes)" in caplog.text
    start, best = result.history[0], result.best
    assert best.metric == "agreement" and start.accuracy is None
    assert 0 < start.agreement < 1 and 0 <= start.kl and best.kl < start.kl  # per-pixel means, and it learns
    x = torch.stack([val[i][0] for i in range(8)])
    with torch.no_grad():
        t, s = teacher(x)["out"], result.model(x)["out"]
    agree = float((t.argmax(1) == s.argmax(1)).double().mean())
    evaluated = [e for e in result.history if e.epoch == best.epoch][0]
    assert 0 < agree <= 1 and evaluated.agreement <= 1
    with pytest.raises(DataError, match="one label per image"):
        finetune(copy.deepcopy(student), train, teacher=teacher,
                 config=FinetuneConfig(epochs=1, ce_weight=1.0, progress=False))


class Detector(nn.Module):
    """torchvision's detector interface around a digits classifier's convs: training mode wants box
    targets, and eval mode returns, per image, as many boxes as pass a score threshold."""

    def __init__(self, body: Tiny) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = body.conv1, body.bn1, body.conv2, body.bn2
        torch.manual_seed(3)
        self.head = nn.Conv2d(self.conv2.out_channels, 1, 1)

    def forward(self, x: torch.Tensor, targets=None) -> list[dict[str, torch.Tensor]]:
        if self.training and targets is None:
            raise ValueError("targets should not be none when in training mode")
        scores = self.head(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))).sigmoid().flatten(1)
        return [dict(boxes=torch.zeros(int((s > 0.5).sum()), 4), scores=s[s > 0.5]) for s in scores]


def _relative_error_by_hand(student: Detector, teacher: Detector, data, batch_size: int) -> float:
    """The converted conv2's output against the original's, each model on its own activations: the
    mean over batches (weighted by their images) of ‖ŷ − y‖² / ‖y‖²."""
    x = torch.stack([data[i][0] for i in range(len(data))])
    total = 0.0
    with torch.no_grad():
        for xb in x.split(batch_size):
            y = teacher.conv2(F.relu(teacher.bn1(teacher.conv1(xb))))
            yhat = student.conv2(F.relu(student.bn1(student.conv1(xb))))
            total += len(xb) * float((yhat - y).pow(2).mean() / y.pow(2).mean())
    return total / len(x)


class _Normalised(nn.Module):
    """An embedding network's usual last step: unit-length rows."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def _embedding(net: nn.Module, how: str) -> nn.Module:
    net = copy.deepcopy(net)
    if how == "identity":  # the classifier removed: the pooled features come out
        net.fc = nn.Identity()
    elif how == "num_classes":  # timm's convention for a model built without a classifier
        net.num_classes = 0
    return _Normalised(net) if how == "normalise" else net


@pytest.mark.parametrize("how, why", [("identity", "the classifier 'fc' is nn.Identity"),
                                      ("normalise", "its rows have unit length"),
                                      ("num_classes", "num_classes is 0")])
def test_an_embedding_model_is_distilled_on_its_converted_layers_outputs(teacher, data, caplog, how, why):
    """Softmax over an embedding's dimensions teaches nothing sensible: ``distil='auto'`` matches the
    converted layers' outputs instead, and says why; ``distil='logits'`` still forces the logits."""
    train, val = data
    original, student = _embedding(teacher, how).eval(), _embedding(converted(teacher), how).eval()
    assert embedding_reason(original, train[0][0][None]) == why
    cfg = dict(epochs=1, lr=3e-3, progress=False)
    with caplog.at_level(logging.INFO, logger="igc_convert.finetune"):
        result = finetune(copy.deepcopy(student), train, teacher=original, val_data=val, config=FinetuneConfig(**cfg))
    assert f"the student's output is an embedding, not class logits ({why})" in caplog.text
    assert result.best.metric == "feature_error" and result.best.agreement is None
    forced = finetune(copy.deepcopy(student), train, teacher=original, val_data=val,
                      config=FinetuneConfig(distil="logits", **cfg))
    assert forced.best.metric != "feature_error" and forced.best.agreement is not None


def test_class_logits_are_not_taken_for_an_embedding(teacher):
    """A classifier's logits, including SqueezeNet's, which come out of a pooling layer, and a
    classifier whose rows merely happen to have similar lengths."""
    x = torch.randn(2, 1, 8, 8)
    assert embedding_reason(teacher, x) is None
    squeezenet = torchvision.models.squeezenet1_1(num_classes=10).eval()
    assert embedding_reason(squeezenet, torch.randn(1, 3, 64, 64)) is None
    with torch.no_grad():
        teacher_fc = copy.deepcopy(teacher)
        teacher_fc.fc.weight.mul_(1e3)  # long rows: never unit length by chance
    assert embedding_reason(teacher_fc, x) is None


def test_a_detector_is_distilled_on_its_converted_layers_outputs(teacher, data, caplog):
    """A model without class logits (boxes) is fine-tuned on what conversion changed: each converted
    layer's output against the original's. It trains in eval mode (a detector's training mode wants
    targets), its forward stops after the last converted layer, the best epoch has the lowest error,
    and the hooks come off both models."""
    train, val = data
    original = Detector(copy.deepcopy(teacher)).eval()
    student = Detector(converted(teacher)).eval()
    before = copy.deepcopy(original.state_dict())
    head_calls = []
    student.head.register_forward_hook(lambda *a: head_calls.append(1))
    calls_at_step = {}
    with caplog.at_level(logging.INFO, logger="igc_convert.finetune"):
        result = finetune(student, train, teacher=original, val_data=val,
                          on_step=lambda step: calls_at_step.setdefault(step, len(head_calls)),
                          config=FinetuneConfig(epochs=2, lr=3e-3, progress=False))
    assert "distils the converted layers' outputs instead (distil='features')" in caplog.text
    start, best = result.start, result.best
    assert best.metric == "feature_error" and best.accuracy is None and best.agreement is None
    assert start.feature_error == pytest.approx(_relative_error_by_hand(Detector(converted(teacher)).eval(),
                                                                        original, val, 64), rel=1e-5)
    assert best.epoch > 0 and best.feature_error < 0.8 * start.feature_error, [e.summary() for e in result.history]
    assert best.feature_error == pytest.approx(_relative_error_by_hand(student, original, val, 64), rel=1e-5)
    assert len(head_calls) == calls_at_step[1]  # no step nor validation ran the head
    assert not student.training and states_equal(original, original) and all(
        torch.equal(v, original.state_dict()[k]) for k, v in before.items())
    assert not student.conv2._forward_hooks and not original.conv2._forward_hooks
    scored = score(student, val, original, batch_size=64)  # what `igc-convert evaluate` reports for it
    assert scored.metric == "feature_error" and scored.feature_error == pytest.approx(best.feature_error, rel=1e-6)
    with pytest.raises(ConfigError, match="labels teach class logits"):
        finetune(copy.deepcopy(student), train, teacher=original, config=FinetuneConfig(ce_weight=1.0, progress=False))


def test_feature_distillation_resumes_exactly(teacher, tmp_path):
    """Killed mid-epoch and resumed from its checkpoint, a feature-distillation run ends with the very
    weights and history of the uninterrupted one."""
    train, val = digits("train", 256), digits("val", 64)
    original, start = Detector(copy.deepcopy(teacher)).eval(), Detector(converted(teacher)).eval()

    def run(folder: str, on_step=None, **kw):
        return finetune(copy.deepcopy(start), train, teacher=original, val_data=val, on_step=on_step,
                        config=FinetuneConfig(checkpoint_dir=tmp_path / folder, **RESUME_CFG, **kw))

    def kill(step: int) -> None:
        if step == 7:
            raise Kill

    reference = run("ref")
    with pytest.raises(Kill):
        run("run", on_step=kill)
    resumed = run("run", resume=True)
    assert resumed.resumed_from_step == 5 and resumed.steps == reference.steps
    assert reference.best.metric == "feature_error"
    assert states_equal(resumed.model, reference.model) and resumed.history == reference.history


def test_the_default_learning_rate_follows_the_distillation(teacher, monkeypatch):
    """lr=None: 5e-4 for logit distillation, 1e-4 for feature distillation (a detector's data-aware
    start got worse at 5e-4, benchmarks/detection_distil.py); a given lr is used as it is."""
    seen = []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, lr, **kw):
            seen.append(lr)
            super().__init__(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    train = digits("train", 64)
    finetune(converted(teacher), train, teacher=teacher, config=FinetuneConfig(epochs=1, progress=False))
    detector = dict(teacher=Detector(copy.deepcopy(teacher)).eval())
    finetune(Detector(converted(teacher)).eval(), train, **detector, config=FinetuneConfig(epochs=1, progress=False))
    finetune(Detector(converted(teacher)).eval(), train, **detector,
             config=FinetuneConfig(epochs=1, lr=2e-3, progress=False))
    assert seen == [5e-4, 1e-4, 2e-3]
    with pytest.raises(ConfigError, match="positive number or None"):
        FinetuneConfig(lr=0.0)


def test_a_model_without_class_logits_is_refused_when_logits_are_asked_for(teacher, data):
    """distil='logits', or no teacher, on a detection-style output (boxes): one clear error, before any
    step, naming what the model returns."""
    model = Detector(converted(teacher)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match=r"class logits .* returns list of Tensor\[\d+, 4\], Tensor\[\d+\]"):
        finetune(model, data[0], teacher=Detector(teacher).eval(),
                 config=FinetuneConfig(epochs=1, distil="logits", progress=False))
    with pytest.raises(ModelError, match="class logits"):
        finetune(model, data[0], config=FinetuneConfig(epochs=1, kd_weight=0, ce_weight=1, progress=False))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="distil"):
        FinetuneConfig(distil="boxes")


def test_a_classifier_can_be_distilled_on_its_layers_outputs(teacher, data):
    train, val = data
    result = finetune(converted(teacher), train, teacher=teacher, val_data=val,
                      config=FinetuneConfig(epochs=1, lr=3e-3, distil="features", progress=False))
    assert result.best.metric == "feature_error" and result.best.feature_error < result.start.feature_error


def test_a_model_with_auxiliary_training_outputs_is_distilled_on_its_main_logits():
    """torchvision's GoogLeNet and Inception v3 (aux_logits=True, as their pretrained weights build them)
    return (logits, aux...) in training mode: fine-tuning failed ('GoogLeNetOutputs' object has no
    attribute 'float'). It distils the main logits."""
    import torchvision

    torch.manual_seed(0)
    teacher = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=10).eval()
    student = copy.deepcopy(teacher)
    student.inception5b.branch1.conv = IGCV1.from_conv(teacher.inception5b.branch1.conv, rank=8)
    photos = resolve_source("sample-images", image_size=64, samples=8, split="train")
    result = finetune(student, photos, teacher=teacher, val_data=photos,
                      config=FinetuneConfig(epochs=1, batch_size=4, lr=1e-3, progress=False))
    assert result.best.metric == "agreement" and 0 <= result.best.agreement <= 1
    assert result.history[-1].epoch == 1


def test_a_segmentation_model_learns_from_class_masks(tmp_path, caplog):
    """A folder of images and masks trains a segmentation model pixel by pixel (cross-entropy over the
    labelled pixels, 255 ignored), and its per-pixel accuracy picks the best epoch; masks that name a
    class the model does not have, or a model that classifies whole images, are refused as a loss."""
    from test_data import _segmentation_folder

    root = _segmentation_folder(tmp_path / "seg", count=16)
    train = resolve_source(root, image_size=16, split="train", labels=True)
    val = resolve_source(root, image_size=16, split="val")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))

    class Seg(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return {"out": self.body(x)}

    result = finetune(Seg(model), train, val_data=val,
                      config=FinetuneConfig(epochs=6, lr=2e-2, kd_weight=0, ce_weight=1, batch_size=4, progress=False))
    start, best = result.history[0], result.best
    assert best.metric == "accuracy" and best.accuracy > max(start.accuracy, 0.9) and best.loss < start.loss
    x, y = val[0]
    with torch.no_grad():
        pred = result.model(x[None])["out"].argmax(1)[0]
    assert (pred[y >= 0] == y[y >= 0]).float().mean() > 0.9

    one_class = Seg(nn.Conv2d(3, 1, 1))  # mask value 1 is out of its range
    with pytest.raises(DataError, match="holds class 1, but the model has 1 classes"):
        finetune(one_class, train, config=FinetuneConfig(epochs=1, kd_weight=0, ce_weight=1, progress=False))
    strided = Seg(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)))  # logits at 1/2 size
    result = finetune(strided, train, val_data=val,
                      config=FinetuneConfig(epochs=4, lr=2e-2, kd_weight=0, ce_weight=1, batch_size=4, progress=False))
    assert result.best.accuracy > max(result.history[0].accuracy, 0.8)  # scored on upsampled logits
    classifier = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(DataError, match="has class masks, but the model classifies whole images"):
        finetune(classifier, train, config=FinetuneConfig(epochs=1, kd_weight=0, ce_weight=1, progress=False))


def test_augmented_batches_crop_and_flip_images_and_masks_alike():
    """Each image gets its own crop and flip; a mask gets the same ones, so its class-1 pixels stay on
    the bright pixels of its image; class labels pass through; a seeded run repeats its draws."""
    from igc_convert.finetune import augment_batch

    x = torch.full((6, 3, 20, 30), -1.0)
    y = torch.zeros(6, 20, 30, dtype=torch.long)
    for i in range(6):
        x[i, :, 2 + i : 14 + i, 3 * i : 3 * i + 12] = 1.0
        y[i, 2 + i : 14 + i, 3 * i : 3 * i + 12] = 1
    torch.manual_seed(0)
    xa, ya = augment_batch(x, y)
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == torch.long
    assert not torch.equal(xa, x)
    for i in range(6):  # bilinear edges blend at most 3/4 of the other side into a pixel nearest-exact labels
        ones = ya[i] == 1
        assert (xa[i, 0][ones] > -0.6).all() and (xa[i, 0][~ones] < 0.6).all()
    torch.manual_seed(0)
    again = augment_batch(x, y)
    assert torch.equal(again[0], xa) and torch.equal(again[1], ya)
    labels = torch.arange(6)
    assert torch.equal(augment_batch(x, labels)[1], labels)
    torch.manual_seed(0)  # without flips: the same crops, none mirrored
    crops, crop_masks = augment_batch(x, y, flip=False)
    mirrored = [i for i in range(6) if not torch.equal(crops[i], xa[i])]
    assert mirrored and all(torch.equal(crops[i].flip(-1), xa[i]) and torch.equal(crop_masks[i].flip(-1), ya[i])
                            for i in mirrored)


def test_fine_tuning_with_augmentation_runs_and_repeats(data, teacher):
    train, val = data
    config = FinetuneConfig(epochs=1, lr=1e-3, augment=True, progress=False)
    runs = [finetune(converted(teacher), train, teacher=teacher, val_data=val, config=config) for _ in range(2)]
    assert runs[0].history == runs[1].history and runs[0].history[-1].epoch == 1
    plain = finetune(converted(teacher), train, teacher=teacher, val_data=val,
                     config=FinetuneConfig(epochs=1, lr=1e-3, progress=False))
    assert plain.history[-1] != runs[0].history[-1]  # the crops and flips changed what it learnt


def test_class_masks_from_a_dict_dataset_train_a_segmentation_model():
    """Hugging Face's segmentation layout, {"pixel_values": x, "labels": mask}, end to end: the masks
    reach the per-pixel loss and pixel accuracy."""
    class Halves(torch.utils.data.Dataset):  # class 1 where the image is bright (its right half)
        def __len__(self):
            return 32

        def __getitem__(self, i):
            x = torch.full((3, 8, 8), -1.0)
            x[..., 4:] = 1.0
            mask = torch.zeros(8, 8, dtype=torch.long)
            mask[:, 4:] = 1
            return {"pixel_values": x + 0.1 * torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)),
                    "labels": mask}

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return {"out": self.conv(x)}

    torch.manual_seed(0)
    result = finetune(Seg(), Halves(), val_data=Halves(),
                      config=FinetuneConfig(epochs=3, lr=5e-2, kd_weight=0, ce_weight=1, batch_size=8, progress=False))
    assert result.best.metric == "accuracy" and result.best.accuracy == 1.0


def test_images_the_model_cannot_take_are_a_data_error_before_any_training(teacher):
    steps = []
    with pytest.raises(DataError, match=r"fails on the images of .*of shape \(3, 12, 12\).*RuntimeError"):
        finetune(noisy_copy(teacher, 0.1), torch.randn(8, 3, 12, 12), teacher=teacher, on_step=steps.append,
                 config=FinetuneConfig(epochs=1, progress=False))
    assert steps == []
    with pytest.raises(DataError, match="fails on the images"):
        score(teacher, torch.randn(4, 3, 12, 12), teacher=teacher)


def test_score_takes_a_list_of_pairs_as_finetune_does(teacher, caplog):
    # Labels that cannot be the model's 10 classes: left out with a warning (an IndexError before).
    x = digits("val", 8)
    items = [(x[i][0], 42) for i in range(len(x))]
    with caplog.at_level(logging.WARNING):
        ev = score(teacher, items, teacher=teacher)
    assert "cannot be its classes" in caplog.text and ev.count == 8 and ev.agreement == 1.0
    with pytest.raises(DataError, match="nothing to score against"):
        score(teacher, items)
    good = [(x[i][0], int(x[i][1])) for i in range(len(x))]
    assert score(teacher, good).accuracy == score(teacher, x).accuracy
