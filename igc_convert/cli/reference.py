"""Rewrite the CLI reference section of README.md from the parser: ``python -m igc_convert.cli.reference``."""

import re
import sys
from pathlib import Path

from . import reference_markdown

START, END = "<!-- CLI-REFERENCE:START -->", "<!-- CLI-REFERENCE:END -->"


def update(readme: Path) -> None:
    text = readme.read_text()
    new = re.sub(f"{START}.*?{END}", lambda _: f"{START}\n{reference_markdown()}{END}", text, flags=re.S)
    readme.write_text(new)


if __name__ == "__main__":
    update(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
