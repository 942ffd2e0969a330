"""OCI registry chunk stores: `oci+https://registry[:port]/repository` (and `oci+http://`), as in desync.

Every chunk is its own small artifact: a blob holding the chunk as stored (compressed
and/or encrypted, like a `.cacnk` file) and an OCI image manifest referencing it,
with artifact type `application/vnd.desync.chunk.v1`, the empty config, and tagged
`<id><extension>`. The chunk id lives only in the tag, so SHA512/256 ids work
although registries digest blobs with SHA256. Reading takes two requests (manifest,
blob), an existence check one, a write three (blob upload start, upload, manifest);
the empty config is pushed once per store. Prune deletes the manifests of
unreferenced chunk tags whose artifact type is ours; the registry's garbage collector
reclaims the blobs.

Credentials, first that applies: DESYNC_OCI_USERNAME / DESYNC_OCI_PASSWORD; the
config's `oci-credentials` entry matched like `store-options` (`username`, `secret`);
the Docker client's `auths` or credential helpers ($DOCKER_CONFIG/config.json or
~/.docker/config.json); else anonymous. Registries answer 401 with a challenge:
`Basic` gets the credentials, `Bearer` a token fetched from its realm (cached per scope).
Transport errors, 408, 429 and 5xx are retried `error-retry` times, (n + 1) x the base
interval apart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from ..codec import MAX_ENCODED_CHUNK
from ..digest import ChunkId
from ..errors import ChunkMissing, StoreError, UsageError
from .base import FormattedStore
from .converters import Converters
from .http import read_capped
from .http_fast import Response, TooLarge
from .options import StoreOptions
from .registry import StoreKind

CHUNK_ARTIFACT = "application/vnd.desync.chunk.v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_BLOB).hexdigest()
TITLE = "org.opencontainers.image.title"
MAX_BLOB = MAX_ENCODED_CHUNK  # a manifest naming a larger blob is refused before it is fetched
MAX_TOKEN_ANSWER = 1 << 20
TOKEN_TRIES = 2  # tokens asked for by one request: a fresh one, then one more if it was refused
TAG_PAGE = 1000
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


class OciLocation:
    def __init__(self, location: str):
        url = urlsplit(location)
        scheme = url.scheme.lower()
        if scheme not in ("oci+http", "oci+https"):
            raise UsageError(f"not an oci location: {location}")
        try:
            url.port  # noqa: B018 - validates the port
        except ValueError:
            raise UsageError(f"invalid port in {location}") from None
        repository = url.path.strip("/")
        if not url.hostname or not repository:
            raise UsageError(f"oci store location needs a registry and a repository: {location}")
        if not _REPOSITORY.match(repository):
            raise UsageError(f"invalid repository name '{repository}' in {location} "
                             "(lower case, a-z 0-9 . _ - /)")
        self.base = f"{scheme[len('oci+'):]}://{url.netloc.rsplit('@', 1)[-1]}"
        self.host = url.netloc.rsplit("@", 1)[-1]
        self.repository = repository


def docker_credentials(host: str) -> tuple[str, str] | None:
    """Credentials `docker login` / `oras login` left for host: a helper, or `auths`."""
    folder = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
    if helper:
        try:
            answer = subprocess.run([f"docker-credential-{helper}", "get"], input=host.encode(),
                                    capture_output=True, timeout=30)
            if answer.returncode == 0:
                found = json.loads(answer.stdout)
                return found.get("Username", ""), found.get("Secret", "")
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    for key in (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/"):
        entry = (config.get("auths") or {}).get(key)
        if isinstance(entry, dict) and entry.get("auth"):
            try:
                user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return user, secret
    return None


def oci_credentials(where: OciLocation, options: StoreOptions) -> tuple[str, str] | None:
    user, secret = os.environ.get("DESYNC_OCI_USERNAME"), os.environ.get("DESYNC_OCI_PASSWORD")
    if secret and not user:
        raise UsageError("DESYNC_OCI_PASSWORD is set without DESYNC_OCI_USERNAME")
    if user:
        return user, secret or ""
    entry = options.oci_credentials
    if entry and entry.get("username"):
        return entry["username"], entry.get("secret", "")
    return docker_credentials(where.host)


class RegistryClient:
    """HTTP to one repository of a registry: auth challenges, retries, error translation."""

    def __init__(self, location: str, options: StoreOptions):
        self.where = OciLocation(location)
        self.options = options
        self.credentials = oci_credentials(self.where, options)
        kw: dict[str, Any] = {"maxsize": max(10, options.concurrency), "retries": False, "block": False}
        if options.timeout and options.timeout != float("inf"):
            kw["timeout"] = urllib3.Timeout(total=options.timeout)
        if options.trust_insecure:
            kw["cert_reqs"] = "CERT_NONE"
        elif options.ca_cert:
            kw["ca_certs"] = options.ca_cert
        if options.client_cert:
            kw["cert_file"], kw["key_file"] = options.client_cert, options.client_key
        self.pool = urllib3.PoolManager(**kw)
        self._tokens: dict[str, str] = {}  # per scope ("pull", "push"): the Authorization value
        self._renewing = {"pull": threading.Lock(), "push": threading.Lock()}

    def url(self, path: str) -> str:
        return f"{self.where.base}/v2/{self.where.repository}/{path}"

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, redirect: bool = True) -> Response:
        """One call with retries on transport errors, 408, 429 and 5xx, answering auth challenges.
        Bodies are read whole, up to the largest chunk blob (a longer one is an error)."""
        attempts = 1 + max(0, self.options.error_retry)
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep((attempt + 1) * self.options.error_retry_base)
            try:
                response = self._authorised(method, url, body, headers or {}, redirect)
            except Urllib3Error as e:
                last = e
                continue
            if response.status in RETRY_STATUS and attempt + 1 < attempts:
                continue
            return response
        raise StoreError(f"{method} {url}: {getattr(last, 'reason', None) or last}")

    def _fetch(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
               redirect: bool, limit: int = MAX_ENCODED_CHUNK) -> Response:
        answer = self.pool.request(method, url, body=body, headers=headers, redirect=redirect,
                                   preload_content=False)
        try:
            return Response(answer.status, answer.headers, read_capped(answer, limit))  # type: ignore[arg-type]  # (urllib3's headers are a mapping as Response wants)
        except TooLarge as e:
            raise StoreError(f"{method} {url}: {e}") from None

    def _authorised(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
                    redirect: bool) -> Response:
        scope_key = self._scope_key(method)
        auth = self._tokens.get(scope_key)
        headers = {"User-Agent": "pydesync", **headers}
        for _ in range(TOKEN_TRIES):  # (a token may have expired by the time it is used: ask again)
            sent = {**headers, **({"Authorization": auth} if auth else {})}
            response = self._fetch(method, url, body, sent, redirect)
            if response.status != 401:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            with self._renewing[scope_key]:  # one thread asks for a token; the others take it
                current = self._tokens.get(scope_key)
                if current is None or current == auth:  # (none yet, or the one just refused)
                    current = self._answer(challenge, scope_key)
                    if current is None:
                        return response
                    self._tokens[scope_key] = current
            auth = current
        return self._fetch(method, url, body, {**headers, "Authorization": auth or ""}, redirect)

    @staticmethod
    def _scope_key(method: str) -> str:
        return "pull" if method in ("GET", "HEAD") else "push"

    def _answer(self, challenge: str, scope_key: str) -> str | None:
        """The Authorization value for a 401 challenge, or None (then the 401 stands)."""
        kind = challenge.split(" ", 1)[0].lower()
        if kind == "basic":
            if self.credentials is None:
                return None
            return self._basic()
        if kind != "bearer":
            return None
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm")
        if not realm:
            return None
        scope = params.get("scope") or f"repository:{self.where.repository}:" + (
            "pull" if scope_key == "pull" else "pull,push,delete")
        query = "&".join(f"{k}={quote(v)}" for k, v in (("service", params.get("service")), ("scope", scope))
                         if v)
        headers = {}
        if self.credentials is not None:
            headers["Authorization"] = self._basic()
        try:
            answer = self._fetch("GET", realm + ("&" if "?" in realm else "?") + query, None, headers, True,
                                 limit=MAX_TOKEN_ANSWER)
        except Urllib3Error as e:
            raise StoreError(f"cannot get a registry token from {realm}: {e}") from None
        if answer.status != 200:
            return None
        try:
            data = json.loads(answer.data)
        except ValueError:
            return None
        token = data.get("token") or data.get("access_token")
        return f"Bearer {token}" if token else None

    def _basic(self) -> str:
        assert self.credentials is not None
        return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()

    def fail(self, what: str, response: Response) -> StoreError:
        """A clear error for an unexpected answer."""
        if response.status in (401, 403):
            return StoreError(f"{what}: access denied by {self.where.host} ({response.status}): check the "
                              "credentials (DESYNC_OCI_USERNAME/PASSWORD, oci-credentials, docker login)")
        text = response.data[:300].decode("utf-8", "replace").strip()
        return StoreError(f"{what}: unexpected status {response.status} from {self.where.host}"
                          + (f": {text}" if text else ""))

    def close(self) -> None:
        self.pool.clear()


class OciStore(FormattedStore):
    """A chunk store in an OCI registry repository."""

    remote = True
    listable = True

    def __init__(self, location: str, options: StoreOptions | None = None):
        super().__init__(location, options)
        self.client = RegistryClient(location, self.options)
        self._config_pushed = False
        self._config_lock = threading.Lock()
        # The registry refuses (or loses) a blob uploaded twice at once: writers of one chunk in
        # this process take turns (striped by id: different chunks rarely wait on each other).
        self._chunk_locks = [threading.Lock() for _ in range(64)]
        self._tag = re.compile("^([0-9a-f]{64})" + re.escape(self._suffix) + "$")

    def tag(self, chunk_id: ChunkId) -> str:
        return f"{chunk_id.hex()}{self._suffix}"

    # ---- reading -------------------------------------------------------------------------------
    def _ask_manifest(self, method: str, tag: str) -> Response | None:
        """GET or HEAD of the manifest tagged `tag`; None if there is no such tag."""
        response = self.client.request(method, self.client.url(f"manifests/{tag}"),
                                       headers={"Accept": MANIFEST_TYPE})
        if response.status == 404:
            return None
        if response.status != 200:
            raise self.client.fail(f"manifest {tag}", response)
        return response

    def _manifest(self, tag: str) -> tuple[dict[str, Any], str] | None:
        """The manifest tagged `tag` and its digest, or None if there is no such tag."""
        response = self._ask_manifest("GET", tag)
        if response is None:
            return None
        try:
            manifest = json.loads(response.data)
        except ValueError:
            raise StoreError(f"manifest {tag} in {self.location} is not JSON") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"manifest {tag} in {self.location} is not an object")
        digest = response.headers.get("Docker-Content-Digest") or \
            "sha256:" + hashlib.sha256(response.data).hexdigest()
        return manifest, digest

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        tag = self.tag(chunk_id)
        found = self._manifest(tag)
        if found is None:
            raise ChunkMissing(chunk_id, [self.location])
        layers = found[0].get("layers")
        if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
            raise StoreError(f"chunk {tag} in {self.location}: manifest does not have exactly one layer")
        layer = layers[0]
        size, blob_digest = layer.get("size"), layer.get("digest")
        if not isinstance(size, int) or not 0 <= size <= MAX_BLOB or not isinstance(blob_digest, str) \
                or not re.match(r"^sha256:[0-9a-f]{64}$", blob_digest):
            raise StoreError(f"chunk {tag} in {self.location}: invalid layer in its manifest")
        response = self.client.request("GET", self.client.url(f"blobs/{blob_digest}"))
        if response.status == 404:
            raise ChunkMissing(chunk_id, [self.location])
        if response.status != 200:
            raise self.client.fail(f"chunk {tag}", response)
        body = response.data
        where = f"{self.location} ({tag})"
        if len(body) != size or "sha256:" + hashlib.sha256(body).hexdigest() != blob_digest:
            raise StoreError(f"chunk {tag} in {self.location}: blob does not match its manifest")
        return self.checked(chunk_id, body, self.converters, where, digest)

    def has(self, chunk_id: ChunkId) -> bool:
        return self._ask_manifest("HEAD", self.tag(chunk_id)) is not None

    # ---- writing -------------------------------------------------------------------------------
    @property
    def writable(self) -> bool:
        return True

    def _push_blob(self, data: bytes, media: str) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = self.client.request("POST", self.client.url("blobs/uploads/"), body=b"",
                                    headers={"Content-Length": "0"})
        if start.status == 201:  # some registries take it as done already (cross-mount)
            return digest
        if start.status != 202 or not start.headers.get("Location"):
            raise self.client.fail(f"upload to {self.client.where.repository}", start)
        target = urljoin(self.client.url("blobs/uploads/"), start.headers["Location"])
        target += ("&" if "?" in target else "?") + "digest=" + quote(digest)
        done = self.client.request("PUT", target, body=data,
                                   headers={"Content-Type": "application/octet-stream"})
        if done.status not in (201, 204):
            raise self.client.fail(f"upload of {digest} ({media})", done)
        return digest

    def put_stored(self, chunk_id: ChunkId, stored: bytes | memoryview,
                   fmt: Converters | None = None) -> None:
        stored = bytes(self.in_own_format(chunk_id, stored, fmt))
        tag = self.tag(chunk_id)
        if not self._config_pushed:
            with self._config_lock:  # once: the registry refuses the same blob uploaded twice at once
                if not self._config_pushed:
                    self._push_blob(EMPTY_BLOB, EMPTY_TYPE)
                    self._config_pushed = True
        with self._chunk_locks[chunk_id[0] % len(self._chunk_locks)]:
            self._push_chunk(tag, stored)

    def _push_chunk(self, tag: str, stored: bytes) -> None:
        """The chunk's blob, then its manifest; a manifest refused because the blob is not there
        (another process uploaded the same blob at the same moment) is tried once more."""
        for attempt in (1, 2):
            blob_digest = self._push_blob(stored, "chunk")
            response = self._push_manifest(tag, blob_digest, len(stored))
            if response.status in (200, 201):
                return
            if attempt == 1 and response.status == 400 and b"BLOB_UNKNOWN" in response.data:
                continue
            raise self.client.fail(f"manifest {tag}", response)

    def _push_manifest(self, tag: str, blob_digest: str, size: int) -> Response:
        manifest = {
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": CHUNK_ARTIFACT,
            "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_BLOB)},
            "layers": [{"mediaType": "application/octet-stream", "digest": blob_digest, "size": size}],
            "annotations": {TITLE: tag},
        }
        return self.client.request("PUT", self.client.url(f"manifests/{tag}"),
                                   body=json.dumps(manifest, separators=(",", ":")).encode(),
                                   headers={"Content-Type": MANIFEST_TYPE})

    # ---- listing and pruning -------------------------------------------------------------------
    def tags(self) -> Iterator[str]:
        """Every tag of the repository, a page at a time (Link: rel=next)."""
        url: str | None = self.client.url(f"tags/list?n={TAG_PAGE}")
        while url:
            response = self.client.request("GET", url)
            if response.status == 404:
                return  # no repository yet: nothing in it
            if response.status != 200:
                raise self.client.fail("tag listing", response)
            try:
                tags = json.loads(response.data).get("tags") or []
            except (ValueError, AttributeError):
                raise StoreError(f"tag listing of {self.location} is not valid JSON") from None
            yield from tags
            link = _NEXT_LINK.search(response.headers.get("Link", ""))
            url = urljoin(self.client.where.base, link.group(1)) if link else None

    def ids(self) -> Iterator[ChunkId]:
        for tag in self.tags():
            match = self._tag.match(tag)
            if match:
                yield ChunkId(match.group(1))

    def remove(self, chunk_id: ChunkId) -> None:
        """Delete the chunk's manifest, if it is one of ours (artifact type), by digest."""
        tag = self.tag(chunk_id)
        found = self._manifest(tag)
        if found is None or found[0].get("artifactType") != CHUNK_ARTIFACT:
            return
        response = self.client.request("DELETE", self.client.url(f"manifests/{found[1]}"))
        if response.status == 405:
            raise StoreError(f"{self.client.where.host} does not allow deleting manifests (the distribution "
                             "registry needs REGISTRY_STORAGE_DELETE_ENABLED=true)")
        if response.status not in (200, 202, 404):
            raise self.client.fail(f"delete of {tag}", response)

    def close(self) -> None:
        self.client.close()


KIND = StoreKind("oci", lambda location, options, _create: OciStore(location, options))
