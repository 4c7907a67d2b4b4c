"""The ``leantune`` command line. Each sub-command lives in ``leantune/commands/<name>.py`` and provides
``add_parser(subparsers)``, setting ``func(args) -> int`` on its parser."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

from leantune import __version__
from leantune.errors import LeantuneError

# Errors that are the user's input, reported as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (LeantuneError, ValueError, TypeError, FileNotFoundError, KeyError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantune", description="Parameter- and memory-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"leantune {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback on errors.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module("leantune.commands")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        importlib.import_module(f"{package.__name__}.{info.name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"leantune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leantune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
