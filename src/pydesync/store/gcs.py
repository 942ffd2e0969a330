"""Google Cloud Storage on Google's own API: `gs://bucket[/prefix]`, as desync's GCS store.

Chunks live at `<prefix><4 hex>/<id><extension>` (the layout of local and S3 stores). The client
is google-cloud-storage (the `gcs` extra), which signs in the way Google's tools do:

1. Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS naming a service account
   key file, `gcloud auth application-default login`, or the metadata server of a VM or pod
   (workload identity);
2. none found: anonymous requests (public buckets).

HMAC keys (Google's S3-compatible XML API) remain for those who use them: with S3_ACCESS_KEY /
S3_SECRET_KEY set, or an `s3-credentials` entry for https://storage.googleapis.com in the config,
a `gs://` location is an S3 store on that API (store/s3.py). STORAGE_EMULATOR_HOST points the
client at an emulator (fake-gcs-server), as it does for every Google client.

Reads are bounded (a range request: an object larger than any chunk is refused after at most
that much), requests run `-n` at once on one client (its connection pool sized to match), and
the library retries what Google calls transient, with backoff; uploads are retried too, since
writing a chunk twice writes the same bytes.

A chunk's GET, existence check and upload go first straight on urllib3 (DirectRequests: the
JSON API's media URLs with the library's own bearer token), as the S3 store does: the library's
per-request machinery costs more than the request itself. An answer that path does not fully
understand is asked again through the library, whose errors and retries then apply.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import urllib3

from ..codec import MAX_ENCODED_CHUNK
from ..digest import ChunkId
from ..errors import ChunkMissing, StoreError, UsageError
from ..index import MAX_INDEX_BYTES
from .base import FormattedStore, Store
from .converters import Converters
from .options import StoreOptions
from .registry import StoreKind

T = TypeVar("T")
CONTENT_TYPE = "application/octet-stream"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
_HEX = frozenset("0123456789abcdef")


def _library() -> Any:
    try:
        from google.cloud import storage
    except ImportError:
        raise StoreError("gs:// stores need google-cloud-storage: pip install 'pydesync[gcs]' "
                         "(or HMAC keys in S3_ACCESS_KEY/S3_SECRET_KEY for Google's S3 API)") from None
    return storage


def parse_location(location: str) -> tuple[str, str]:
    """(bucket, prefix ending in '/' or empty) of `gs://bucket[/prefix]`."""
    url = urlsplit(location)
    if url.scheme.lower() != "gs" or not url.netloc:
        raise UsageError(f"not a gs:// location: {location}")
    prefix = url.path.strip("/")
    return url.netloc, prefix + "/" if prefix else ""


class DirectRequests:
    """Chunk requests on urllib3 with the client's credentials: a 200/206/404 (or a 200 upload) is
    the answer; connection errors and 429/5xx are retried (`error-retry` times, with backoff);
    anything else (None) is for the library to do again, and say."""

    def __init__(self, client: Any, options: StoreOptions):
        from .http import make_pool

        self._credentials = getattr(client, "_credentials", None)  # (google-cloud-storage's client)
        self._anonymous = type(self._credentials).__name__ == "AnonymousCredentials"
        self._base = (os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com").rstrip("/")
        if "://" not in self._base:
            self._base = "http://" + self._base
        self.pool = make_pool(options)
        self._attempts = 1 + max(0, options.error_retry)
        self._retry_base = options.error_retry_base
        self._lock = threading.Lock()

    def _headers(self) -> dict[str, str] | None:
        """The Authorization header (refreshed when the token has expired); None if that fails."""
        if self._credentials is None or self._anonymous:
            return {}
        if not self._credentials.valid:
            import google.auth.transport.requests
            from google.auth.exceptions import GoogleAuthError

            with self._lock:
                if not self._credentials.valid:
                    try:
                        self._credentials.refresh(google.auth.transport.requests.Request())
                    except GoogleAuthError:
                        return None  # (the library will try, and say why it cannot)
        return {"Authorization": f"Bearer {self._credentials.token}"}

    def _send(self, method: str, url: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, limit: int = 0) -> tuple[int, bytes] | None:
        for attempt in range(1, self._attempts + 1):
            auth = self._headers()
            if auth is None:
                return None
            try:
                answer = self.pool.request(method, url, body=body, headers={**auth, **(headers or {})},
                                           preload_content=False, redirect=False)
            except (urllib3.exceptions.HTTPError, OSError):
                answer = None
            if answer is not None:
                try:
                    if answer.status not in (429, 500, 502, 503, 504):
                        if answer.status not in (200, 206, 404):
                            return None
                        data = answer.read(limit + 1) if limit else b""
                        return answer.status, data
                finally:
                    answer.drain_conn()  # (what is left is small: a range's end, an upload's JSON)
                    answer.release_conn()
            if attempt < self._attempts:
                time.sleep(attempt * self._retry_base)
        return None

    def _object(self, bucket: str, key: str) -> str:
        return f"{self._base}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}"

    def get(self, bucket: str, key: str, limit: int) -> bytes | Literal[False] | None:
        """The object's first limit+1 bytes at most; None if absent; False: ask the library."""
        done = self._send("GET", self._object(bucket, key) + "?alt=media",
                          headers={"Range": f"bytes=0-{limit}"}, limit=limit)
        if done is None:
            return False
        return None if done[0] == 404 else done[1]

    def exists(self, bucket: str, key: str) -> bool | None:
        done = self._send("GET", self._object(bucket, key).replace("/download/", "/", 1) + "?fields=name")
        return None if done is None else done[0] == 200

    def put(self, bucket: str, key: str, data: bytes) -> bool:
        """Whether the object was stored (False: ask the library)."""
        url = (f"{self._base}/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=media"
               f"&name={quote(key, safe='')}")
        done = self._send("POST", url, data, {"Content-Type": CONTENT_TYPE})
        return done is not None and done[0] == 200


