"""`mtree` and `digest`: the format, the inputs, and `casync digest` on every kind of input."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_error, need
from procutil import HANG_GUARD

from pydesync.catar.decoder import Node
from pydesync.digest import SHA256, SHA512_256
from pydesync.mtree import escape, mtree_lines, node_line

PORTABLE = ["permissions", "nsec-time", "symlinks", "device-nodes", "fifos", "sockets"]
PORTABLE_ARGS = [f"--with={f}" for f in PORTABLE]
ROOT = os.geteuid() == 0


def sha512_256(data: bytes) -> str:
    return hashlib.new("sha512_256", data).hexdigest()


def out(result) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def casync_digest(casync: str, *args: str | os.PathLike[str]) -> str:
    proc = subprocess.run([casync, "digest", *map(str, args)], capture_output=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode().strip()


@pytest.fixture(scope="module")
def vector_trees(casync_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("vector-trees")
    gen = [sys.executable, str(casync_data / "gen.py"), "tree"]
    subprocess.run([*gen, str(base / "tree-portable")], check=True)
    if ROOT:
        subprocess.run([*gen, str(base / "tree-full"), "--full"], check=True)
    return base


# ---- the mtree format ----------------------------------------------------------------------------
def test_escape():
    assert escape(b"plain-name_1.txt") == "plain-name_1.txt"
    assert escape(b"a b#c\\d") == "a\\040b\\043c\\134d"
    assert escape(b"\t\n\x7f\x00") == "\\011\\012\\177\\000"
    assert escape("ü".encode()) == "\\303\\274"


def _node(mode: int, **kw) -> Node:  # type: ignore[no-untyped-def]
    fields = {"_path": b"x", "name": b"x", "offset": 0, "feature_flags": 0, "mode": mode, "flags": 0,
              "uid": 1, "gid": 2, "mtime": 5_000_000_007}
    fields.update(kw)
    return Node(**fields)  # type: ignore[arg-type]


def test_node_lines_every_type():
    assert node_line(_node(stat.S_IFDIR | 0o1755, _path=b"")) == \
        ". type=dir mode=1755 uid=1 gid=2 time=5.000000007"
    assert node_line(_node(stat.S_IFLNK | 0o777, target=b"a b")) == \
        "x type=link mode=0777 target=a\\040b uid=1 gid=2 time=5.000000007"
    assert node_line(_node(stat.S_IFCHR | 0o666, rdev=(1, 3))) == \
        "x type=char mode=0666 uid=1 gid=2 time=5.000000007"
    assert node_line(_node(stat.S_IFBLK | 0o660, rdev=(7, 0))).startswith("x type=block mode=0660 ")
    assert node_line(_node(stat.S_IFIFO | 0o640)).startswith("x type=fifo mode=0640 ")
    assert node_line(_node(stat.S_IFSOCK | 0o755)).startswith("x type=socket mode=0755 ")
    # a file without payload reader: size 0, digest of nothing
    empty = _node(stat.S_IFREG | 0o4755, size=0, mtime=0)
    assert node_line(empty) == f"x type=file mode=4755 uid=1 gid=2 size=0 time=0.000000000 " \
                               f"sha512256digest={sha512_256(b'')}"
    assert node_line(empty, SHA256).endswith(f" sha256digest={hashlib.sha256(b'').hexdigest()}")
    assert list(mtree_lines([], SHA512_256)) == ["#mtree v1.0"]


def test_mtree_sha256_and_three_inputs(cli, casync_data, vector_trees, tmp_path):
    tree = vector_trees / "tree-portable"
    text = out(cli("--digest", "sha256", "mtree", *PORTABLE_ARGS, tree))
    line = next(x for x in text.splitlines() if x.startswith("README "))
    assert line == ("README type=file mode=0644 uid=0 gid=0 size=13 time=1600000000.123456789 "
                    f"sha256digest={hashlib.sha256(b'hello casync' + bytes([10])).hexdigest()}")
    assert out(cli("mtree", "--digest", "sha256", casync_data / "tree-portable.catar")) == text
    # stdin works for a catar and for an index
    with open(casync_data / "tree-portable.catar", "rb") as f:
        assert out(cli("--digest=sha256", "mtree", "-", input=f.read())) == text
    index = (casync_data / "tree-portable.caidx").read_bytes()
    store = casync_data / "tree-portable.castr"
    assert out(cli("mtree", "-i", "-s", store, "-", input=index)) == out(cli("mtree", *PORTABLE_ARGS, tree))
    # as in desync, an explicit --digest must match the index's
    assert_clean_error(cli("--digest=sha256", "mtree", "-i", "-s", store, "-", input=index), "SHA512-256")


def test_mtree_errors(cli, casync_data, tmp_path):
    assert_clean_error(cli("mtree", "-i", casync_data / "tree-portable.caidx"), "-i requires", "-s")
    assert_clean_error(cli("mtree", "-i", "-s", tmp_path, tmp_path), "-i can't be used with input directory")
    assert_clean_error(cli("mtree", tmp_path / "missing"), "missing", "does not exist")
    assert_clean_error(cli("mtree", casync_data / "tree-portable.caidx"), "is an index", "-i")
    assert_clean_error(cli("mtree", "--with=xattrs", casync_data / "tree-portable.catar"), "--with")
    blob_index = ("-i", "-s", casync_data / "blob-min.castr", casync_data / "blob-min.caibx")
    assert_clean_error(cli("mtree", *blob_index), "invalid archive")
    bad = tmp_path / "bad.catar"
    bad.write_bytes((casync_data / "tree-portable.catar").read_bytes()[:-1])
    r = cli("mtree", bad)
    assert_clean_error(r, "bad.catar", "truncated")
    assert r.stdout.startswith(b"#mtree v1.0\n")
    assert_clean_error(cli("mtree", "--digest", "md5", bad), "invalid digest algorithm")


# ---- digest against casync -----------------------------------------------------------------------
def test_digest_directory(casync, cli, vector_trees):
    tree = vector_trees / "tree-portable"
    expected = "0a30c626b2334949828f3a4f2614617939421e06539bfcdd1121dd32d2712970"  # MANIFEST.md
    assert casync_digest(casync, *PORTABLE_ARGS, tree) == expected
    assert out(cli("digest", *PORTABLE_ARGS, tree)).strip() == expected
    assert out(cli("digest", "--with=" + ",".join(PORTABLE), "--what=directory", tree)).strip() == expected
    # --digest sha256 changes the stream's digest flag and the hash
    assert out(cli("--digest", "sha256", "digest", *PORTABLE_ARGS, tree)).strip() == \
        casync_digest(casync, "--digest=sha256", *PORTABLE_ARGS, tree)
    # casync's default features (what `casync digest DIR` uses) and --without
    assert out(cli("digest", tree)).strip() == casync_digest(casync, tree)
    assert out(cli("digest", "--without=xattrs,acl", tree)).strip() == \
        casync_digest(casync, "--without=xattrs", "--without=acl", tree)
    # the default input is the current directory
    assert out(cli("digest", *PORTABLE_ARGS, cwd=tree)).strip() == expected


def test_digest_full_tree_as_root(casync, cli, vector_trees):
    need(ROOT, "tree-full needs root")
    tree = vector_trees / "tree-full"
    expected = "d6ec011a477e29d703052756a6633b714adba48718239380b770b1f4e93cd716"  # MANIFEST.md
    assert casync_digest(casync, tree) == expected
    assert out(cli("digest", tree)).strip() == expected


@pytest.mark.parametrize("vector", ["tree-portable", "tree-full"])
def test_digest_catar_and_caidx(casync, cli, casync_data, vector):
    catar, caidx, store = (casync_data / f"{vector}{ext}" for ext in (".catar", ".caidx", ".castr"))
    expected = casync_digest(casync, catar)
    assert expected == sha512_256(catar.read_bytes())
    assert casync_digest(casync, f"--store={store}", caidx) == expected
    assert out(cli("digest", catar)).strip() == expected
    assert out(cli("digest", "-s", store, caidx)).strip() == expected
    # the archive's own digest flag picks the hash: --digest does not change it (as casync)
    assert out(cli("--digest", "sha256", "digest", catar)).strip() == expected
    with open(catar, "rb") as f:
        assert out(cli("digest", "--what=archive", "-", input=f.read())).strip() == expected


def test_digest_sha256_archive(casync, cli, vector_trees, tmp_path):
    tree = vector_trees / "tree-portable"
    assert out(cli("--digest", "sha256", "tar", *PORTABLE_ARGS, tmp_path / "t.catar", tree)) == ""
    expected = hashlib.sha256((tmp_path / "t.catar").read_bytes()).hexdigest()
    assert casync_digest(casync, tmp_path / "t.catar") == expected
    assert out(cli("digest", tmp_path / "t.catar")).strip() == expected
    # the same bytes without the suffix are a blob: hashed with --digest (default SHA-512/256)
    shutil.copy(tmp_path / "t.catar", tmp_path / "t.bin")
    blob = sha512_256((tmp_path / "t.catar").read_bytes())
    assert casync_digest(casync, tmp_path / "t.bin") == blob
    assert out(cli("digest", tmp_path / "t.bin")).strip() == blob
    assert out(cli("digest", "--what=archive", tmp_path / "t.bin")).strip() == expected


def test_digest_blob_and_caibx(casync, cli, casync_data, casync_inputs, tmp_path):
    blob = casync_inputs / "blob-min.bin"
    expected = "db9dead48968f73c878a85bdd73d58500afb90f72bbbd8b1325dcf9583f196bc"  # MANIFEST.md
    assert casync_digest(casync, blob) == expected
    assert out(cli("digest", blob)).strip() == expected
    assert out(cli("digest", "-", input=blob.read_bytes())).strip() == expected
    sha256 = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert casync_digest(casync, "--digest=sha256", blob) == sha256
    assert out(cli("--digest", "sha256", "digest", blob)).strip() == sha256
    for index, store in (("blob-min.caibx", "blob-min.castr"),
                         ("blob-min-sha256.caibx", "blob-min-sha256-xz.castr")):
        # casync hashes the blob of any .caibx with SHA-512/256, whatever its chunk digest
        assert casync_digest(casync, f"--store={casync_data / store}", casync_data / index) == expected
        assert out(cli("digest", "-s", casync_data / store, casync_data / index)).strip() == expected
    big = casync_inputs / "blob.bin"
    assert out(cli("digest", "-s", casync_data / "blob.castr", casync_data / "blob.caibx")).strip() == \
        casync_digest(casync, big) == sha512_256(big.read_bytes())


def test_digest_default_store_next_to_index(casync, cli, casync_data, tmp_path):
    shutil.copy(casync_data / "tree-portable.caidx", tmp_path / "t.caidx")
    assert_clean_error(cli("digest", tmp_path / "t.caidx"), "no store", "default.castr")
    shutil.copytree(casync_data / "tree-portable.castr", tmp_path / "default.castr")
    expected = casync_digest(casync, tmp_path / "t.caidx")
    assert out(cli("digest", tmp_path / "t.caidx")).strip() == expected


def test_digest_errors(cli, casync_data, tmp_path):
    assert_clean_error(cli("digest", tmp_path / "missing"), "does not exist")
    assert_clean_error(cli("digest", "--what=blob", tmp_path), "is a directory")
    catar = casync_data / "tree-portable.catar"
    assert_clean_error(cli("digest", "--what=directory", catar), "not a directory")
    assert_clean_error(cli("digest", "--without=xattrs", casync_data / "tree-portable.catar"), "--with")
    (tmp_path / "empty.castr").mkdir()
    assert_clean_error(cli("digest", "-s", tmp_path / "empty.castr", casync_data / "tree-portable.caidx"),
                       "chunk")
    bad = tmp_path / "bad.catar"
    bad.write_bytes((casync_data / "tree-portable.catar").read_bytes() + b"\0")
    assert_clean_error(cli("digest", bad), "bad.catar", "data after the end")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_clean_error(cli("digest", fifo), "neither a directory")
