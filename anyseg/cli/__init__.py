"""``anyseg`` command line: thin subcommands that parse, call the library and report.

Each subcommand lives in its own module exposing ``register(subparsers)``; ``register`` adds a parser
whose ``func`` default takes the parsed namespace and returns an exit status.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import List, Optional

#: Subcommand modules, in the order ``anyseg --help`` lists them.
_SUBCOMMANDS = ("segment", "auto", "track", "export", "serve", "bench", "train", "eval", "personalize", "remove",
                "segment_volume")


def _subcommand_modules():
    for name in _SUBCOMMANDS:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            yield importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anyseg",
        description=(
            "Segment Anything (SAM) from the command line: prompt masks with points and boxes "
            "(segment), or segment everything in images and folders (auto)."
        ),
        epilog="Run 'anyseg COMMAND --help' for the options of one command.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"anyseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _subcommand_modules():
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"anyseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
