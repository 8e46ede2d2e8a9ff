"""Every `mili serve --some-flag` can also be set as the environment variable `MILI_SOME_FLAG`, the way
containers and Kubernetes pass configuration (an image's ENV, a ConfigMap's envFrom, a Secret for the API key).
A flag on the command line wins over its variable; a variable wins over the built-in default.

A bad value fails at once with one line naming the variable and what it accepts, as a bad flag would.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

PREFIX = "MILI_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def variable_name(option: str) -> str:
    """--kv-cache-memory -> MILI_KV_CACHE_MEMORY."""
    return PREFIX + option.lstrip("-").replace("-", "_").upper()


def apply_environment_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Sets the default of each long option of `parser` from its MILI_ variable, when that is set."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:  # argparse has no public iterator over a parser's options
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if not long_options or isinstance(action, argparse._HelpAction):
            continue
        name = variable_name(long_options[0])
        if name not in environ:
            continue
        action.default = _convert(action, name, environ[name], parser)
        if action.help is not None and action.help is not argparse.SUPPRESS:
            action.help += f" [from {name}]"


def _convert(action: argparse.Action, name: str, raw: str, parser: argparse.ArgumentParser) -> object:
    if isinstance(action, argparse._StoreTrueAction):
        word = raw.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            parser.error(f"{name}={raw!r}: {action.option_strings[0]} is a switch; set {name} to 1/true/yes/on "
                         f"or 0/false/no/off")
        return word in TRUE_WORDS
    if action.nargs == 0:  # other switches (store_const, count...): none of serve's flags are such
        parser.error(f"{name} is set, but {action.option_strings[0]} takes no value from the environment; "
                     f"pass the flag instead")
    try:
        value = action.type(raw) if callable(action.type) else raw
    except (TypeError, ValueError):
        kind = getattr(action.type, "__name__", "value")
        parser.error(f"{name}={raw!r} is not a valid {kind} for {action.option_strings[0]}")
    if action.choices is not None and value not in action.choices:
        parser.error(f"{name}={raw!r}: {action.option_strings[0]} must be one of "
                     f"{', '.join(map(str, action.choices))}")
    return value
