"""catar building blocks: SipHash, goodbye layout, flags, exclusions, and decoder robustness."""

from __future__ import annotations

import contextlib
import io
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import assert_clean_error

from pydesync import _siphash
from pydesync.catar import ArchiveDecoder, ArchiveError, DirectoryEnd, TreeEncoder, archive_flags, exclude
from pydesync.catar import format as F

PORTABLE = ["permissions", "nsec-time", "symlinks", "device-nodes", "fifos", "sockets"]


def test_siphash_reference_vectors():
    key = bytes(range(16))
    assert _siphash.siphash24(key, bytes(range(15))) == 0xA129CA6149BE45E5  # SipHash paper
    assert _siphash.siphash24(key, b"") == 0x726FDB47DD0E0E31
    with pytest.raises(ValueError):
        _siphash.siphash24(b"short", b"x")


@pytest.mark.parametrize("count", [0, 1, 2, 3, 6, 7, 13, 20, 100])
def test_eytzinger_is_a_binary_search_tree(count):
    order = F.eytzinger_order(count)
    assert sorted(order) == list(range(count))

    def in_order(i: int) -> list[int]:
        return [] if i >= count else [*in_order(2 * i + 1), order[i], *in_order(2 * i + 2)]

    assert in_order(0) == list(range(count))


def test_default_flags_match_casync():
    assert archive_flags() == 0xB0000001FFEFFE26
    assert archive_flags(with_=PORTABLE) == 0xB000000000001F20
    assert archive_flags(with_=["best"]) == F.normalize_flags(0x1FFFFFE26 | 0xB000000000000000)
    assert archive_flags(without=["xattrs"]) & F.WITH_XATTRS == 0
    assert archive_flags(with_=["2sec-time", "sec-time"]) & F.WITH_2SEC_TIME == 0  # sec drops 2sec
    assert F.normalize_flags(F.WITH_ACL) & (F.WITH_32BIT_UIDS | F.WITH_USER_NAMES)


def test_unknown_feature_is_an_error():
    with pytest.raises(Exception, match="unknown feature"):
        archive_flags(with_=["colour"])


@pytest.mark.parametrize("lines,name,is_dir,excluded", [
    (b"*.o\n", b"x.o", False, True),
    (b"*.o\n", b"x.c", False, False),
    (b"*.o\n!keep.o\n", b"keep.o", False, False),
    (b"build/\n", b"build", False, False),
    (b"build/\n", b"build", True, True),
    (b"# comment\n\n", b"x", False, False),
    (b"*\n", b".hidden", False, False),  # FNM_PERIOD
    (b".*\n", b".hidden", False, True),
])
def test_exclude_rules(lines, name, is_dir, excluded):
    assert exclude.test(exclude.parse_file(lines), name, is_dir)[0] is excluded


def test_unanchored_rules_apply_below_and_anchored_do_not():
    rules = exclude.parse_file(b"*.tmp\n/top.log\nsub/inner.txt\n")
    _, below = exclude.test(rules, b"sub", True)
    assert exclude.test(below, b"x.tmp", False)[0]
    assert exclude.test(below, b"inner.txt", False)[0]
    assert not exclude.test(below, b"top.log", False)[0]
    assert exclude.test(rules, b"top.log", False)[0]


def _tree(root: Path) -> Path:
    (root / "d" / "e").mkdir(parents=True)
    for rel, text in [("a.txt", "a"), ("b.tmp", "b"), ("d/c.txt", "c"), ("d/e/f.tmp", "f"), ("keep.tmp", "k"),
                      ("d/e/keep.txt", "k")]:
        (root / rel).write_text(text)
    (root / ".caexclude").write_text("*.tmp\n!keep.tmp\nd/e/\n")
    os.symlink("a.txt", root / "ln")
    for p in [root, *root.rglob("*")]:
        os.utime(p, ns=(1_600_000_000_123_456_789,) * 2, follow_symlinks=False)
    return root


