#!/usr/bin/env python3
"""Bounded mutation fuzzing of pydesync's parsers of untrusted input.

    python3 fuzz/fuzz_parsers.py                       # every target, 30 s each
    python3 fuzz/fuzz_parsers.py --target catar --seconds 300
    python3 fuzz/fuzz_parsers.py --replay fuzz/crashes  # rerun saved crashes

Targets: `index` (.caibx/.caidx parsing), `catar` (the archive decoder, payloads read),
`protocol` (casync's pull server fed a mutated client stream), `remotesync` (SyncInfo JSON and
binary, the receiver's data stream, the sender's wishlist). Seeds are valid inputs (casync's
vectors from ../shared when present, else built here); each case mutates one (bit flips, bytes
set to boundary values, 64-bit fields set to extremes, cuts, insertions, duplicated slices).

A case passes when it parses or raises the target's documented error (a PydesyncError). It
fails on any other exception, on taking longer than 5 s (a hang) or on exceeding 1 GiB of
memory. Failing inputs are written to fuzz/crashes/<target>-<hash>.bin; tests/test_fuzz_regressions.py
replays everything saved there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from pydesync.catar.decoder import ArchiveDecoder  # noqa: E402
from pydesync.errors import PydesyncError  # noqa: E402
from pydesync.index import Index, parse_index  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "testdata" / "casync"
CASE_SECONDS = 5
MEMORY = 1 << 30
EXTREMES = [0, 1, 15, 16, 17, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1]


class Hang(Exception):
    pass


# ---- seeds -----------------------------------------------------------------------------------------
def index_seeds() -> list[bytes]:
    found = [p.read_bytes() for p in sorted(SHARED.glob("*.ca?dx"))] if SHARED.is_dir() else []
    index = Index()
    rng = random.Random(1)
    for _ in range(20):
        index.append(rng.randbytes(32), rng.randrange(1, 70000))
    return [*found, index.to_bytes(), Index().to_bytes()]


def catar_seeds() -> list[bytes]:
    found = [p.read_bytes() for p in sorted(SHARED.glob("*.catar"))] if SHARED.is_dir() else []
    if found:
        return found
    from pydesync.archive import tar_to_file
    from pydesync.catar import format as F

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "t"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "f").write_bytes(b"x" * 3000)
        (root / "a").write_text("hello")
        os.symlink("a", root / "link")
        tar_to_file(str(root), str(Path(d) / "t.catar"), F.WITH_BEST)
        return [(Path(d) / "t.catar").read_bytes()]


def protocol_seeds() -> list[bytes]:
    folder = SHARED / "protocol"
    found = [p.read_bytes() for p in sorted(folder.glob("*.c2s.bin"))] if folder.is_dir() else []
    from pydesync.protocol import GOODBYE, HELLO, PULL_CHUNKS, REQUEST, encode

    request = encode(REQUEST, struct.pack("<Q", 0) + bytes(32) * 3)
    return [*found, encode(HELLO, struct.pack("<Q", PULL_CHUNKS)) + request + encode(GOODBYE)]


def remotesync_seeds() -> list[bytes]:
    from pydesync.remotesync import ChunkInfo, SyncInfo

    rng = random.Random(2)
    datas = [rng.randbytes(rng.randrange(0, 500)) for _ in range(12)]
    info = SyncInfo([ChunkInfo(hashlib.sha256(d).digest(), len(d)) for d in datas], [2, 0, 1])
    return [info.to_json(), SyncInfo(info.chunks).to_binary()]


# ---- targets: each parses one input and may only raise a PydesyncError --------------------------------
def run_index(data: bytes) -> None:
    parse_index(data, "fuzz")


def run_catar(data: bytes) -> None:
    for item in ArchiveDecoder(io.BytesIO(data), "fuzz"):
        payload = getattr(item, "payload", None)
        if payload is not None and item.is_file:
            for _ in payload():
                pass


def run_protocol(data: bytes) -> None:
    from pydesync.protocol import Channel, PullServer
    from pydesync.store.local import LocalStore

    with tempfile.TemporaryDirectory() as d:
        store = LocalStore(d, create=True)
        PullServer(Channel(io.BytesIO(data), io.BytesIO(), "fuzz"), store).serve()


def run_remotesync(data: bytes) -> None:
    from pydesync.remotesync import SyncInfo, receive, send, wishlist

    for parse in (SyncInfo.from_json, SyncInfo.from_binary):
        with contextlib.suppress(PydesyncError):
            parse(data)
    rng = random.Random(len(data))
    datas = [rng.randbytes(rng.randrange(0, 300)) for _ in range(8)]
    from pydesync.remotesync import ChunkInfo

    info = SyncInfo([ChunkInfo(hashlib.sha256(x).digest(), len(x)) for x in datas], [1, 2, 0])
    wish = b"".join(wishlist(info, lambda key: False))
    receive(info, wish, io.BytesIO(data), lambda c, d: None)  # data as a hostile sender's stream
    send(info, data[: (info.positions + 7) // 8 + 1], lambda c: b"", lambda b: None)  # as a wishlist


TARGETS: dict[str, tuple[Callable[[], list[bytes]], Callable[[bytes], None]]] = {
    "index": (index_seeds, run_index),
    "catar": (catar_seeds, run_catar),
    "protocol": (protocol_seeds, run_protocol),
    "remotesync": (remotesync_seeds, run_remotesync),
}


# ---- mutation --------------------------------------------------------------------------------------
def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        kind = rng.randrange(7)
        if not out:
            out += rng.randbytes(rng.randrange(1, 64))
            continue
        at = rng.randrange(len(out))
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == 2 and len(out) >= 8:
            at = rng.randrange(0, len(out) - 7) & ~7
            out[at:at + 8] = struct.pack("<Q", rng.choice(EXTREMES))
        elif kind == 3:
            del out[rng.randrange(len(out)):]
        elif kind == 4:
            out[at:at] = rng.randbytes(rng.randrange(1, 40))
        elif kind == 5:
            end = min(len(out), at + rng.randrange(1, 200))
            out[at:at] = out[at:end]
        else:
            del out[at:at + rng.randrange(1, 100)]
    return bytes(out)


def one_case(run: Callable[[bytes], None], data: bytes) -> str | None:
    """None if the case behaved; else what went wrong."""
    signal.alarm(CASE_SECONDS)
    try:
        run(data)
    except PydesyncError:
        pass
    except Hang:
        return "hang (over 5 s)"
    except MemoryError:
        return "memory over 1 GiB"
    except Exception:
        return traceback.format_exc(limit=6)
    finally:
        signal.alarm(0)
    return None


def save(target: str, data: bytes, problem: str) -> Path:
    folder = HERE / "crashes"
    folder.mkdir(exist_ok=True)
    path = folder / f"{target}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(problem)
    return path


def fuzz(target: str, seconds: float, rng: random.Random) -> tuple[int, int]:
    seeds_of, run = TARGETS[target]
    seeds = seeds_of()
    deadline = time.monotonic() + seconds
    cases = failures = 0
    while time.monotonic() < deadline:
        data = mutate(rng, rng.choice(seeds))
        problem = one_case(run, data)
        cases += 1
        if problem is not None:
            failures += 1
            print(f"{target}: {problem.strip().splitlines()[-1]} -> {save(target, data, problem)}")
    return cases, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--seconds", type=float, default=30, help="per target")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    ap.add_argument("--replay", type=Path, help="run the saved inputs in this folder instead")
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Hang()))
    if args.replay:
        bad = 0
        for path in sorted(args.replay.glob("*.bin")):
            target = path.name.split("-", 1)[0]
            problem = one_case(TARGETS[target][1], path.read_bytes())
            print(f"{path.name}: {'ok' if problem is None else problem.strip().splitlines()[-1]}")
            bad += problem is not None
        return 1 if bad else 0
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"seed {seed}")
    rng = random.Random(seed)
    total_failures = 0
    for target in (TARGETS if args.target == "all" else [args.target]):
        cases, failures = fuzz(target, args.seconds, rng)
        total_failures += failures
        print(f"{target}: {cases} cases, {failures} failures")
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
