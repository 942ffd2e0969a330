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

from ..errors import PydesyncError, one_line
from . import archive, blob, inspect, meta, mount, remote, server, store, sync, treeinfo
from .common import Context, add_global_flags, parse_bool


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line pointing to the command's help, and
    exits 1 as desync does."""

    def error(self, message: str) -> None:  # type: ignore[override]  # (argparse says NoReturn; ours raises too)
        if "invalid choice" in message and "argument COMMAND" in message:
            word = message.split("'", 2)[1] if "'" in message else ""
            message = f"unknown command '{word}'{meta.did_you_mean(word, meta.subcommands(self))}"
        sys.stderr.write(f"Error: {message} (see '{self.prog} -h')\n")
        sys.exit(1)

    def parse_args(self, args=None, namespace=None):
        """An unknown flag is reported by the command it was given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = meta.subcommands(self).get(getattr(parsed, "command", None) or "")
            (command or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def parse_known_args(self, args=None, namespace=None):
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
    parser.add_argument("--version", action="version", version=f"pydesync {meta.version()}")
    # casync's client may put these before the verb when it starts `pull` remotely; accepted, unused.
    parser.add_argument("--log-level", help=argparse.SUPPRESS)
    parser.add_argument("--rate-limit-bps", help=argparse.SUPPRESS)
    parent = argparse.ArgumentParser(add_help=False)
    add_global_flags(parent, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (blob, archive, store, inspect, treeinfo, server, remote, mount, sync, meta):
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


def log_verbosely() -> None:
    """--verbose: what the library logs (stores tried and why, retries, seeds, chunk sources,
    timings) goes to stderr with a time stamp."""
    import logging

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s")
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    terminate_like_interrupt()
    try:
        parser = build_parser()
        if "_ARGCOMPLETE" in os.environ:  # a shell asking for completions (argcomplete's protocol)
            import argcomplete

            argcomplete.autocomplete(parser)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 1
        if getattr(args, "verbose", False):
            log_verbosely()
        ctx = Context.from_args(args)
        return args.func(ctx)
    except PydesyncError as e:
        sys.stderr.write(f"Error: {one_line(str(e))}\n")
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
        sys.stderr.write(f"Error: {one_line(f'{name}{e.strerror or e}')}\n")
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
