"""igc-convert: turn the dense convolutions of a pretrained CNN into Interleaved Group Convolutions.

Example::

    import torch, torchvision, igc_convert
    model = torchvision.models.resnet18(weights="DEFAULT")
    result = igc_convert.convert(model, igc_convert.ParamsRatio(0.25))
    print(result.report.table())
    tuned = igc_convert.finetune(result.model, images, teacher=model, epochs=3)
    igc_convert.export_onnx(tuned.model, "resnet18-igc.onnx", torch.randn(1, 3, 224, 224))

The three jobs' entry points are here; the modules hold the rest. ``export_onnx``, ``bench_onnx``
and ``enforce_not_slower`` are imported on first use (ONNX and onnxruntime would add a second to
``import igc_convert``). ``igc_convert.finetune`` is the function: import the module's other names
from it (``from igc_convert.finetune import FinetuneConfig``).
"""

import importlib

__version__ = "0.1.0"

from .blocks import IGCV1, IGCV2, IGCV3, IGCBlock  # noqa: E402
from .convert import ConversionResult, apply_plan, convert  # noqa: E402
from .errors import IGCError  # noqa: E402
from .plan import LatencyRatio, MacsRatio, MaxError, ParamsRatio  # noqa: E402
from .agreement import measure_agreement  # noqa: E402
from .data import resolve_source  # noqa: E402
from .serialize import load, save  # noqa: E402
# Binds the function over the submodule of the same name: ``igc_convert.finetune(...)`` fine-tunes.
from .finetune import FinetuneConfig, finetune, score  # noqa: E402

#: name → the module of this package that defines it, imported when the name is first used
_LAZY = {"export_onnx": "export", "bench_onnx": "bench", "enforce_not_slower": "latency"}

__all__ = ["IGCV1", "IGCV2", "IGCV3", "IGCBlock", "ConversionResult", "apply_plan", "convert", "IGCError",
           "LatencyRatio", "MacsRatio", "MaxError", "ParamsRatio", "measure_agreement", "resolve_source", "load",
           "save", "FinetuneConfig", "finetune", "score", "__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
