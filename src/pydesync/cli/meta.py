"""Commands about the command line itself: help, shell completion (argcomplete) and man pages
(argparse-manpage), generated from the same parser the commands use, so they never drift."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError
from .common import Context

SHELLS = ("bash", "zsh", "fish")


def version() -> str:
    from importlib import metadata
    try:
        return metadata.version("pydesync")
    except metadata.PackageNotFoundError:  # running from a source tree
        from .. import __version__

        return __version__


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("version", parents=[parent], help="print the version",
                       description="Print pydesync's version (as --version does).")
    p.set_defaults(func=lambda ctx: print(f"pydesync {version()}") or 0)

    p = sub.add_parser("help", parents=[parent], help="help about a command",
                       description="Print the help of COMMAND (or of pydesync).")
    p.add_argument("topic", nargs="?", metavar="COMMAND")
    p.set_defaults(func=run_help)

    p = sub.add_parser("completion", parents=[parent], help="print a shell completion script",
                       description="Print the completion script for SHELL. Bash: "
                                   "`source <(pydesync completion bash)`; zsh: `autoload -U bashcompinit && "
                                   "bashcompinit && source <(pydesync completion zsh)`; fish: "
                                   "`pydesync completion fish | source`.")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=run_completion)

    p = sub.add_parser("manpage", parents=[parent], help="write the man page",
                       description="Write the man page pydesync.1 (every command and flag) into DIR.")
    p.add_argument("dir")
    p.add_argument("--section", default="1", help="manual section (default 1)")
    p.set_defaults(func=run_manpage)


def top_parser() -> argparse.ArgumentParser:
    from . import build_parser

    return build_parser()


def run_help(ctx: Context) -> int:
    parser = top_parser()
    topic = ctx.args.topic
    if topic is None:
        parser.print_help()
        return 0
    commands = subcommands(parser)
    if topic not in commands:
        raise UsageError(f"unknown command '{topic}'{did_you_mean(topic, commands)}")
    commands[topic].print_help()
    return 0


def run_completion(ctx: Context) -> int:
    import argcomplete

    sys.stdout.write(argcomplete.shellcode(["pydesync"], shell=ctx.args.shell))
    return 0


def run_manpage(ctx: Context) -> int:
    from argparse_manpage.manpage import Manpage

    parser = top_parser()
    page = Manpage(parser, _data={"project_name": "pydesync", "version": version(),
                                 "manual_section": ctx.args.section,
                                 "manual_title": "pydesync manual"})
    folder = ctx.args.dir
    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a directory")
    path = os.path.join(folder, f"pydesync.{ctx.args.section}")
    from ..fsutil import atomic_write

    with atomic_write(path) as f:
        f.write(str(page).encode())
    print(f"Writing {path}")
    return 0


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def did_you_mean(word: str, choices: object) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)  # type: ignore[call-overload]  # (strings, whatever the container)
    return f" (did you mean '{close[0]}'?)" if close else ""
