"""The package's top-level names: the three jobs' entry points, as the issues and the README spell them."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import igc_convert as ic

HOMES = {  # name → the module that defines it
    "convert": "convert", "apply_plan": "convert", "ConversionResult": "convert",
    "ParamsRatio": "plan", "MacsRatio": "plan", "MaxError": "plan", "LatencyRatio": "plan",
    "IGCV1": "blocks", "IGCV2": "blocks", "IGCV3": "blocks", "IGCBlock": "blocks", "IGCError": "errors",
    "load": "serialize", "save": "serialize", "resolve_source": "data", "measure_agreement": "agreement",
    "finetune": "finetune", "FinetuneConfig": "finetune", "score": "finetune",
    "export_onnx": "export", "bench_onnx": "bench", "enforce_not_slower": "latency",
}


@pytest.mark.parametrize("name", sorted(HOMES))
def test_every_top_level_name_is_its_module_s_object(name):
    module = importlib.import_module(f"igc_convert.{HOMES[name]}")
    assert getattr(ic, name) is getattr(module, name)
    assert name in ic.__all__ and name in dir(ic)


def test_all_lists_exactly_the_top_level_names():
    assert sorted(set(ic.__all__) - {"__version__"}) == sorted(HOMES)
    namespace: dict = {}
    exec("from igc_convert import *", namespace)
    assert {n for n in namespace if not n.startswith("__")} | {"__version__"} == set(ic.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'igc_convert' has no attribute 'export_onxx'"):
        ic.export_onxx


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def test_importing_the_package_loads_onnx_only_when_export_is_used():
    code = ("import sys, igc_convert as ic; before = 'onnx' in sys.modules or 'onnxruntime' in sys.modules; "
            "ic.export_onnx; print(before, 'onnx' in sys.modules)")
    assert _fresh(code) == "False True"


def test_finetune_is_the_function_whichever_import_comes_first():
    # A submodule import binds the module to its package's attribute; the package binds the function
    # over it, and a module imported earlier (the README imports names from it) does not undo that.
    code = ("from igc_convert.finetune import FinetuneConfig; import igc_convert as ic; "
            "import igc_convert.finetune; print(callable(ic.finetune), ic.finetune.__module__, "
            "ic.FinetuneConfig is FinetuneConfig)")
    assert _fresh(code) == "True igc_convert.finetune True"


def test_the_readme_python_example_uses_names_the_package_has():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    compile(block, "README.md", "exec")
    used = set(re.findall(r"\bic\.(\w+)", block))
    assert {"convert", "finetune", "export_onnx", "resolve_source"} <= used
    assert all(hasattr(ic, name) for name in used), sorted(n for n in used if not hasattr(ic, n))
