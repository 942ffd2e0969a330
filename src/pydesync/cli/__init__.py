"""pydesync's command line: desync's commands and flags over the pydesync library.

This is the only layer that prints or exits. Every library error becomes one
`Error: ...` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from ..errors import PydesyncError
from . import archive, blob, inspect, mount, remote, server, store, sync, treeinfo
from .common import Context, add_global_flags, parse_bool


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"Error: {message} (see '{self.prog} -h')\n")
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        # pflag booleans never take the next argument as their value (`-r index.caibx` is
        # `-r=true` plus a positional); only `--flag=value` sets one explicitly.
        if args is not None:
            bools = {o for a in self._actions if a.type is parse_bool and a.nargs == "?"
                     for o in a.option_strings}
            args = list(args)
            end = args.index("--") if "--" in args else len(args)
            args[:end] = [f"{a}=true" if a in bools else a for a in args[:end]]
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pydesync", description="Content-addressed synchroniser compatible with "
                                                  "casync and desync.")
    add_global_flags(parser, suppress=False)
    # casync's client may put these before the verb when it starts `pull` remotely; accepted, unused.
    parser.add_argument("--log-level", help=argparse.SUPPRESS)
    parser.add_argument("--rate-limit-bps", help=argparse.SUPPRESS)
    parent = argparse.ArgumentParser(add_help=False)
    add_global_flags(parent, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (blob, archive, store, inspect, treeinfo, server, remote, mount, sync):
        module.register(sub, parent)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C: temporary outputs are removed, the old target stays."""


def _terminated(_signum: int, _frame: object) -> None:
    raise Terminated()


def terminate_like_interrupt() -> None:
    """Make SIGTERM stop a command the way SIGINT does (cleanly), not kill it where it stands."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def main(argv: Sequence[str] | None = None) -> int:
    terminate_like_interrupt()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        ctx = Context.from_args(args)
        return args.func(ctx)
    except PydesyncError as e:
        sys.stderr.write(f"Error: {e}\n")
        return 1
    except KeyboardInterrupt as e:
        sys.stderr.write("Error: interrupted\n")
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); silence the flush at exit too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as e:
        name = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"Error: {name}{e.strerror or e}\n")
        return 1
    except MemoryError:  # e.g. a huge index under `ulimit -v`; temporary outputs went while unwinding
        pass  # leaving the handler drops the traceback, and with it what filled the memory
    _out_of_memory()


def _out_of_memory() -> NoReturn:
    """One line and an immediate exit: the interpreter's shutdown, still short of memory after a
    MemoryError, would otherwise add noise of its own."""
    gc.collect()
    with contextlib.suppress(Exception):
        sys.stderr.write("Error: out of memory\n")
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(1)


def entry() -> None:
    """Console-script entry point."""
    try:
        code = main()
    except KeyboardInterrupt:  # between a signal and main's own handling
        sys.stderr.write("Error: interrupted\n")
        code = 130
    sys.exit(code)
