"""Injected faults: interrupted fine-tuning, interrupted writes, failing disks.

Fine-tuning is killed between two steps (a real SIGKILL of a child process) and in the middle of a
checkpoint write (the writer raising after half the bytes, and a real SIGKILL after half the bytes):
the last good checkpoint stays intact and loadable, and resuming from it ends with exactly the weights
and history of an uninterrupted run. ``convert`` and ``export`` are interrupted mid-write (Ctrl-C,
disk full, an I/O error at the final rename): the destination keeps its old bytes, no temporary file
is left behind, and the CLI says what happened in one line.
"""

from __future__ import annotations

import copy
import errno
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import igc_convert as ic
from igc_convert.cli import main
from igc_convert.errors import FileFormatError
from igc_convert.files import atomic_path, atomic_write, remove_stale_temporaries
from igc_convert.finetune import FinetuneConfig, checkpoint_path, finetune, load_checkpoint

TESTS = Path(__file__).resolve().parent
OLD = b"the previous good version of this file\n"


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way may swallow it."""


# ------------------------------------------------------------------------------------------ a small run
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.2)  # random masks: the RNG state must survive the kill too
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.fc(self.drop(x.mean((2, 3))))


def make_run(checkpoint_dir: str | os.PathLike, resume: bool = False):
    """Student, data and config of the run every test interrupts (also imported by the child process).

    96 training images in batches of 32: 3 steps per epoch, 2 epochs; checkpoints at steps 2, 3 (end
    of epoch 1), 4 and 6.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4].sum((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].sum((1, 2)) > 0).long()
    torch.manual_seed(0)
    student = Net()
    config = FinetuneConfig(epochs=2, batch_size=32, lr=5e-3, kd_weight=0.0, ce_weight=1.0, freeze_bn=False,
                            checkpoint_every=2, checkpoint_dir=str(checkpoint_dir), resume=resume, progress=False)
    return student, TensorDataset(x[:96], y[:96]), TensorDataset(x[96:], y[96:]), config


def run(checkpoint_dir, resume: bool = False, on_step=None):
    student, train, val, config = make_run(checkpoint_dir, resume)
    return finetune(student, train, val_data=val, config=config, on_step=on_step)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, and the bytes of its second checkpoint (step 3, the end of epoch 1)."""
    folder = tmp_path_factory.mktemp("reference")
    written: list[bytes] = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # every checkpoint reaches its place through one rename
        if Path(dst).name == "last.pt":
            written.append(Path(src).read_bytes())
        return real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        result = run(folder)
    assert result.steps == 6 and len(written) == 4  # steps 2, 3 (epoch end), 4, 6 (epoch end)
    assert load_checkpoint(io.BytesIO(written[1]))["step"] == 3
    return result, written[1]


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and ".tmp" in p.name)


def _resume_matches(folder: Path, reference, from_step: int) -> None:
    resumed = run(folder, resume=True)
    result, _ = reference
    assert resumed.resumed_from_step == from_step
    assert resumed.steps == result.steps
    assert states_equal(resumed.model, result.model), "resumed weights differ from the uninterrupted run"
    assert resumed.history == result.history


# ------------------------------------------------------------------------------------------ fine-tuning
def test_killed_between_steps_resumes_exactly(reference, tmp_path):
    """A real SIGKILL after step 5: the step-4 checkpoint is what is left, and resume redoes step 5."""
    child = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        torch.set_num_threads(1)
        from test_faults import run

        def on_step(step):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)

        run({str(tmp_path)!r}, on_step=on_step)
        """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(checkpoint_path(tmp_path))["step"] == 4
    assert _leftovers(tmp_path, "last.pt") == []  # nothing was being written when it died
    _resume_matches(tmp_path, reference, from_step=4)


