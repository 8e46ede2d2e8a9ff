"""README.md's fenced code blocks, for the tests that check every example in it runs (or parses) as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# What the README's examples name that a test must point at something real.
CHECKPOINT_PLACEHOLDER = "path/to/Qwen3-checkpoint"
SERVER_URL = "http://127.0.0.1:8000"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_commands(block: str) -> list[list[str]]:
    """Each command of a bash block as argv: backslash continuations joined, comments dropped."""
    return [argv for line in block.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]
