"""``igc-convert report``: print the per-layer table stored in a converted model file."""

from __future__ import annotations

import argparse
import json

from ..errors import FileFormatError

HELP = "print the per-layer conversion report stored in a converted model file"
EXAMPLE = "igc-convert report resnet18-igc.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("converted", metavar="CONVERTED", help="converted model file (from igc-convert convert)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..report import Report
    from ..serialize import read_metadata

    meta = read_metadata(args.converted)
    if not meta.get("report"):
        raise FileFormatError(f"{args.converted}: the file holds no conversion report")
    if args.json:
        print(json.dumps(meta["report"], indent=2))
    else:
        print(Report.from_dict(meta["report"]).table())
    return 0
