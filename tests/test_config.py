"""Config file and Go-glob location matching (desync's location test table, in spirit)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pydesync.config import Config, load_config, location_matches
from pydesync.errors import UsageError


@pytest.mark.parametrize("pattern,location,expected", [
    ("https://example.com/path", "https://example.com/path", True),
    ("https://example.com/path/", "https://example.com/path", True),
    ("https://example.com/path", "https://example.com/path/", True),
    ("https://*", "https://example.com/path", False),
    ("https://*/path", "https://example.com/path", True),
    ("*://example.com/path", "http://example.com/path", True),
    ("http?://example.com/path", "http://example.com/path", False),
    ("https://example.com/*/*/", "https://example.com/path/another/", True),
    ("https://example.com/*", "https://example.com/path/another", False),
    ("https://example.com:8080/path", "https://example.com/path", False),
    ("s3+https://host/bucket[0-9]", "s3+https://host/bucket7", True),
    ("s3+https://host/bucket[^0-9]", "s3+https://host/bucket7", False),
    ("/path/*", "/path", False),
    ("/path/*", "/path/store", True),
    ("/pat?", "/pat", False),
    ("/pat?", "/path", True),
    ("/path/../path", "/path", True),
    ("/path/", "/path", True),
    ("/path/to/store", "https://example.com/path/to/store", False),
])
def test_location_matching(pattern, location, expected):
    assert location_matches(pattern, location) is expected


def test_relative_paths_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert location_matches("store", str(tmp_path / "store"))
    assert location_matches(str(tmp_path / "store/"), "store")


def test_options_for(tmp_path: Path):
    config = Config(store_options={str(tmp_path / "s"): {"uncompressed": True, "skip-verify": True}})
    opts = config.options_for(str(tmp_path / "s") + "/")
    assert opts.uncompressed and opts.skip_verify
    assert not config.options_for(str(tmp_path / "other")).uncompressed


def test_two_matching_entries_are_an_error(tmp_path: Path):
    config = Config(store_options={"/path/to/store/": {}, "/path/to/store": {}})
    with pytest.raises(UsageError, match="multiple store-options entries"):
        config.options_for("/path/to/store")


def test_load_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None).store_options == {}  # missing default file is fine
    with pytest.raises(UsageError, match="does not exist"):
        load_config(str(tmp_path / "nope.json"))
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"store-options": {"/x": {"uncompressed": True}}}))
    assert load_config(str(path)).store_options == {"/x": {"uncompressed": True}}
    path.write_text("{broken")
    with pytest.raises(UsageError, match="cannot read config"):
        load_config(str(path))
    default = tmp_path / ".config" / "desync"
    default.mkdir(parents=True)
    (default / "config.json").write_text(json.dumps({"store-options": {"/y": {}}}))
    assert "/y" in load_config(None).store_options
    os.unlink(default / "config.json")


def test_own_config_location_wins_over_desyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    desync = tmp_path / ".config" / "desync"
    desync.mkdir(parents=True)
    (desync / "config.json").write_text(json.dumps({"store-options": {"/from-desync": {}}}))
    assert "/from-desync" in load_config(None).store_options  # desync's file is read
    own = tmp_path / ".config" / "pydesync"
    own.mkdir(parents=True)
    (own / "config.json").write_text(json.dumps({"store-options": {"/from-pydesync": {}}}))
    assert list(load_config(None).store_options) == ["/from-pydesync"]


def test_config_command_prints_and_writes(cli, tmp_path: Path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"store-options": {"/srv/store": {"uncompressed": True}}}))
    r = cli("--config", src, "config")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.out)
    assert shown["store-options"] == {"/srv/store": {"uncompressed": True}}
    assert shown["s3-credentials"] is None
    r = cli("--config", src, "config", "-w")
    assert r.returncode == 0 and f"Writing config to {src}" in r.out
    r = cli("config", "-w", env={"HOME": str(tmp_path)})
    assert r.returncode == 0
    written = tmp_path / ".config" / "pydesync" / "config.json"  # our own path, not desync's
    assert r.out == f"Writing config to {written}\n"  # and not the JSON as well
    assert written.exists() and oct(written.stat().st_mode & 0o777) == "0o600"
    assert not (tmp_path / ".config" / "desync").exists()
