"""The distribution registry with token authentication (its `auth: token` section), over TLS, and the
token endpoint it sends clients to, run by the test: the ghcr.io / Docker Hub / Harbor flow.

The test makes everything: a CA-less self-signed certificate for 127.0.0.1 (the registry's and the
token endpoint's TLS; clients trust it with --ca-cert), and a token signer whose certificate is the
registry's root bundle (tokens carry it in their x5c header, as distribution checks). The endpoint
grants pull to anyone and push (and delete) only to USER:PASSWORD given as Basic auth; tokens it is
told to spoil are issued already expired, so the registry refuses them and a client must ask again.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import PASSWORD, USER, need
from procutil import JsonHandler, free_port, serve_in_thread, stop, wait_listening

SERVICE, ISSUER = "pydesync-test-registry", "pydesync-test-issuer"


def self_signed(d: Path, name: str, ip: bool) -> tuple[object, bytes]:
    """(private key, certificate PEM) for `name`, written to d/name.pem and d/name.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=7)))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(
            ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (d / f"{name}.pem").write_bytes(pem)
    (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return key, cert.public_bytes(serialization.Encoding.DER)


def _sorted_actions(scope: str) -> str:
    """`repository:NAME:push,pull` as `repository:NAME:pull,push` (the registry's order varies)."""
    if scope.count(":") != 2:
        return scope
    kind, name, actions = scope.split(":")
    return f"{kind}:{name}:{','.join(sorted(actions.split(',')))}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenRegistry:
    port: int
    ca_cert: Path  # what clients trust (--ca-cert)
    # (scope asked, actions sorted; whether with the credentials), and the scopes (actions sorted)
    # whose next token is issued expired
    requests: list[tuple[str, bool]] = field(default_factory=list)
    spoil: list[str] = field(default_factory=list)

    def store(self, repository: str) -> str:
        return f"oci+https://127.0.0.1:{self.port}/{repository}"


class _Endpoint:
    """The token endpoint (RFC 6749 style GET ?service=&scope=, Docker's token format)."""

    def __init__(self, d: Path, registry: TokenRegistry, signer: object, signer_der: bytes):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

        def token(scope: str, trusted: bool, expired: bool) -> str:
            access = []
            if scope:
                kind, name, actions = scope.split(":")
                granted = [a for a in actions.split(",") if trusted or a == "pull"]
                access.append({"type": kind, "name": name, "actions": granted})
            now = int(time.time())
            exp = now - 600 if expired else now + 3600
            claims = {"iss": ISSUER, "sub": USER if trusted else "", "aud": SERVICE, "exp": exp,
                      "nbf": now - 1200, "iat": now - 1200, "jti": os.urandom(8).hex(), "access": access}
            header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(signer_der).decode()]}
            signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
            signature = signer.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore
            return f"{signing}.{_b64(signature)}"

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scope = _sorted_actions((query.get("scope") or [""])[0])
                trusted = self.headers.get("Authorization") == basic
                registry.requests.append((scope, trusted))
                expired = scope in registry.spoil
                if expired:
                    registry.spoil.remove(scope)
                if self.headers.get("Authorization") and not trusted:
                    self.reply_json({"errors": [{"code": "UNAUTHORIZED"}]}, 401)
                    return
                self.reply_json({"token": token(scope, trusted, expired), "expires_in": 3600})

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(d / "127.0.0.1.pem", d / "127.0.0.1.key")
        self.server, base = serve_in_thread(Handler, context)
        self.url = f"{base}/token"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_token_registry(d: Path) -> Iterator[TokenRegistry]:
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    need(os.access(binary, os.X_OK), "docker-registry not installed (apt-get install docker-registry)")
    self_signed(d, "127.0.0.1", ip=True)
    signer, signer_der = self_signed(d, "token-signer", ip=False)
    registry = TokenRegistry(free_port(), d / "127.0.0.1.pem")
    endpoint = _Endpoint(d, registry, signer, signer_der)
    (d / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
        f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{registry.port}\n  tls:\n"
        f"    certificate: {d}/127.0.0.1.pem\n    key: {d}/127.0.0.1.key\n"
        f"auth:\n  token:\n    realm: {endpoint.url}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
        f"    rootcertbundle: {d}/token-signer.pem\n")
    try:
        with open(d / "registry.log", "wb") as log:
            proc = subprocess.Popen([binary, "serve", str(d / "config.yml")], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                if not wait_listening(proc, registry.port, 30):
                    need(False, f"docker-registry did not start: {(d / 'registry.log').read_text()[-500:]}")
                yield registry
            finally:
                stop(proc)
    finally:
        endpoint.stop()
