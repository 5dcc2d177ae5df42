"""igc-convert: turn the dense convolutions of a pretrained CNN into Interleaved Group Convolutions.

Example::

    import torchvision, igc_convert
    model = torchvision.models.resnet18(weights="DEFAULT")
    result = igc_convert.convert(model, igc_convert.ParamsRatio(0.25))
    print(result.report.table())
"""

__version__ = "0.1.0"
