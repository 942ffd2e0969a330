"""Archive commands: tar and untar."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING

from ..chunker import ChunkSizes
from ..digest import SHA512_256, check_digest
from ..errors import PydesyncError, UsageError, one_line
from ..fsutil import atomic_write
from .common import CommaList, Context, add_bool, add_store_options, add_stores, check_index_output
from .progress import CountingReader, Progress

if TYPE_CHECKING:
    from ..catar.decoder import Readable
    from ..catar.encoder import TreeEncoder
    from ..catar.extractor import ExtractOptions

TIME_FEATURES = ("nsec-time", "usec-time", "sec-time", "2sec-time")


def add_feature_flags(p: argparse.ArgumentParser) -> None:
    """casync's --with/--without feature selection and exclusion switches."""
    p.add_argument("--with", dest="with_", action=CommaList, default=[], metavar="FEATURE",
                   help="store only these features (casync names, e.g. permissions, xattrs, best, unix)")
    p.add_argument("--without", action=CommaList, default=[], metavar="FEATURE",
                   help="do not store these features (e.g. xattrs, acl, 2sec-time)")
    add_bool(p, "--exclude-nodump", default=True, help="skip files with chattr +d (default true)")
    add_bool(p, "--exclude-file", default=True, help="honour .caexclude files (default true)")


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("tar", parents=[parent], help="pack a directory into a catar (or chunks + caidx)",
                       description="Pack SOURCE into the archive OUTPUT (.catar, '-' for stdout), or with "
                                   "-i into chunks in the -s store and the index OUTPUT (.caidx). The "
                                   "encoding is byte-identical to casync make for the same features.")
    p.add_argument("output")
    p.add_argument("source")
    add_stores(p, help="target store (with -i; created if missing)", cache=False)
    p.add_argument("-m", "--chunk-size", default="16:64:256", help="min:avg:max chunk size in KiB (with -i)")
    p.add_argument("-i", "--index", action="store_true", help="write chunks and a .caidx instead of a catar")
    p.add_argument("--input-format", choices=["disk", "tar"], default="disk",
                   help="disk (SOURCE is a directory) or tar (SOURCE is a tar stream, plain or compressed, "
                        "- for stdin)")
    p.add_argument("--no-time", action="store_true", help="store no modification times")
    p.add_argument("--tar-add-root", action="store_true",
                   help="(tar input) make a root directory (mode 0755) when the stream lists none")
    p.add_argument("-x", "--one-file-system", action="store_true", help="do not cross filesystem boundaries")
    add_feature_flags(p)
    add_store_options(p)
    p.set_defaults(func=run_tar)

    p = sub.add_parser("untar", parents=[parent], help="extract a catar (or caidx + chunks) to a directory",
                       description="Unpack the archive INPUT (a .catar, '-' for stdin; with -i a .caidx "
                                   "whose chunks come from the -s stores) into the directory TARGET. "
                                   "Owners, modes, times, xattrs, ACLs, file capabilities, chattr flags "
                                   "and special files are restored as far as the archive records them. "
                                   "Nothing is written outside TARGET and no symlink is followed.")
    p.add_argument("input")
    p.add_argument("target")
    add_stores(p, help="source store(s), used with -i")
    p.add_argument("-i", "--index", action="store_true", help="read an index (caidx), not a catar")
    p.add_argument("--no-same-owner", action="store_true", help="extract files as the current user")
    p.add_argument("--no-same-permissions", action="store_true",
                   help="use the current umask instead of the archive's permissions")
    p.add_argument("--output-format", choices=["disk", "gnu-tar"], default="disk",
                   help="disk (a tree in TARGET) or gnu-tar (a tar stream in the file TARGET, - for stdout)")
    add_bool(p, "--overwrite", default=True,
             help="replace entries already in TARGET, as desync does (default; symlinks in the way are "
                  "replaced, never followed); --overwrite=false refuses instead")
    p.add_argument("--best-effort", action="store_true",
                   help="warn about what cannot be restored (owner, xattrs, flags, devices) and go on")
    p.add_argument("--no-resume", action="store_true",
                   help="with -i: discard the chunks an interrupted run kept (.TARGET.partial-chunks) "
                        "instead of reading them")
    add_store_options(p)
    p.set_defaults(func=run_untar)


def feature_flags(ctx: Context) -> int:
    from ..catar import format as F
    a = ctx.args
    without = list(a.without) + (list(TIME_FEATURES) if a.no_time else [])
    return F.archive_flags(with_=a.with_, without=without, digest_sha512_256=ctx.digest == SHA512_256,
                           exclude_nodump=a.exclude_nodump, exclude_file=a.exclude_file,
                           exclude_submounts=a.one_file_system)


