"""The command-line arguments every peer benchmark shares (--model, --engines, --out), checked the same way."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_common(parser: argparse.ArgumentParser, engines: tuple[str, ...], out: str) -> None:
    parser.add_argument("--model", help="a Qwen3 checkpoint folder (default: the random Qwen3-0.6B-shaped one)")
    if engines:  # a benchmark of one engine has no choice to offer
        parser.add_argument("--engines", default=",".join(engines), help=f"comma-separated, of {', '.join(engines)}")
    parser.add_argument("--out", default=out, help=f"results name: benchmarks/results/NAME.json (default {out})")


def chosen_engines(parser: argparse.ArgumentParser, args: argparse.Namespace, engines: tuple[str, ...]) -> list[str]:
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := [e for e in chosen if e not in engines]:
        parser.error(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(engines)}")
    return chosen


def at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def checkpoint(args: argparse.Namespace) -> Path:
    """--model, or the random Qwen3-0.6B-shaped checkpoint (written on first use; needs transformers)."""
    if args.model is not None:
        return Path(args.model).resolve()
    from mili.checkpoints import cached_checkpoint
    return cached_checkpoint("qwen3-0.6b")
