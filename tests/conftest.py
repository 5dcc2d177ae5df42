"""Fixtures and helpers shared by several test modules."""

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convs gain nothing from threads, and lose a lot when other jobs share the cores.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
