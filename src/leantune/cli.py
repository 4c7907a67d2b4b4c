"""The ``leantune`` command line. Each sub-command lives in ``leantune/commands/<name>.py`` and provides
``add_parser(subparsers)``, setting ``func(args) -> int`` on its parser.

Exit status: 0 on success; 2 for bad input, reported as one line (a :class:`LeantuneError` or an argparse usage
error); 1 for anything else, which is a bug in leantune or in a plugin and is printed with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

from leantune import __version__
from leantune.errors import LeantuneError

DEBUG_HELP = "Show the full traceback on errors."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantune", description="Parameter- and memory-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"leantune {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module("leantune.commands")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        importlib.import_module(f"{package.__name__}.{info.name}").add_parser(subparsers)
    _add_debug_to_subcommands(parser)
    return parser


def _add_debug_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """Accept ``--debug`` after every (nested) sub-command too: ``leantune train --debug ...``.

    The default is ``SUPPRESS`` so that a sub-command without the flag keeps the value set before it.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
                _add_debug_to_subcommands(subparser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LeantuneError as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"leantune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leantune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug, not bad input: keep the whole story
        traceback.print_exc()
        print(f"leantune {args.command}: internal error (a bug, not your input); please report it with the "
              "traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
