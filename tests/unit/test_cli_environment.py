"""`mili serve` takes each flag from MILI_<FLAG> too (containers configure by environment): the variable sets
the default, a flag on the command line wins, a bad value is refused naming the variable."""

from __future__ import annotations

import pytest

from mili.cli import build_parser
from mili.cli_environment import variable_name


def serve_args(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], argv: list[str] | None = None):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(["serve", *(argv or [])])


def test_variable_names_follow_the_flags():
    assert variable_name("--kv-cache-memory") == "MILI_KV_CACHE_MEMORY"
    assert variable_name("--port") == "MILI_PORT"


def test_variables_set_defaults_of_every_kind(monkeypatch):
    args = serve_args(monkeypatch, {"MILI_PORT": "8123", "MILI_HOST": "0.0.0.0", "MILI_MODEL": "/models/qwen3",
                                    "MILI_KV_CACHE_MEMORY": "3GiB", "MILI_DTYPE": "bfloat16",
                                    "MILI_SHUTDOWN_GRACE": "12.5", "MILI_NO_PREFIX_CACHE": "true",
                                    "MILI_SPECULATIVE": "ngram", "MILI_API_KEY": "k"})
    assert (args.port, args.host, args.model, args.kv_cache_memory) == (8123, "0.0.0.0", "/models/qwen3", "3GiB")
    assert (args.dtype, args.shutdown_grace, args.no_prefix_cache) == ("bfloat16", 12.5, True)
    assert (args.speculative, args.api_key) == ("ngram", "k")


def test_unset_variables_keep_the_built_in_defaults(monkeypatch):
    for name in ("MILI_PORT", "MILI_NO_PREFIX_CACHE", "MILI_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    args = serve_args(monkeypatch, {})
    assert (args.port, args.no_prefix_cache, args.dtype) == (8000, False, "auto")


def test_a_flag_wins_over_its_variable(monkeypatch):
    args = serve_args(monkeypatch, {"MILI_PORT": "8123", "MILI_DTYPE": "bfloat16"}, ["--port", "9000",
                                                                                    "--dtype", "float32"])
    assert (args.port, args.dtype) == (9000, "float32")


@pytest.mark.parametrize("word, expected", [("0", False), ("off", False), ("1", True), ("YES", True)])
def test_switches_take_the_usual_words(monkeypatch, word, expected):
    assert serve_args(monkeypatch, {"MILI_NO_PREFIX_CACHE": word}).no_prefix_cache is expected


@pytest.mark.parametrize("name, value, says", [
    ("MILI_PORT", "eighty", "MILI_PORT='eighty' is not a valid int for --port"),
    ("MILI_DTYPE", "fp16", "--dtype must be one of auto, float32, bfloat16"),
    ("MILI_NO_PREFIX_CACHE", "maybe", "set MILI_NO_PREFIX_CACHE to 1/true/yes/on or 0/false/no/off"),
])
def test_a_bad_value_names_the_variable(monkeypatch, capsys, name, value, says):
    with pytest.raises(SystemExit) as exited:
        serve_args(monkeypatch, {name: value})
    assert exited.value.code == 2 and says in capsys.readouterr().err


def test_help_says_where_a_default_came_from(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        serve_args(monkeypatch, {"MILI_MAX_QUEUE": "7"}, ["--help"])
    assert "[from MILI_MAX_QUEUE]" in " ".join(capsys.readouterr().out.split())
