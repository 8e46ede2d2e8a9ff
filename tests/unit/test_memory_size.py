"""`--kv-cache-memory` values: units, fractions, and one clear error for everything else."""

from __future__ import annotations

import pytest

from mili.memory_size import MemorySizeError, parse_memory_size


@pytest.mark.parametrize("text, expected", [
    ("2e9", 2e9),
    ("2000000000", 2e9),
    ("2_000_000_000", 2e9),
    ("1073741824", 2**30),
    ("4GiB", 4 * 2**30),
    ("4gib", 4 * 2**30),
    ("4 GiB", 4 * 2**30),
    ("512MB", 512e6),
    ("512MiB", 512 * 2**20),
    ("1.5GB", 1.5e9),
    ("1.5 GiB", 1.5 * 2**30),
    ("64KiB", 65536),
    ("1TB", 1e12),
    ("99e12", 99e12),
    ("100", 100.0),          # bytes: too few for a block, which the sizing (not the parser) reports
    ("1.5", 1.5),            # bytes, likewise: a fraction is a plain number in (0, 1]
    ("0.5", 0.5),            # a fraction of the free memory
    (".25", 0.25),
    ("1", 1.0),              # all of it
    ("  0.9 ", 0.9),
    ("3B", 3.0),
    ("0.5KB", 500.0),        # a unit makes it bytes, however small the number
])
def test_sizes_parse(text, expected):
    assert parse_memory_size(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, message", [
    ("-1", "not a positive size"),
    ("-2GiB", "not a positive size"),
    ("0", "not a positive size"),
    ("0GB", "not a positive size"),
    ("1e999", "not a positive size"),
    ("", "not a size"),
    ("abc", "not a size"),
    ("GiB", "not a size"),
    ("nan", "not a size"),
    ("inf", "not a size"),
    ("1..5GB", "not a size"),
    ("1__0", "not a size"),
    ("1.5G", "unknown unit 'G'"),
    ("4gigs", "unknown unit 'gigs'"),
    ("50%", "not a size"),
    ("1B", "less than one KV block"),   # a unit means bytes, and 1 byte would read as the fraction 1
])
def test_bad_sizes_say_what_to_pass(text, message):
    with pytest.raises(MemorySizeError, match=message) as caught:
        parse_memory_size(text)
    if "unit" not in message:
        assert "4GiB" in str(caught.value) and "(0, 1]" in str(caught.value)
