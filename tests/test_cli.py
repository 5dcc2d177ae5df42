"""CLI surface: help with examples on every subcommand, version, python -m, README reference in sync."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from igc_convert import __version__
from igc_convert.cli import SUBCOMMANDS, main, reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_help_shows_an_example(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"igc-convert {name}" in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "igc_convert", "report", "/nonexistent/file.safetensors"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nonexistent" in lines[0]


def test_readme_cli_reference_is_generated_from_the_parser():
    text = README.read_text()
    section = re.search(r"<!-- CLI-REFERENCE:START -->\n(.*?)<!-- CLI-REFERENCE:END -->", text, re.S)
    assert section, "README lacks the CLI reference markers"
    assert section.group(1) == reference_markdown(), \
        "README's CLI reference is stale: run `python -m igc_convert.cli.reference README.md`"


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["convert"])
    assert info.value.code == 2
