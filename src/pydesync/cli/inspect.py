"""Inspection commands: list-chunks, info, inspect-chunks, config."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import OWN_CONFIG
from ..errors import UsageError
from ..fsutil import atomic_write
from .common import CommaList, Context, add_bool, add_store_options, add_stores


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("list-chunks", parents=[parent], help="print the chunk ids of an index",
                       description="Print every chunk id of INDEX, one per line, in order.")
    p.add_argument("index")
    add_store_options(p)
    p.set_defaults(func=run_list_chunks)

    p = sub.add_parser("info", parents=[parent], help="show what an index holds and where its chunks are",
                       description="Print counts and sizes for INDEX: unique chunks, how many the -s "
                                   "stores, --seed indexes and the -c cache already have.")
    p.add_argument("index")
    add_stores(p)
    p.add_argument("--seed", action=CommaList, default=[], metavar="INDEX", help="seed index(es)")
    p.add_argument("-f", "--format", choices=["json", "plain"], default="json", help="output format")
    p.add_argument("--chunks-info", default=None, metavar="FILE",
                   help="inspect-chunks output, to sum compressed sizes")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="the file an extract of INDEX writes: count the chunks that an interrupted extract "
                        "of it left in its partial output (each hashed) as in-partial, and as not to be "
                        "fetched")
    add_store_options(p)
    p.set_defaults(func=run_info)

    p = sub.add_parser("inspect-chunks", parents=[parent], help="list chunks with sizes as JSON",
                       description="Print a JSON array with id, uncompressed_size and (with a local -s "
                                   "store) compressed_size for every chunk of INDEX.")
    p.add_argument("index")
    p.add_argument("output", nargs="?")
    add_stores(p, help="local store to read compressed sizes from", cache=False)
    add_store_options(p)
    p.set_defaults(func=run_inspect_chunks)

    p = sub.add_parser("config", parents=[parent], help="show or write the configuration",
                       description="Print the loaded configuration as JSON; -w writes it to --config.")
    add_bool(p, "-w", "--write", default=False, help="write the current configuration to the config file")
    p.set_defaults(func=run_config)


def run_list_chunks(ctx: Context) -> int:
    out = sys.stdout
    for chunk in ctx.read_index(ctx.args.index):
        out.write(f"{chunk.id}\n")
    return 0


_PLAIN_LABELS = [  # desync's lines, in its order
    ("size", "Blob size:"),
    ("dedup-size-not-in-seed", "Size of deduplicated chunks not in seed:"),
    ("dedup-size-not-in-seed-nor-cache", "Size of deduplicated chunks not in seed nor cache:"),
    ("total", "Total chunks:"),
    ("unique", "Unique chunks:"),
    ("in-store", "Chunks in store:"),
    ("in-seed", "Chunks in seed:"),
    ("in-partial", "Chunks in partial output:"),
    ("in-cache", "Chunks in cache:"),
    ("not-in-seed-nor-cache", "Chunks not in seed nor cache:"),
    ("dedup-size-not-in-seed-nor-cache-compressed", "Compressed chunks not in seed nor cache:"),
    ("chunk-size-min", "Chunk size min:"),
    ("chunk-size-avg", "Chunk size avg:"),
    ("chunk-size-max", "Chunk size max:"),
]


def seed_index_location(spec: str) -> str:
    """The index part of a seed spec: `x.caibx` or `index:blob[:options]`."""
    return spec if spec.endswith(".caibx") else spec.split(":")[0]


def run_info(ctx: Context) -> int:
    from ..info import index_info
    from ..partial import chunks_in_partials
    a = ctx.args
    index = ctx.read_index(a.index)
    seeds = [ctx.read_index(seed_index_location(s)) for s in a.seed]
    chunks_info = None
    if a.chunks_info:
        try:
            with open(a.chunks_info, encoding="utf-8") as f:
                chunks_info = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read chunks info {a.chunks_info}: {e}") from None
    store = ctx.optional_source(cache=False)  # info counts the cache separately
    cache = ctx.open(a.cache) if a.cache else None
    partial = chunks_in_partials(index, a.output, ctx.concurrency) if a.output else None
    info = index_info(index, store, seeds, cache, chunks_info, ctx.concurrency, partial)
    if a.format == "plain":
        for key, label in _PLAIN_LABELS:
            if key in info:
                print(f"{label} {info[key]}")
    else:
        print(json.dumps(info, indent=2))
    return 0


def run_inspect_chunks(ctx: Context) -> int:
    from ..info import inspect_chunks
    a = ctx.args
    index = ctx.read_index(a.index)
    store = None
    if a.store:
        if len(a.store) != 1:
            raise UsageError("inspect-chunks takes one local store")
        store = ctx.open(a.store[0])
    text = json.dumps([c.as_json() for c in inspect_chunks(index, store)], indent=2) + "\n"
    if a.output and a.output != "-":
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def run_config(ctx: Context) -> int:
    """Print the config in effect; with -w, write it (to --config, else pydesync's own path) instead."""
    text = json.dumps(ctx.config.as_json(), indent=2)
    if not ctx.args.write:
        print(text)
        return 0
    path = os.path.expanduser(ctx.args.config or OWN_CONFIG)
    print(f"Writing config to {path}")
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        with atomic_write(path, mode=0o600) as f:
            f.write((text + "\n").encode())
    except OSError as e:
        raise UsageError(f"cannot write config {path}: {e.strerror}") from None
    return 0
