"""Fixtures and helpers shared by several test modules."""

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run by default, so a run (CI's included) passes or
# fails on the code alone; HYPOTHESIS_PROFILE=explore draws new ones, to look for failures.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convs gain nothing from threads, and lose a lot when other jobs share the cores.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def refuse_new_files(monkeypatch):
    """``refuse(folder, err)``: every temporary file made in ``folder`` raises ``err`` from then on, as a
    read-only or pseudo file system would even for root (whom permission bits never stop)."""
    import tempfile

    real = tempfile.mkstemp
    refused: dict[Path, OSError] = {}

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) in refused:
            raise refused[Path(dir)]
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return lambda folder, err: refused.__setitem__(Path(folder), err)


@pytest.fixture(scope="module")
def converted_files(tmp_path_factory):
    """Two converted digits models (different plans) written as the convert command would."""
    from igc_convert import ParamsRatio, convert
    from igc_convert.digits import digits_resnet
    from igc_convert.models import build_model
    from igc_convert.serialize import save

    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    torch.save(digits_resnet().state_dict(), folder / "teacher.pt")
    model, origin = build_model("igc_convert.digits:digits_resnet", folder / "teacher.pt")
    files = {}
    for name, ratio in (("a", 0.3), ("b", 0.6)):
        result = convert(model, ParamsRatio(ratio), progress=False)
        files[name] = folder / f"{name}.safetensors"
        save(files[name], result.model, origin=origin, plan=result.plan, report=result.report)
    return folder, files


ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, module_name: str) -> ModuleType:
    """Import a script of the repository (``benchmarks/x.py``, ``examples/y.py``) as a module.

    Registered in ``sys.modules`` while it executes: dataclasses look their module up as they are built.
    """
    spec = importlib.util.spec_from_file_location(module_name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def importable_module(tmp_path_factory, name: str, source: str):
    """Write ``source`` as module ``name`` in a fresh folder on ``sys.path`` for the ``with`` block."""
    folder = tmp_path_factory.mktemp("nets")
    (folder / f"{name}.py").write_text(source)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield folder