@pytest.mark.parametrize("how", ["exception", "sigkill"])
def test_killed_during_a_checkpoint_write_keeps_the_last_good_one(reference, tmp_path, monkeypatch, how):
    """The step-4 checkpoint write dies after half its bytes: the step-3 checkpoint stays, byte for byte.

    ``exception``: the writer raises (as on Ctrl-C): the temporary file is removed too.
    ``sigkill``: a real SIGKILL of a child process: no code runs afterwards, so the hidden temporary
    file stays next to the checkpoint, and nothing else changes.
    """
    _, good = reference
    if how == "exception":
        real_save, calls = torch.save, []

        def dying_save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) < 3:  # steps 2 and 3 are written whole
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            raise Killed

        monkeypatch.setattr(torch, "save", dying_save)
        with pytest.raises(Killed):
            run(tmp_path)
        monkeypatch.undo()
        assert _leftovers(tmp_path, "last.pt") == []
    else:
        child = textwrap.dedent(f"""
            import io, os, signal, sys, torch
            sys.path.insert(0, {str(TESTS)!r})
            torch.set_num_threads(1)
            from test_faults import run

            real_save, calls = torch.save, []

            def dying_save(obj, f, *args, **kwargs):
                calls.append(1)
                if len(calls) < 3:
                    return real_save(obj, f, *args, **kwargs)
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = dying_save
            run({str(tmp_path)!r})
            """)
        proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        leftovers = _leftovers(tmp_path, "last.pt")
        assert len(leftovers) == 1, sorted(p.name for p in tmp_path.iterdir())
        half = (tmp_path / leftovers[0]).stat().st_size
        assert 0 < half < len(good)  # the half-written new checkpoint, never at the destination
    assert checkpoint_path(tmp_path).read_bytes() == good
    assert load_checkpoint(checkpoint_path(tmp_path))["step"] == 3
    _resume_matches(tmp_path, reference, from_step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the resumed run removed the leftover


def test_a_failing_disk_during_a_checkpoint_write_is_a_clear_error(tmp_path, monkeypatch):
    """ENOSPC mid-write: FileFormatError naming the checkpoint, the previous one intact, no temp file."""
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(FileFormatError, match=r"cannot write .*last\.pt.*No space left on device"):
        run(tmp_path)
    assert load_checkpoint(checkpoint_path(tmp_path))["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# ------------------------------------------------------------------------------------------ convert / export
@pytest.fixture(scope="module")
def converted_file(tmp_path_factory) -> Path:
    from igc_convert.models import build_model
    from igc_convert.serialize import save

    folder = tmp_path_factory.mktemp("converted")
    model, origin = build_model("igc_convert.digits:digits_resnet")
    result = ic.convert(model, ic.ParamsRatio(0.5), example_inputs=torch.randn(1, 1, 12, 12), progress=False)
    return save(folder / "m.safetensors", result.model, origin=origin, plan=result.plan)


def _existing(folder: Path, *names: str) -> dict[str, tuple[bytes, int]]:
    out = {}
    for name in names:
        (folder / name).write_bytes(OLD + name.encode())
        out[name] = ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns)
    return out


def _unchanged(folder: Path, before: dict[str, tuple[bytes, int]]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(before), "new or vanished files (temp leftovers?)"
    for name, (data, mtime) in before.items():
        assert (folder / name).read_bytes() == data and (folder / name).stat().st_mtime_ns == mtime, name


def _half_then(error: BaseException):
    """A stand-in for ``safetensors.torch.save_file`` that writes half the file, then fails."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise error

    return save_file


CONVERT = ["convert", "igc_convert.digits:digits_resnet", "--params-ratio", "0.5", "--input-size", "12"]


@pytest.mark.parametrize("error, code, message", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "error: cannot write .*No space left on device"),
], ids=["ctrl-c", "disk-full"])
def test_convert_interrupted_while_writing_leaves_the_old_file(tmp_path, monkeypatch, capsys, error, code, message):
    import safetensors.torch

    before = _existing(tmp_path, "m.safetensors", "r.json")
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then(error))
    argv = CONVERT + ["-o", str(tmp_path / "m.safetensors"), "--report", str(tmp_path / "r.json")]
    assert main(argv) == code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("igc-convert")]
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    _unchanged(tmp_path, before)  # the report is written after the model: it was never reached


@pytest.mark.parametrize("fault", ["rename-fails", "write-interrupted", "fsync-fails"])
def test_export_interrupted_while_writing_leaves_the_old_file(tmp_path, monkeypatch, fault):
    from igc_convert import export

    before = _existing(tmp_path, "m.onnx")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    if fault == "rename-fails":
        monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        expected = (FileFormatError, r"cannot write .*m\.onnx.*I/O error")
    elif fault == "fsync-fails":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        expected = (FileFormatError, "I/O error")
    else:
        real = export.atomic_write

        class Dying(io.RawIOBase):
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                raise Killed

        def dying_atomic_write(path, mode="wb"):
            cm = real(path, mode)

            class Wrapper:
                def __enter__(self):
                    return Dying(cm.__enter__())

                def __exit__(self, *exc):
                    return cm.__exit__(*exc)

            return Wrapper()

        monkeypatch.setattr(export, "atomic_write", dying_atomic_write)
        expected = (Killed, None)
    with pytest.raises(expected[0], match=expected[1]):
        export.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), exporter="torchscript",
                           dynamic_batch=False)
    monkeypatch.undo()
    _unchanged(tmp_path, before)


def test_a_crashing_exporter_falls_back_and_says_so_in_one_line(tmp_path, monkeypatch, caplog, capfd):
    """torch.export failing (as it did on circular padding with a dynamic batch) logs whole tracebacks
    through torch's loggers; export falls back to TorchScript and only its own one-line warning shows."""
    import logging

    from igc_convert.export import export_onnx

    real = torch.onnx.export

    def crashing(*args, dynamo=True, **kwargs):
        if dynamo:
            logging.getLogger("torch._guards").error("Error while creating guard:\nTraceback (most recent call last):")
            raise RuntimeError("Invalid ranges [2:1]")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", crashing)
    caplog.set_level(logging.DEBUG)
    torch.manual_seed(0)
    result = export_onnx(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert result.exporter == "torchscript" and result.rel_diff <= 1e-4 and result.path.stat().st_size > 0
    # torch's loggers have their own stderr handler (they do not propagate to the root logger)
    assert "Error while creating guard" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name.startswith("torch") and r.levelno >= logging.ERROR]
    ours = [r.getMessage() for r in caplog.records if r.name == "igc_convert.export" and r.levelno == logging.WARNING]
    assert any(m == "dynamo exporter failed: Invalid ranges [2:1]" for m in ours), ours


def test_cli_export_killed_while_writing_leaves_no_partial_file(converted_file, tmp_path):
    """A real SIGKILL in the middle of writing the ONNX file: the old destination survives byte for
    byte, and only the hidden temporary file is left next to it."""
    before = _existing(tmp_path, "m.onnx")
    child = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from igc_convert import export
        from igc_convert.cli import main

        real = export.atomic_write

        class Dying:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                os.fsync(self.f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

        class Wrapper:
            def __init__(self, path, mode="wb"):
                self.cm = real(path, mode)

            def __enter__(self):
                return Dying(self.cm.__enter__())

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)

        export.atomic_write = Wrapper
        main(["export", {str(converted_file)!r}, "-o", {str(tmp_path / "m.onnx")!r}, "--input-size", "12",
              "--exporter", "torchscript", "--static-batch"])
        """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = _leftovers(tmp_path, "m.onnx")
    assert len(leftovers) == 1 and (tmp_path / leftovers[0]).stat().st_size > 0
    (tmp_path / leftovers[0]).unlink()
    _unchanged(tmp_path, before)


# ------------------------------------------------------------------------------------------ atomic writes
@pytest.mark.parametrize("writer", ["atomic_write", "atomic_path"])
@pytest.mark.parametrize("fault", ["body-raises", "ctrl-c", "disk-full", "rename-fails"])
def test_atomic_writers_never_leave_a_partial_destination(tmp_path, monkeypatch, writer, fault):
    dest = tmp_path / "out.bin"
    before = _existing(tmp_path, "out.bin")
    errors = {"body-raises": ValueError("bad data"), "ctrl-c": KeyboardInterrupt(),
              "disk-full": OSError(errno.ENOSPC, "No space left on device")}
    expected = {"body-raises": ValueError, "ctrl-c": KeyboardInterrupt, "disk-full": FileFormatError,
                "rename-fails": FileFormatError}[fault]
    if fault == "rename-fails":
        monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
    with pytest.raises(expected):
        if writer == "atomic_write":
            with atomic_write(dest, "wb") as f:
                f.write(b"new half")
                if fault in errors:
                    raise errors[fault]
        else:
            with atomic_path(dest) as tmp:
                tmp.write_bytes(b"new half")
                if fault in errors:
                    raise errors[fault]
    monkeypatch.undo()
    _unchanged(tmp_path, before)


def test_atomic_write_replaces_whole_and_keeps_umask_permissions(tmp_path):
    dest = tmp_path / "out.json"
    dest.write_text("old")
    with atomic_write(dest, "w") as f:
        f.write("new")
    mask = os.umask(0)
    os.umask(mask)
    assert dest.read_text() == "new" and (dest.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_convert_does_not_touch_the_callers_model_when_the_fit_fails(monkeypatch):
    """A failure in the middle of the fit-and-swap loop (after some layers were swapped) must not leak
    into the caller's model: convert works on a copy."""
    from igc_convert.blocks import IGCV1

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1)).eval()
    before = copy.deepcopy(net.state_dict())
    real, calls = IGCV1.fit, []

    def fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(IGCV1, "fit", staticmethod(fit))
    with pytest.raises(Killed):
        ic.convert(net, ic.ParamsRatio(0.4), progress=False)
    assert len(calls) == 2
    assert all(isinstance(m, (nn.Conv2d, nn.ReLU)) for m in net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("where", ["second fit", "last step"])
def test_a_failed_inplace_conversion_leaves_the_callers_model_as_it_was(where, monkeypatch):
    """Interrupted (Ctrl-C, an error), an in-place conversion gives back the modules it swapped, the
    BatchNorm statistics and Linear weights it wrote into, and every train/eval flag."""
    from igc_convert import stdconv
    from igc_convert.blocks import BLOCKS

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    net[5].train()  # flags are given back as they were, mixed ones too
    calib = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    x = calib[:2]
    modules = dict(net.named_modules())
    flags = {n: m.training for n, m in modules.items()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        expected = net(x)
    seen = {}

    def interrupt():
        seen["swapped"] = sum(isinstance(m, ic.IGCBlock) for m in net.modules())
        seen["written"] = [k for k, v in net.state_dict().items() if k in before and not torch.equal(v, before[k])]
        raise Killed

    if where == "second fit":
        fit, calls = BLOCKS["igcv1"].fit, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                interrupt()
            return fit(*args, **kwargs)

        monkeypatch.setattr(BLOCKS["igcv1"], "fit", staticmethod(failing))
    else:
        monkeypatch.setattr(stdconv, "restore", lambda *a: interrupt())
    with pytest.raises(Killed):
        ic.convert(net, ic.ParamsRatio(0.3), calibration=calib, inplace=True, refit_linears=True, max_positions=16,
                   progress=False)
    assert seen["swapped"] >= 1  # the failure came part-way: the model had been changed
    if where == "last step":
        assert {"4.running_mean", "10.weight"} <= set(seen["written"])
    assert dict(net.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in net.named_modules())
    assert {n: m.training for n, m in net.named_modules()} == flags
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_remove_stale_temporaries_touches_only_the_files_own_temporaries(tmp_path):
    names = [".last.pt.k3j2.tmp", ".last.pt.zz.tmp.onnx", "last.pt", ".last.ptx.k3j2.tmp", "other.tmp",
             ".other.pt.a.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path / "last.pt")
    assert [p.name for p in removed] == [".last.pt.k3j2.tmp", ".last.pt.zz.tmp.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert remove_stale_temporaries(tmp_path / "missing-folder" / "last.pt") == []