_clients: dict[tuple[int, str | None, str | None], Any] = {}
_clients_lock = threading.Lock()


def client_for(options: StoreOptions) -> Any:
    """A client with Application Default Credentials (anonymous if there are none), its pool sized
    to `-n`; shared by the stores of a process that see the same settings."""
    key = (options.concurrency, os.environ.get("STORAGE_EMULATOR_HOST"),
           os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _new_client(options.concurrency)
        return client


def _new_client(concurrency: int) -> Any:
    storage = _library()
    import google.auth
    import google.auth.transport.requests
    import requests.adapters
    from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError

    try:
        credentials, project = google.auth.default(scopes=[SCOPE])
    except DefaultCredentialsError:
        client = storage.Client.create_anonymous_client()
    else:
        try:  # one token now, before -n threads each see none and ask for their own
            credentials.refresh(google.auth.transport.requests.Request())
        except GoogleAuthError as e:
            raise StoreError(f"cannot authenticate to Google Cloud Storage: {e}") from None
        client = storage.Client(project=project or "pydesync", credentials=credentials)
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(10, concurrency))
    client._http.mount("https://", adapter)  # (the library's own session; more connections)
    client._http.mount("http://", adapter)
    return client


class GcsStore(FormattedStore):
    """A chunk store in a GCS bucket (read, write, prune, verify, list)."""

    remote = True
    listable = True

    def __init__(self, location: str, options: StoreOptions | None = None):
        super().__init__(location, options)
        self.bucket_name, self.prefix = parse_location(location)
        client = client_for(self.options)
        self._bucket = client.bucket(self.bucket_name)
        self._timeout = self.options.timeout or None
        self.direct = DirectRequests(client, self.options)

    def key(self, chunk_id: ChunkId) -> str:
        h = chunk_id.hex()
        return f"{self.prefix}{h[:4]}/{h}{self._suffix}"

    def _call(self, what: str, fn: Callable[[], T], absent_ok: bool = False) -> T:
        """fn(), its failures as one clear error; with absent_ok a NotFound is the caller's."""
        from google.api_core import exceptions as api
        from google.auth import exceptions as auth

        try:
            return fn()
        except api.NotFound as e:
            if absent_ok:
                raise
            raise StoreError(f"{self.location}: {what}: not found (is there a bucket {self.bucket_name}?): "
                             f"{e.message}") from None
        except (api.Unauthorized, api.Forbidden) as e:
            raise StoreError(f"{self.location}: {what}: access denied ({e.message})") from None
        except api.GoogleAPIError as e:
            raise StoreError(f"{self.location}: {what}: {e}") from None
        except auth.GoogleAuthError as e:
            raise StoreError(f"{self.location}: cannot authenticate: {e}") from None
        except OSError as e:
            raise StoreError(f"{self.location}: {what}: {e}") from None

    def _read(self, key: str, limit: int) -> bytes | None:
        """The object's bytes (None if absent); longer than `limit` is an error, read no further."""
        from google.api_core.exceptions import NotFound

        found = self.direct.get(self.bucket_name, key, limit)
        if found is None:
            return None
        if found is not False:
            data = found
            if len(data) > limit:
                raise StoreError(f"{self.location}: {key} is larger than {limit} bytes")
            return data
        blob = self._bucket.blob(key)
        try:
            data = self._call(f"GET {key}", lambda: blob.download_as_bytes(
                start=0, end=limit, checksum=None, timeout=self._timeout), absent_ok=True)
        except NotFound:
            return None
        if len(data) > limit:
            raise StoreError(f"{self.location}: {key} is larger than {limit} bytes")
        return bytes(data)

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        key = self.key(chunk_id)
        stored = self._read(key, MAX_ENCODED_CHUNK)
        if stored is None:
            raise ChunkMissing(chunk_id, [self.location])
        return self.checked(chunk_id, stored, self.converters, f"gs://{self.bucket_name}/{key}", digest)

    def get_stored(self, chunk_id: ChunkId) -> tuple[bytes, Converters]:
        stored = self._read(self.key(chunk_id), MAX_ENCODED_CHUNK)
        if stored is None:
            raise ChunkMissing(chunk_id, [self.location])
        return stored, self.converters

    def has(self, chunk_id: ChunkId) -> bool:
        key = self.key(chunk_id)
        found = self.direct.exists(self.bucket_name, key)
        if found is not None:
            return found
        blob = self._bucket.blob(key)
        return bool(self._call(f"HEAD {key}", lambda: blob.exists(timeout=self._timeout)))

    @property
    def writable(self) -> bool:
        return True

    def put_stored(self, chunk_id: ChunkId, stored: bytes | memoryview,
                   fmt: Converters | None = None) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        key = self.key(chunk_id)
        body = bytes(self.in_own_format(chunk_id, stored, fmt))
        if self.direct.put(self.bucket_name, key, body):
            return
        blob = self._bucket.blob(key)
        self._call(f"PUT {key}", lambda: blob.upload_from_string(
            body, content_type=CONTENT_TYPE, retry=DEFAULT_RETRY, timeout=self._timeout))

    def remove(self, chunk_id: ChunkId) -> None:
        from google.api_core.exceptions import NotFound

        key = self.key(chunk_id)
        blob = self._bucket.blob(key)
        with contextlib.suppress(NotFound):  # (gone already: what remove wants)
            self._call(f"DELETE {key}", lambda: blob.delete(timeout=self._timeout), absent_ok=True)

    def ids(self) -> Iterator[ChunkId]:
        """Chunk ids in the store, streamed page by page; other objects are ignored."""
        pages = self._call("list", lambda: self._bucket.client.list_blobs(
            self.bucket_name, prefix=self.prefix, page_size=1000, timeout=self._timeout))
        names = iter(pages)
        while True:
            blob = self._call("list", lambda: next(names, None))
            if blob is None:
                return
            chunk_id = self._id_of(blob.name[len(self.prefix):])
            if chunk_id is not None:
                yield chunk_id

    def _id_of(self, name: str) -> ChunkId | None:
        folder, _, file = name.partition("/")
        hexid = file[: len(file) - len(self._suffix)] if self._suffix else file
        if not file.endswith(self._suffix) or len(hexid) != 64 or not _HEX.issuperset(hexid) \
                or folder != hexid[:4]:
            return None
        return ChunkId(hexid)