def test_caexclude_matches_casync(casync, tmp_path: Path):
    tree = _tree(tmp_path / "tree")
    ref = tmp_path / "ref.catar"
    subprocess.run([casync, "make", *[f"--with={w}" for w in PORTABLE], str(ref), str(tree)], check=True,
                   capture_output=True)
    assert b"".join(TreeEncoder(tree, archive_flags(with_=PORTABLE))) == ref.read_bytes()
    names = [n.path for n in ArchiveDecoder(io.BytesIO(ref.read_bytes())) if not isinstance(n, DirectoryEnd)]
    assert b"b.tmp" not in names and b"keep.tmp" in names and b"d/e" not in names


def _valid_archive(tmp_path: Path) -> bytes:
    return b"".join(TreeEncoder(_tree(tmp_path / "src"), archive_flags(with_=PORTABLE)))


def _decode_all(data: bytes) -> int:
    count = 0
    for item in ArchiveDecoder(io.BytesIO(data)):
        if not isinstance(item, DirectoryEnd):
            count += 1
            for _ in item.payload():
                pass
    return count


def test_decoder_rejects_every_corruption_cleanly(tmp_path: Path):
    """Random flips, truncations and splices raise ArchiveError or decode; nothing else escapes."""
    data = _valid_archive(tmp_path)
    assert _decode_all(data) > 5
    rng = random.Random(1234)
    for i in range(600):
        buf = bytearray(data)
        mode = i % 3
        if mode == 0:
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif mode == 1:
            del buf[rng.randrange(len(buf)):]
        else:
            pos = rng.randrange(len(buf) - 8)
            buf[pos:pos + 8] = struct.pack("<Q", rng.choice([0, 15, 16, 17, 2**63, 2**64 - 1, 2**32]))
        with contextlib.suppress(ArchiveError):
            _decode_all(bytes(buf))


@pytest.mark.parametrize("name", [b"..", b".", b"a/b", b"a\0b", b""])
def test_decoder_rejects_bad_names(tmp_path: Path, name: bytes):
    data = bytearray(_valid_archive(tmp_path))
    original = b"a.txt"
    at = data.index(F.cstring(F.FILENAME, original))
    replaced = F.cstring(F.FILENAME, name) if b"\0" not in name else \
        struct.pack("<QQ", 16 + len(name) + 1, F.FILENAME) + name + b"\0"
    data[at: at + 16 + len(original) + 1] = replaced
    with pytest.raises(ArchiveError):
        _decode_all(bytes(data))


def test_decoder_rejects_trailing_data_and_wrong_goodbye(tmp_path: Path):
    data = _valid_archive(tmp_path)
    with pytest.raises(ArchiveError, match="after the end"):
        _decode_all(data + b"x")
    last_goodbye = data.rindex(struct.pack("<Q", F.GOODBYE)) - 8
    broken = bytearray(data)
    broken[last_goodbye + 16 + 16] ^= 0xFF  # a hash in the root's goodbye table
    with pytest.raises(ArchiveError, match="GOODBYE"):
        _decode_all(bytes(broken))


def test_tar_cli_errors(cli, tmp_path: Path):
    (tmp_path / "file").write_text("x")
    assert_clean_error(cli("tar", tmp_path / "o.catar", tmp_path / "file"), "not a directory")
    assert_clean_error(cli("tar", tmp_path / "o.catar", tmp_path / "missing"), "does not exist")
    assert_clean_error(cli("tar", "-i", tmp_path / "o.caidx", tmp_path), "-s")
    assert_clean_error(cli("tar", "--with=colour", tmp_path / "o.catar", tmp_path), "unknown feature")
    assert not (tmp_path / "o.catar").exists()


def test_tar_to_stdout_and_index(cli, tmp_path: Path):
    tree = _tree(tmp_path / "t")
    out = cli("tar", "--with=" + ",".join(PORTABLE), "-", tree)
    assert out.returncode == 0
    assert out.stdout == b"".join(TreeEncoder(tree, archive_flags(with_=PORTABLE)))
    r = cli("tar", "-i", "-s", tmp_path / "store", tmp_path / "t.caidx", tree)
    assert r.returncode == 0, r.stderr
    r = cli("cat", "-s", tmp_path / "store", tmp_path / "t.caidx")
    assert r.stdout == b"".join(TreeEncoder(tree, archive_flags()))
