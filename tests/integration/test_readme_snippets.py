"""Every ```python block of README.md runs as written, each in its own interpreter, with the checkpoint
placeholder pointing at a small test checkpoint; the curl lines and the openai example run against a real
`mili serve` of the demo model (the README's address, on a free port)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mili.checkpoints import cached_checkpoint
from tests.servers import mili_serve
from tests.readme_blocks import CHECKPOINT_PLACEHOLDER, SERVER_URL, code_blocks, shell_commands

pytestmark = pytest.mark.slow  # the examples compile MAX graphs (cached after the first run)

ROOT = Path(__file__).resolve().parents[2]
PYTHON_BLOCKS = code_blocks("python")
CURL_COMMANDS = [argv for block in code_blocks("bash") for argv in shell_commands(block) if argv[0] == "curl"]


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    """`mili serve` with no --model, as the README starts it, on a free port instead of 8000."""
    with mili_serve(["--kv-cache-memory", "256MiB"], "readme") as (url, _):
        yield url


def test_the_readme_has_the_examples_this_file_expects():
    assert len(PYTHON_BLOCKS) >= 5 and len(CURL_COMMANDS) >= 3
    assert any(CHECKPOINT_PLACEHOLDER in block for block in PYTHON_BLOCKS)
    assert any(SERVER_URL in block for block in PYTHON_BLOCKS)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs_as_written(index, request):
    code = PYTHON_BLOCKS[index]
    if SERVER_URL in code:
        code = code.replace(SERVER_URL, request.getfixturevalue("demo_server"))
    code = code.replace(CHECKPOINT_PLACEHOLDER, str(cached_checkpoint("tiny-tied-gqa2-d64")))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README python block {index}:\n{code}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("argv", CURL_COMMANDS, ids=lambda argv: next(a for a in argv if "://" in a))
def test_curl_example_gets_a_2xx(argv, demo_server):
    argv = [a.replace(SERVER_URL, demo_server) for a in argv]
    result = subprocess.run([argv[0], "--fail-with-body", "--max-time", "120", *argv[1:]], capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    assert result.stdout.strip()
