"""Flag handling shared by every command, mimicking desync's (cobra/pflag) conventions.

- list flags accumulate and also split on commas (`-s a,b` == `-s a -s b`);
- booleans accept `--flag=false`;
- durations use Go syntax (`500ms`, `1m30s`);
- persistent flags (`--digest`, `--config`, `--verbose`) go before or after the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Config, go_duration, load_config
from ..digest import DIGESTS, SHA512_256, check_digest
from ..errors import UsageError
from ..index import Index, looks_like_index
from ..indexstore import is_remote, read_index_at, write_index_at
from ..parallel import DEFAULT_CONCURRENCY
from ..store import Store, StoreOptions, open_chain, open_store


class CommaList(argparse.Action):
    """Accumulate values, splitting each on commas, like pflag's StringSlice."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.extend(v for v in str(values).split(",") if v)
        setattr(namespace, self.dest, items)


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "t", "true", "yes", "y"):
        return True
    if lowered in ("0", "f", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value '{text}'")


def parse_duration(text: str) -> float:
    """Go duration syntax (`-b 500ms`) to seconds."""
    try:
        return go_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_bool(parser: argparse.ArgumentParser, *names: str, default: bool | None, help: str) -> None:
    parser.add_argument(*names, nargs="?", const=True, default=default, type=parse_bool,
                        metavar="BOOL" if default else None, help=help)


def add_global_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--config, --digest, --verbose: accepted before and after the command name."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", default=default,
                        help="config file (default ~/.config/pydesync/config.json, else desync's "
                             "~/.config/desync/config.json)")
    parser.add_argument("--digest", default=default,
                        help=f"digest algorithm: {' or '.join(DIGESTS)} (default {SHA512_256})")
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="log what happens on stderr: stores tried, retries, seeds, chunk sources, "
                             "timings")


def add_store_options(parser: argparse.ArgumentParser, concurrency: bool = True) -> None:
    """desync's addStoreOptions: flags every store-using command takes."""
    if concurrency:
        add_concurrency(parser)
    # None = not given: the config's store-options (or the store default) applies.
    parser.add_argument("--client-cert", default=None, help="path to a client certificate for TLS")
    parser.add_argument("--client-key", default=None, help="path to a client key for TLS")
    parser.add_argument("--ca-cert", default=None, help="trust these CA certificates (PEM)")
    add_bool(parser, "-t", "--trust-insecure", default=None, help="trust invalid server certificates")
    add_bool(parser, "-r", "--cache-repair", default=True,
             help="replace invalid chunks in the cache from the source (default true)")
    parser.add_argument("-e", "--error-retry", type=int, default=None,
                        help="number of times to retry a failed network request (default 3)")
    parser.add_argument("-b", "--error-retry-base-interval", type=parse_duration, default=None,
                        metavar="DURATION", help="wait between retries, times the attempt (default 500ms)")


def add_concurrency(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="number of concurrent threads (default 10)")


def add_stores(parser: argparse.ArgumentParser, help: str = "source store(s)", cache: bool = True) -> None:
    parser.add_argument("-s", "--store", action=CommaList, default=[], metavar="LOCATION", help=help)
    if cache:
        parser.add_argument("-c", "--cache", default=None, metavar="LOCATION", help="store used as a cache")


def add_seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", action="append", default=[],
                        help="seed: INDEX.caibx (its blob beside it, without the suffix) or INDEX:BLOB")
    parser.add_argument("--seed-dir", action="append", default=[],
                        help="use every blob with its .caibx index under this directory as a seed")


def add_ignore(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ignore", action=CommaList, default=[], metavar="INDEX",
                        help="index(es) whose chunks are skipped")
    parser.add_argument("--ignore-chunks", action=CommaList, default=[], metavar="FILE",
                        help="file(s) listing chunk ids to skip, one per line")


