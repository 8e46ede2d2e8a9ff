"""Memory sizes as people type them, for `--kv-cache-memory`: `4GiB`, `512MB`, `2e9`, or `0.5`.

A number with a unit is bytes: KB, MB, GB, TB count in 1000s, KiB, MiB, GiB, TiB in 1024s, B is bytes
(case does not matter). A plain number greater than 1 is bytes too; a plain number in (0, 1] is a fraction
of the free memory. Single-letter units (`1.5G`) are refused rather than guessed: 1.5 GB and 1.5 GiB
differ by 7%.
"""

from __future__ import annotations

import math
import re

UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
HOW_TO_PASS = "pass bytes (e.g. 4GiB, 512MB, 2e9) or a fraction of the free memory in (0, 1] (e.g. 0.5)"

_SIZE = re.compile(r"\s*([-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*")


class MemorySizeError(ValueError):
    """The text is not a memory size; the message says why and what to pass."""


def parse_memory_size(text: str) -> float:
    """Bytes (a value > 1, with or without a unit) or a fraction of free memory (a plain value in (0, 1]).

    The result follows the convention of `kv_cache_bytes` in the Python API, so it can be handed on as is.
    A unit makes a value bytes even when it is small, and bytes below 2 cannot be told from a fraction, so
    they are refused here (no KV block is that small anyway).
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise MemorySizeError(f"{text!r} is not a size; {HOW_TO_PASS}")
    number, unit = match.groups()
    try:
        value = float(number)
    except ValueError:  # misplaced underscores, e.g. "1__0"
        raise MemorySizeError(f"{text!r} is not a size; {HOW_TO_PASS}") from None
    if not math.isfinite(value) or value <= 0:
        raise MemorySizeError(f"{text!r} is not a positive size; {HOW_TO_PASS}")
    if not unit:
        return value
    factor = UNITS.get(unit.lower())
    if factor is None:
        raise MemorySizeError(f"{text!r} has an unknown unit {unit!r}: use B, KB, MB, GB, TB (1000s) or "
                              f"KiB, MiB, GiB, TiB (1024s)")
    size = value * factor
    if size < 2:
        raise MemorySizeError(f"{text!r} is less than one KV block; {HOW_TO_PASS}")
    return size
