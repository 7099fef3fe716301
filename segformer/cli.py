"""The ``segformer`` command line: argument parsing only; the work is done by library functions.

Each sub-command lives in ``segformer/commands/<name>.py`` with ``register(subparsers)``, which adds its
parser and sets ``func``; heavy imports happen inside ``func`` so that ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__, commands
from .hub import first_line


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segformer",
        description="SegFormer semantic segmentation: train, evaluate, predict, convert and export.",
    )
    parser.add_argument("--version", action="version", version=f"segformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"segformer {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        # Library errors are written as one clear line; a traceback would bury it.
        print(f"segformer {args.command}: error: {first_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