@dataclass
class Context:
    """Parsed flags plus the loaded config; opens stores the way the flags ask."""

    args: argparse.Namespace
    config: Config

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        check_digest(getattr(args, "digest", None) or SHA512_256)  # global: fatal for every command
        config = load_config(getattr(args, "config", None))
        for warning in config.warnings:
            sys.stderr.write(f"Warning: {warning}\n")
        return cls(args, config)

    @property
    def digest(self) -> str:
        """Digest for new chunk ids (make, chunk)."""
        return self.requested_digest or SHA512_256

    @property
    def requested_digest(self) -> str | None:
        """The --digest the user gave, if any. Indexes carry their own digest flag and are read
        with it (as casync does); only an explicit, conflicting --digest is an error."""
        return getattr(self.args, "digest", None) or None

    @property
    def concurrency(self) -> int:
        n = getattr(self.args, "concurrency", DEFAULT_CONCURRENCY)
        if n < 1:
            raise UsageError("concurrency must be at least 1")
        return n

    def store_options(self, location: str) -> StoreOptions:
        """Config options for the location, overridden by the store flags given on the command line."""
        a = self.args
        return self.config.options_for(location).override(
            client_cert=getattr(a, "client_cert", None),
            client_key=getattr(a, "client_key", None),
            ca_cert=getattr(a, "ca_cert", None),
            trust_insecure=getattr(a, "trust_insecure", None),
            error_retry=getattr(a, "error_retry", None),
            error_retry_base=getattr(a, "error_retry_base_interval", None),
            concurrency=getattr(a, "concurrency", None),
        )

    def index_options(self, location: str) -> StoreOptions:
        """Options for the index store holding `location` (looked up by the part before the last
        `/` or `\\`); encryption options there are an error, never silently plain indexes."""
        cut = max(location.rfind("/"), location.rfind("\\") if "/" not in location else -1)
        options = self.store_options(location[:cut] if cut >= 0 else "")
        if options.encryption_configured:
            raise UsageError(f"store options for {json.dumps(location)}: "
                             "encryption is not supported by index stores")
        return options

    def read_index(self, location: str, check_digest: bool = True) -> Index:
        """An index from a path, `-` or an index store URL, with that store's options; with
        check_digest an explicit --digest must agree with the index."""
        return read_index_at(location, self.requested_digest if check_digest else None,
                             self.index_options(location))

    def write_index(self, index: Index, location: str, store: Store | None = None) -> None:
        """Write an index to a path, `-` or an index store URL, with that store's options, once
        `store` (where its chunks went) has delivered them."""
        write_index_at(index, location, self.index_options(location), store)

    def source(self, cache: bool = True) -> Store:
        """The `-s` stores as a chain, behind the `-c` cache if given (and `cache`)."""
        store = self.optional_source(cache)
        if store is None:
            raise UsageError("no store provided")
        return store

    def optional_source(self, cache: bool = True) -> Store | None:
        """The same, or None without `-s` (commands for which the stores only add figures)."""
        stores: Sequence[str] = self.args.store
        if not stores:
            return None
        return open_chain(stores, getattr(self.args, "cache", None) if cache else None,
                          repair=getattr(self.args, "cache_repair", True), options_for=self.store_options)

    def open(self, location: str) -> Store:
        """One store (or failover group) to read from, with its configured options."""
        return open_store(location, self.store_options(location))

    def target(self, location: str, create: bool = False) -> Store:
        """A single store to write to."""
        if "|" in location:
            raise UsageError(f"cannot write to a failover group ({location})")
        store = open_store(location, self.store_options(location), create=create)
        if not store.writable:
            raise UsageError(f"store {location} is not writable")
        return store


def check_index_output(index: str, source: str) -> None:
    """An index is never written over its input, nor over an existing file that is not an index
    (as when `make` gets its arguments the wrong way round: `make INDEX FILE`)."""
    if index == "-" or is_remote(index) or not os.path.lexists(index):
        return
    if source != "-" and os.path.exists(source) and os.path.samefile(index, source):
        raise UsageError("input and output filenames match")
    if os.path.isfile(index) and os.path.getsize(index) and not looks_like_index(index):
        what = "SOURCE" if os.path.isdir(source) else "FILE"
        raise UsageError(f"{index} exists and is not an index; not overwriting it (the index comes first: "
                         f"INDEX {what})")
