"""The ``segformer`` command line: argument parsing only; the work is done by library functions.

Each sub-command lives in ``segformer/commands/<name>.py`` with ``register(subparsers)``, which adds its
parser and sets ``func``; heavy imports happen inside ``func`` so that ``--help`` is quick.

Errors: what the library raises on purpose (ValueError and OSError, with their subclasses such as
CheckpointError, ImageError, FileNotFoundError) is printed as one line, exit code 2 (the operating system's own
OSErrors as ``PATH: reason``). A TypeError or RuntimeError may be a bug: one line too, unless ``segformer --debug``
or SEGFORMER_DEBUG=1 asks for the full traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

from . import __version__, commands
from .allocator import tune_allocator
from .hub import first_line

DEBUG_ENV = "SEGFORMER_DEBUG"
EXPECTED_ERRORS = (ValueError, OSError)  # raised on purpose, with a message meant for the user
UNEXPECTED_ERRORS = (TypeError, RuntimeError)  # one line as well, but --debug shows their traceback


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that what it was writing is cleaned up (an atomic write's
    temporary file is removed, as on Ctrl-C) before the process exits with 128 + 15."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread while the block runs (the default action would end
    the process at once, leaving temporary files behind). A command that handles SIGTERM itself (serve) installs
    its own handler inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class UsageParser(argparse.ArgumentParser):
    """argparse's parser (its sub-commands' too), whose usage errors also say when an argument that names an
    existing file was read as an option (``segformer predict -dash.jpg``: "INPUT required", without a word).
    ``arguments``: the command line being parsed, set by the entry point before it parses (:func:`parse`)."""

    arguments: list[str] = []
    commands: dict[str, argparse.ArgumentParser] = {}  # (the top-level parser's: its commands' parsers)

    def error(self, message: str) -> NoReturn:
        # (under torchrun every rank parses the same command line: rank 0 says it, once; RANK alone, from another
        # launcher or left in a shell, does not silence it: a line said twice beats a usage error said by no one)
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            from .distributed import launched_rank_not_zero, wait_for_rank_zero

            if launched_rank_not_zero():
                wait_for_rank_zero()
                sys.exit(2)
        dashed = [a for a in self.arguments if a.startswith("-") and a != "-" and os.path.lexists(a)]
        if dashed:
            message += (
                f" ({dashed[0]} was read as an option: for a file whose name starts with '-', write ./{dashed[0]} "
                "or put -- before it)"
            )
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="segformer",
        description="SegFormer semantic segmentation: train, evaluate, predict, convert and export.",
    )
    parser.add_argument("--version", action="version", version=f"segformer {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of unexpected errors (TypeError, RuntimeError); also {DEBUG_ENV}=1",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    parser.commands = sub.choices  # (each command's own parser: see parse)
    return parser


def debug_requested() -> bool:
    """SEGFORMER_DEBUG is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_command(
    func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *, name: str, debug: bool = False
) -> int:
    """``func(args)`` as an exit code: its own, 130 on Ctrl-C, 143 on SIGTERM (each after the command's clean-up:
    an atomic write removes its temporary file), 2 with one line ``NAME: error: ...`` on stderr
    for an error (the traceback of an unexpected one is re-raised under ``debug`` or SEGFORMER_DEBUG=1).
    The process's allocator is tuned first (:mod:`segformer.allocator`; SEGFORMER_MALLOC=system keeps it). Under
    torchrun the package's warnings come from rank 0 alone (:func:`segformer.distributed.warnings_from_rank_zero`),
    and so do the "interrupted" / "terminated" lines (a stopped job signals every rank; a rank signalled alone
    exits with its status and no line, and the others then report the broken group)."""
    tune_allocator()
    from .distributed import launched_rank_not_zero, warnings_from_rank_zero

    try:
        with warnings_from_rank_zero(), _sigterm_raises():  # (under torchrun, rank 0's warnings only)
            return int(func(args) or 0)
    except KeyboardInterrupt:
        if not launched_rank_not_zero():  # (under torchrun every rank gets the signal: rank 0 says so)
            print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        if not launched_rank_not_zero():
            print(f"{name}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except EXPECTED_ERRORS as exc:
        print(f"{name}: error: {describe(exc)}", file=sys.stderr)
        return 2
    except UNEXPECTED_ERRORS as exc:
        if debug or debug_requested():
            raise
        # One clear line by default: a traceback would bury the message of an error raised on purpose.
        print(f"{name}: error: {first_line(exc)}", file=sys.stderr)
        return 2


def describe(exc: BaseException) -> str:
    """An expected error as one line. An OSError straight from the operating system (``[Errno 30] Read-only
    file system: '/mnt/out/x.png'``) reads ``/mnt/out/x.png: read-only file system``; the package's own errors
    are already worded for the user (:func:`segformer.hub.first_line`)."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror and isinstance(exc.filename, (str, bytes)):
        if str(exc).startswith("[Errno"):  # OSError(errno, strerror, filename): its str is the raw form
            names = os.fsdecode(exc.filename)
            if exc.filename2 is not None:
                names += f" -> {os.fsdecode(exc.filename2)}"
            return f"{names}: {exc.strerror[:1].lower()}{exc.strerror[1:]}"
    return first_line(exc)


def _printable_stdout() -> None:
    """Characters stdout's encoding lacks are written as escapes, not a UnicodeEncodeError: Windows encodes a
    redirected or piped stdout in its code page (cp1252), where "→" in --help and class names in other scripts
    stopped `segformer --help` with a traceback and `segformer eval` before its --json (portability audit).
    (stderr already escapes them.)"""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and (sys.stdout.errors or "strict") == "strict":
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # (a stream that cannot be reconfigured any more: left as it is)
            pass


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with :class:`UsageParser` told the command line (for its hint)."""
    UsageParser.arguments = list(sys.argv[1:] if argv is None else map(str, argv))
    args, extra = parser.parse_known_args(argv)
    if extra:  # (argparse said it in the top-level usage, without the command: `segformer predict ... 32 32`)
        words, name = UsageParser.arguments, getattr(args, "command", None)
        before = name in words and extra[0] in words[: words.index(name)]  # (`segformer --bogus synth d`: its own)
        command = parser if before else getattr(parser, "commands", {}).get(name, parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:  # (a Ctrl-C while the commands' modules load printed a 40-line traceback of imports: audit)
        _printable_stdout()
        args = parse(build_parser(), argv)
    except KeyboardInterrupt:
        print("segformer: interrupted", file=sys.stderr)
        return 130
    return run_command(args.func, args, name=f"segformer {args.command}", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
