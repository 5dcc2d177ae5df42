"""Command-line interface: ``igc-convert SUBCOMMAND ...`` (also ``python -m igc_convert``).

Each subcommand lives in its own module of this package and exposes ``HELP`` (one line),
``EXAMPLE`` (shown by ``--help``), ``add_arguments(parser)`` and ``run(args) -> int``. This module
is the only place that catches the project's exceptions: a user error prints one line on stderr and
exits with code 2; results go to stdout or files, logs to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from .. import __version__
from ..errors import IGCError

#: Subcommand name -> module (imported lazily so ``--help`` stays fast).
SUBCOMMANDS = {
    "convert": "convert",
    "report": "report",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "export": "export",
    "bench": "bench",
    "demo": "demo",
}

EXIT_USER_ERROR = 2


def _load(name: str):
    return importlib.import_module(f"{__name__}.{SUBCOMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    """The full parser (every subcommand); the README's CLI reference is checked against it."""
    parser = argparse.ArgumentParser(
        prog="igc-convert",
        description="Convert dense convolutions of pretrained CNNs into Interleaved Group Convolution "
        "blocks, fine-tune them by distillation, export them to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"igc-convert {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = _load(name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=f"example:\n  {module.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def reference_markdown() -> str:
    """The README's CLI reference, generated from the parser (a test keeps the README in sync).

    Regenerate with ``python -m igc_convert.cli.reference``.
    """
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["### CLI reference", ""]
    for name, p in sub.choices.items():
        p.prog = f"igc-convert {name}"
        # a fixed width: the reference must not depend on the terminal it was generated in
        p.formatter_class = lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100)
        usage = p.format_usage().replace("usage: ", "").strip()
        parts += [f"**`igc-convert {name}`** — {p.description}", "", "```", usage, "```", ""]
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flags = ", ".join(f"`{o}`" for o in action.option_strings)
            text = p._get_formatter()._expand_help(action) if action.help else ""  # "%%" -> "%", as --help shows
            parts.append(f"- {flags}: {text}".rstrip())
        parts += ["", f"Example: `{p.epilog.split(chr(10))[-1].strip()}`", ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``igc-convert`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints usage + one error line, exit 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args._run(args) or 0)
    except IGCError as err:
        print(f"igc-convert {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"igc-convert {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
