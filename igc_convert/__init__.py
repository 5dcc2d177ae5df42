"""igc-convert: turn the dense convolutions of a pretrained CNN into Interleaved Group Convolutions.

Example::

    import torchvision, igc_convert
    model = torchvision.models.resnet18(weights="DEFAULT")
    result = igc_convert.convert(model, igc_convert.ParamsRatio(0.25))
    print(result.report.table())
"""

__version__ = "0.1.0"

from .blocks import IGCV1, IGCV2, IGCV3, IGCBlock  # noqa: E402
from .convert import ConversionResult, apply_plan, convert  # noqa: E402
from .errors import IGCError  # noqa: E402
from .plan import LatencyRatio, MacsRatio, MaxError, ParamsRatio  # noqa: E402

__all__ = ["IGCV1", "IGCV2", "IGCV3", "IGCBlock", "ConversionResult", "apply_plan", "convert", "IGCError",
           "LatencyRatio", "MacsRatio", "MaxError", "ParamsRatio", "__version__"]