def run_tar(ctx: Context) -> int:
    from ..archive import tar_to_file, tar_to_index
    from ..catar.fromtar import TarInputEncoder
    a = ctx.args
    if a.tar_add_root and a.input_format != "tar":
        raise UsageError("--tar-add-root only applies to --input-format=tar")
    if a.one_file_system and a.input_format == "tar":
        raise UsageError("-x/--one-file-system only applies to --input-format=disk")
    flags = feature_flags(ctx)
    source: str | TreeEncoder = a.source
    if a.input_format == "tar":
        stream = sys.stdin.buffer if a.source == "-" else a.source
        source = TarInputEncoder(stream, flags, add_root=a.tar_add_root, warn=print_warning)
    if not a.index:
        if a.store:
            raise UsageError("-s is only used with -i")
        with Progress("Packing ", None, unit="bytes") as bar:
            tar_to_file(source, a.output, flags, progress=bar.callback(), warn=print_warning)
        return 0
    if len(a.store) != 1:
        raise UsageError("-i needs exactly one target store (-s)")
    index_options = ctx.index_options(a.output)  # checked first: index stores refuse encryption options
    check_index_output(a.output, a.source)
    store = ctx.target(a.store[0], create=True)
    with store, Progress("Packing ", None, unit="bytes") as bar:
        tar_to_index(source, a.output, store, flags, ChunkSizes.parse_kib(a.chunk_size),
                     check_digest(ctx.digest), ctx.concurrency, progress=bar.callback(),
                     index_options=index_options, warn=print_warning)
    return 0


def print_warning(message: str) -> None:
    sys.stderr.write(f"Warning: {one_line(message)}\n")
    sys.stderr.flush()


def extract_tree(stream: Readable, name: str, target: str, options: ExtractOptions) -> list[str]:
    """Decode a catar stream into TARGET, printing each warning (best effort) as it happens."""
    from ..catar.decoder import ArchiveDecoder
    from ..catar.extractor import TreeExtractor
    extractor = TreeExtractor(target, options, warn=print_warning)
    return extractor.extract(ArchiveDecoder(stream, name))


def run_untar(ctx: Context) -> int:
    from ..blobreader import BlobReader
    from ..catar.extractor import ExtractOptions
    from ..partial import resumable_chunks
    from ..streams import IterReader
    a = ctx.args
    options = ExtractOptions(overwrite=a.overwrite, best_effort=a.best_effort,
                             same_owner=not a.no_same_owner, same_permissions=not a.no_same_permissions)
    if a.output_format == "gnu-tar":
        return _untar_to_tar(ctx)
    if a.index:
        if not a.store:
            raise UsageError("-i requires at least one store (-s <location>)")
        index = ctx.read_index(a.input)
        store = ctx.source()
        with store, Progress("Unpacking ", index.length, unit="bytes") as bar, \
                resumable_chunks(a.target, store, resume=not a.no_resume) as source:
            pieces = BlobReader(index, source, ctx.concurrency).iter_range()
            extract_tree(counted(IterReader(pieces), bar), "<stdin>" if a.input == "-" else a.input,
                         a.target, options)
        return 0
    if a.input == "-":
        with Progress("Unpacking ", None, unit="bytes") as bar:
            extract_tree(counted(sys.stdin.buffer, bar), "<stdin>", a.target, options)
        return 0
    try:
        f = open(a.input, "rb")  # noqa: SIM115 - closed below, errors reported as one line
    except OSError as e:
        raise PydesyncError(f"cannot read {a.input}: {e.strerror}") from None
    with f, Progress("Unpacking ", os.fstat(f.fileno()).st_size, unit="bytes") as bar:
        extract_tree(counted(f, bar), a.input, a.target, options)
    return 0


def _untar_to_tar(ctx: Context) -> int:
    """untar --output-format=gnu-tar: the archive (or the index's) as a tar stream in TARGET
    (`-`: stdout), written under a temporary name and renamed."""
    from ..blobreader import BlobReader
    from ..catar.decoder import ArchiveDecoder
    from ..catar.totar import write_tar
    from ..streams import IterReader
    a = ctx.args
    with contextlib.ExitStack() as stack:
        if a.index:
            if not a.store:
                raise UsageError("-i requires at least one store (-s <location>)")
            index = ctx.read_index(a.input)
            store = stack.enter_context(ctx.source())
            stream: Readable = IterReader(BlobReader(index, store, ctx.concurrency).iter_range())
        elif a.input == "-":
            stream = sys.stdin.buffer
        else:
            try:
                stream = stack.enter_context(open(a.input, "rb"))
            except OSError as e:
                raise PydesyncError(f"cannot read {a.input}: {e.strerror}") from None
        name = "<stdin>" if a.input == "-" else a.input
        try:
            with atomic_write(a.target) as out:
                write_tar(ArchiveDecoder(stream, name), out, warn=print_warning)
        except OSError as e:
            raise PydesyncError(f"cannot write {a.target}: {e.strerror}") from None
    return 0


def counted(stream: Readable, bar: Progress) -> Readable:
    """The stream, reporting to the progress bar when one is shown."""
    return CountingReader(stream, bar.add) if bar.enabled else stream
