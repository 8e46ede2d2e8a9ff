"""Every command line in README.md's bash blocks names a real `mili` subcommand with flags it accepts, or a
real make target. (The Python examples and the curl lines run against a real server in
tests/integration/test_readme_snippets.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mili.cli import build_parser
from tests.readme_blocks import code_blocks, shell_commands

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [argv for block in code_blocks("bash") for argv in shell_commands(block)]


def test_the_readme_has_commands_of_each_kind():
    kinds = {Path(argv[0]).name for argv in COMMANDS}
    assert {"mili", "make", "curl"} <= kinds, kinds


@pytest.mark.parametrize("argv", [a for a in COMMANDS if Path(a[0]).name == "mili"], ids=" ".join)
def test_mili_command_lines_parse(argv):
    args = build_parser().parse_args(argv[1:])  # argparse exits (status 2) on anything it does not accept
    assert args.command == argv[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("argv", [a for a in COMMANDS if a[0] == "make"], ids=" ".join)
def test_make_targets_exist(argv):
    result = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