def _index_store(location: str, options: StoreOptions | None) -> tuple[GcsStore, str]:
    base, _, name = location.rpartition("/")
    return GcsStore(base + "/", options), name


def read_index_bytes(location: str, options: StoreOptions | None = None) -> bytes | None:
    """An index file in a bucket (`gs://bucket/prefix/name.caibx`)."""
    store, name = _index_store(location, options)
    return store._read(store.prefix + name, MAX_INDEX_BYTES)


def write_index_bytes(location: str, data: bytes, options: StoreOptions | None = None) -> None:
    store, name = _index_store(location, options)
    blob = store._bucket.blob(store.prefix + name)
    store._call(f"PUT {name}", lambda: blob.upload_from_string(data, content_type=CONTENT_TYPE,
                                                                timeout=store._timeout))


def uses_hmac(options: StoreOptions | None) -> bool:
    """Whether a gs:// location goes to Google's S3-compatible API with HMAC keys (configured for
    it), rather than to Google's own API."""
    return bool(os.environ.get("S3_ACCESS_KEY") or (options is not None and options.s3_credentials))


def _open(location: str, options: StoreOptions | None, _create: bool) -> Store:
    if uses_hmac(options):
        from .s3 import KIND as S3

        return S3.open(location, options, _create)
    return GcsStore(location, options)


def _read_index(location: str, options: StoreOptions | None) -> bytes | None:
    if uses_hmac(options):
        from .s3 import read_index_bytes as read_s3

        return read_s3(location, options)
    return read_index_bytes(location, options)


def _write_index(location: str, data: bytes, options: StoreOptions | None) -> None:
    if uses_hmac(options):
        from .s3 import write_index_bytes as write_s3

        write_s3(location, data, options)
        return
    write_index_bytes(location, data, options)


KIND = StoreKind("gs", _open, _read_index, _write_index)
