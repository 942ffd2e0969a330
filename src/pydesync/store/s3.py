"""S3-compatible object stores: `s3+http(s)://host[:port]/bucket[/prefix]` (AWS, MinIO, Ceph RGW, R2,
Google Cloud Storage's XML API).

Chunks live at `<prefix><4 hex>/<id><extension>`, the layout of local stores, so a
store can be copied between the two with any sync tool. The client is boto3
(the `s3` extra): it signs requests, pools connections (sized to `-n`), and
retries throttling (503 SlowDown) and 5xx answers with backoff in its
"standard" mode. On top of that, a body that fails to decode or to verify (a
short read) is fetched again, up to `error-retry` more times, as desync does.
A chunk's GET, HEAD or PUT goes first without botocore's per-request machinery
(DirectRequests: its signer, urllib3's pool); whatever that path does not fully
understand is sent again through the client, so errors and retries are boto3's.

Credentials, first that applies (desync's order, then the AWS chain):
1. S3_ACCESS_KEY / S3_SECRET_KEY (/ S3_SESSION_TOKEN, S3_REGION);
2. the config file's `s3-credentials` entry for `http(s)://host[:port]`: `access-key` and
   `secret-key`, or `aws-credentials-file` with `aws-profile`; `aws-region`;
3. the standard AWS chain (AWS_ACCESS_KEY_ID..., ~/.aws/credentials and AWS_PROFILE,
   instance and container roles);
4. none: anonymous, unsigned requests (public buckets).

`?lookup=dns|path|auto` picks virtual-host or path addressing (auto: virtual-host on
amazonaws.com, path elsewhere, which is what MinIO and Ceph expect). `?region=` and
S3_REGION set the signing region (default us-east-1).
"""

from __future__ import annotations

import configparser
import functools
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import urllib3

from ..codec import MAX_ENCODED_CHUNK, CodecError
from ..digest import ChunkId
from ..errors import ChunkInvalid, ChunkMissing, StoreError, UsageError
from ..index import MAX_INDEX_BYTES
from .base import FormattedStore, Store, close_at_exit
from .converters import Converters
from .options import StoreOptions
from .registry import StoreKind

T = TypeVar("T")
CONTENT_TYPE = "application/zstd"  # what desync sets on every chunk, whatever its encoding
_PREFIX = re.compile(r"^[0-9a-f]{4}$")
_CHUNK_ID = re.compile(r"^[0-9a-f]{64}$")
MISSING_KEY = ("NoSuchKey", "404", "NotFound")
DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")


def _boto() -> tuple[Any, Any, Any]:
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise StoreError("s3+http(s):// stores need boto3: pip install 'pydesync[s3]'") from None
    return boto3, botocore.config, botocore.exceptions


class S3Location:
    """A parsed `s3+http(s)://host[:port]/bucket/prefix?lookup=...` location."""

    def __init__(self, location: str):
        url = urlsplit(location)
        scheme = url.scheme.lower()
        if scheme not in ("s3+http", "s3+https"):
            raise UsageError(f"not an s3 location: {location}")
        try:
            url.port  # noqa: B018 - validates the port
        except ValueError:
            raise UsageError(f"invalid port in {location}") from None
        if not url.hostname:
            raise UsageError(f"no host in s3 location {location}")
        parts = [p for p in url.path.split("/") if p]
        if not parts:
            raise UsageError(f"no bucket in s3 location {location} (s3+https://host/bucket/prefix)")
        self.scheme = scheme[len("s3+"):]
        self.netloc = url.netloc.rsplit("@", 1)[-1]
        self.endpoint = f"{self.scheme}://{self.netloc}"
        self.host = url.hostname
        self.bucket = parts[0]
        self.prefix = "".join(p + "/" for p in parts[1:])
        query = parse_qs(url.query)
        self.lookup = (query.get("lookup") or ["auto"])[0]
        if self.lookup not in ("auto", "dns", "path"):
            raise UsageError(f"invalid lookup '{self.lookup}' in {location} (auto, dns or path)")
        regions = query.get("region")
        self.region = regions[0] if regions else None

    @property
    def addressing(self) -> str:
        if self.lookup == "dns":
            return "virtual"
        if self.lookup == "path":
            return "path"
        return "virtual" if self.host.endswith(".amazonaws.com") else "path"


GCS_ENDPOINT = "storage.googleapis.com"


def gcs_location(location: str) -> str:
    """`gs://bucket/prefix` as the S3 location of Google Cloud Storage's XML API (HMAC keys as
    S3_ACCESS_KEY / S3_SECRET_KEY, or an `s3-credentials` entry for https://storage.googleapis.com)."""
    rest = location.partition("://")[2]
    return f"s3+https://{GCS_ENDPOINT}/{rest}" + ("" if "lookup=" in rest else
                                                  ("&" if "?" in rest else "?") + "lookup=path")


def s3_credentials_key(location: str) -> str:
    """The `s3-credentials` config key for a location: `http(s)://host[:port]`, matched exactly."""
    if location.lower().startswith("gs://"):
        location = gcs_location(location)
    return S3Location(location).endpoint


def _credentials(options: StoreOptions) -> dict[str, str]:
    """Explicit credentials (environment, then config entry); empty = let boto3's chain decide."""
    env = os.environ
    if env.get("S3_ACCESS_KEY") or env.get("S3_SECRET_KEY"):
        found = {"aws_access_key_id": env.get("S3_ACCESS_KEY", ""),
                 "aws_secret_access_key": env.get("S3_SECRET_KEY", "")}
        if env.get("S3_SESSION_TOKEN"):
            found["aws_session_token"] = env["S3_SESSION_TOKEN"]
        return found
    entry = options.s3_credentials or {}
    if entry.get("access-key"):
        return {"aws_access_key_id": entry["access-key"],
                "aws_secret_access_key": entry.get("secret-key", "")}
    if entry.get("aws-credentials-file"):
        return _from_credentials_file(entry["aws-credentials-file"],
                                      entry.get("aws-profile") or env.get("AWS_PROFILE") or "default")
    return {}


def _from_credentials_file(path: str, profile: str) -> dict[str, str]:
    parser = configparser.ConfigParser()
    try:
        with open(os.path.expanduser(path)) as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as e:
        raise UsageError(f"cannot read aws-credentials-file {path}: {e}") from None
    if not parser.has_section(profile):
        raise UsageError(f"profile '{profile}' not found in {path}")
    section = parser[profile]
    found = {"aws_access_key_id": section.get("aws_access_key_id", ""),
             "aws_secret_access_key": section.get("aws_secret_access_key", "")}
    if section.get("aws_session_token"):
        found["aws_session_token"] = section["aws_session_token"]
    return found


_AWS_REGION = re.compile(r"(?:^|\.)s3[.-](?:dualstack\.)?([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com$")


def region_of_host(host: str) -> str | None:
    """The AWS region an endpoint names (`s3.eu-west-1.amazonaws.com`, `s3-us-west-2...`), if any."""
    match = _AWS_REGION.search(host)
    return match.group(1) if match else None


def make_client(where: S3Location, options: StoreOptions) -> tuple[Any, Any, str]:
    """A boto3 S3 client for the location (credentials, region, addressing, TLS, pool, retries),
    with its session's credentials (None: anonymous) and its signing region."""
    boto3, config_mod, _ = _boto()
    import botocore

    credentials = _credentials(options)
    entry = options.s3_credentials or {}
    region = where.region or os.environ.get("S3_REGION") or entry.get("aws-region") \
        or region_of_host(where.host) or "us-east-1"
    session = boto3.session.Session(**credentials)
    anonymous = not credentials and session.get_credentials() is None
    timeout = options.timeout if options.timeout and options.timeout != float("inf") else None
    config = config_mod.Config(
        region_name=region,
        signature_version=botocore.UNSIGNED if anonymous else "s3v4",
        s3={"addressing_style": where.addressing},
        retries={"mode": "standard", "total_max_attempts": max(1, options.error_retry) + 1},
        max_pool_connections=max(10, options.concurrency),
        connect_timeout=timeout or 60, read_timeout=timeout or 60,
        user_agent_extra="pydesync",
    )
    verify: bool | str = True
    if options.trust_insecure:
        verify = False
    elif options.ca_cert:
        verify = options.ca_cert
    client = session.client("s3", endpoint_url=where.endpoint, config=config, verify=verify)
    return client, None if anonymous else session.get_credentials(), region


class DirectRequests:
    """GET, HEAD and PUT of single objects, signed by botocore's SigV4 signer and sent over a
    urllib3 pool, past botocore's per-request machinery (events, serializers, parsers, retry
    handlers), which cost about 2 ms of CPU per chunk, twice desync's whole request.

    Only the answers it fully understands come back: 200 (and 204 for a PUT), and 404 for a
    HEAD or for a GET whose error is NoSuchKey. Anything else (errors, redirects, throttling, a
    dropped connection) is None, and the caller sends the request again through the boto3
    client, whose retries and error parsing decide: so errors read exactly as they did."""

    def __init__(self, where: S3Location, options: StoreOptions, credentials: Any, region: str):
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        from .http import make_pool, proxy_for

        self.where = where
        self._credentials = credentials
        self._signer = S3SigV4Auth
        self._request = AWSRequest
        self._region = region
        self.pool = make_pool(options.override(concurrency=max(10, options.concurrency)))
        if where.addressing == "virtual":
            self._base = f"{where.scheme}://{where.bucket}.{where.netloc}/"
        else:
            self._base = f"{where.endpoint}/{quote(where.bucket, safe='')}/"
        self.fallbacks = 0  # requests handed back to boto3 (tests check that none are)
        self._attempts = max(1, options.error_retry)
        self.disabled = False
        self._retry_base = options.error_retry_base
        self.through_proxy = proxy_for(self._base) is not None

    def _send(self, method: str, key: str, body: bytes | None = None, content_type: str | None = None,
              limit: int = MAX_ENCODED_CHUNK) -> tuple[int, bytes] | None:
        """(status, body) of a 200, 204 or 404; None to ask boto3. Throttling, 5xx answers and
        dropped connections are retried first, as desync retries (`error-retry` attempts, the
        n-th waiting n times `error-retry-base`)."""
        if self.disabled:
            return None
        url = self._base + quote(key, safe="/~")
        for attempt in range(1, self._attempts + 1):
            answer = self._attempt(method, url, body, content_type, limit)
            if not isinstance(answer, str):  # (the one string is "retry")
                return answer
            if attempt < self._attempts:
                time.sleep(attempt * self._retry_base)
        self._fallback()
        return None

    def _attempt(self, method: str, url: str, body: bytes | None, content_type: str | None,
                 limit: int) -> tuple[int, bytes] | str | None:
        headers = {"Content-Type": content_type} if content_type else {}
        if self._credentials is not None:
            request = self._request(method=method, url=url, data=body or b"", headers=headers)
            self._signer(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
            headers = dict(request.headers.items())
        try:
            answer = self.pool.request(method, url, body=body, headers=headers, preload_content=False,
                                       redirect=False)
        except urllib3.exceptions.SSLError:
            self._give_up()  # (a certificate that only boto3's addressing matches)
            return None
        except (urllib3.exceptions.HTTPError, OSError):
            return "retry"
        try:
            declared = int(answer.headers.get("Content-Length") or 0)
            if answer.status >= 500:
                answer.drain_conn()
                return "retry"
            if answer.status < 200 or 300 <= answer.status < 404 or answer.status > 404:
                self._give_up(answer)  # redirects (another region), refusals: boto3's to handle
                return None
            if declared > limit or answer.status not in (200, 204, 404):
                self._fallback(answer)
                return None
            data = b"" if method == "HEAD" else answer.read(limit + 1)
            if len(data) > limit or (method != "HEAD" and answer.status == 200 and len(data) != declared):
                return "retry"  # a body cut short
            return answer.status, data
        except (urllib3.exceptions.HTTPError, OSError):
            return "retry"
        finally:
            answer.release_conn()

    def _give_up(self, answer: urllib3.BaseHTTPResponse | None = None) -> None:
        """An answer that says this bucket wants what only boto3 does (its region, its addressing):
        every later request goes to boto3 too, rather than paying for a useless first try."""
        self.disabled = True
        self._fallback(answer)
        return None

    def _fallback(self, answer: urllib3.BaseHTTPResponse | None = None) -> None:
        if answer is not None:
            answer.drain_conn()
        self.fallbacks += 1
        return None

    def get(self, key: str, limit: int) -> bytes | Literal[False] | None:
        """The body; None for a missing key; False to ask boto3."""
        done = self._send("GET", key, limit=limit)
        if done is None:
            return False
        status, data = done
        if status == 200:
            return data
        if status == 404 and b"<Code>NoSuchKey</Code>" in data:
            return None
        self.fallbacks += 1  # another 404 (no such bucket): boto3 words it
        return False

    def head(self, key: str) -> bool | None:
        """Whether the key exists; None to ask boto3."""
        done = self._send("HEAD", key)
        return None if done is None else done[0] == 200

    def put(self, key: str, data: bytes, content_type: str) -> bool:
        """Whether the object was stored (False: ask boto3)."""
        done = self._send("PUT", key, data, content_type)
        return done is not None and done[0] in (200, 204)

    def close(self) -> None:
        self.pool.clear()


class TransientRead(StoreError):
    """A body that ended early or broke off: worth another attempt."""


class S3Objects:
    """Object operations with error translation: the part shared by chunk and index stores."""

    def __init__(self, location: str, options: StoreOptions):
        self.where = S3Location(location)
        self.options = options
        self.client, credentials, region = make_client(self.where, options)
        self._errors = _boto()[2]
        self.direct: DirectRequests | None = DirectRequests(self.where, options, credentials, region)
        if self.direct.through_proxy:  # boto3 knows the environment's proxies; they are not for speed
            self.direct.close()
            self.direct = None

    def describe(self, e: Exception, key: str) -> str:
        """A one-line reason for a failed call on `key`."""
        if isinstance(e, self._errors.ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return f"bucket '{self.where.bucket}' does not exist at {self.where.endpoint}"
            if code in DENIED or status == 403:
                return (f"access denied to s3://{self.where.bucket}/{key} at {self.where.endpoint} "
                        f"({code or status}): check the credentials")
            message = e.response.get("Error", {}).get("Message", "")
            return f"s3://{self.where.bucket}/{key}: {code or status} {message}".strip()
        if isinstance(e, self._errors.NoCredentialsError):
            return "no S3 credentials"
        return f"s3://{self.where.bucket}/{key} at {self.where.endpoint}: {e}"

    def is_missing(self, e: Exception) -> bool:
        if not isinstance(e, self._errors.ClientError):
            return False
        error = e.response.get("Error", {})
        return error.get("Code") in MISSING_KEY

    def call(self, key: str, op: Callable[[], T]) -> T:
        """Run op, turning client failures into StoreError (missing keys are the caller's to check)."""
        try:
            return op()
        except (self._errors.BotoCoreError, self._errors.ClientError) as e:
            if self.is_missing(e):
                raise
            raise StoreError(self.describe(e, key)) from None

    def read(self, key: str, limit: int = MAX_ENCODED_CHUNK) -> bytes | None:
        """The object's bytes, None if there is no such key; a short body is an error, and so is
        one longer than `limit` (refused from its declared length, before it is read)."""
        found = self.direct.get(key, limit) if self.direct is not None else False
        if found is not False:
            return found

        def get() -> bytes:
            answer = self.client.get_object(Bucket=self.where.bucket, Key=key)
            body = answer["Body"]
            if answer.get("ContentLength", 0) > limit:
                body.close()
                raise StoreError(f"s3://{self.where.bucket}/{key}: object of {answer['ContentLength']} "
                                 f"bytes, longer than {limit} bytes")
            try:
                data = body.read()  # botocore checks the length against Content-Length
            except self._errors.BotoCoreError as e:
                raise TransientRead(f"s3://{self.where.bucket}/{key}: {e}") from None
            finally:
                body.close()
            return data
        try:
            return self.call(key, get)
        except self._errors.ClientError as e:
            if self.is_missing(e):
                return None
            raise

    def exists(self, key: str) -> bool:
        found = self.direct.head(key) if self.direct is not None else None
        if found is not None:
            return found
        try:
            self.call(key, lambda: self.client.head_object(Bucket=self.where.bucket, Key=key))
            return True
        except self._errors.ClientError as e:
            if self.is_missing(e):
                return False
            raise

    def write(self, key: str, data: bytes | memoryview, content_type: str = CONTENT_TYPE) -> None:
        if self.direct is not None and self.direct.put(key, bytes(data), content_type):
            return
        self.call(key, lambda: self.client.put_object(Bucket=self.where.bucket, Key=key, Body=bytes(data),
                                                      ContentType=content_type))

    def delete(self, key: str) -> None:
        try:
            self.call(key, lambda: self.client.delete_object(Bucket=self.where.bucket, Key=key))
        except self._errors.ClientError as e:
            if not self.is_missing(e):
                raise

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under prefix, page by page (1,000 at a time: memory stays flat)."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.where.bucket, Prefix=prefix)
        iterator = iter(pages)
        while True:
            try:
                page = self.call(prefix, lambda: next(iterator))
            except StopIteration:
                return
            for item in page.get("Contents", ()):
                yield item["Key"]

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()
        self.client.close()


class S3Store(FormattedStore):
    """A chunk store in an S3 bucket (read, write, prune, verify, list)."""

    remote = True
    listable = True

    def __init__(self, location: str, options: StoreOptions | None = None):
        super().__init__(location, options)
        self.objects = S3Objects(location, self.options)
        self.prefix = self.objects.where.prefix
        close_at_exit(self)

    def key(self, chunk_id: ChunkId) -> str:
        h = chunk_id.hex()
        return f"{self.prefix}{h[:4]}/{h}{self._suffix}"

    def get(self, chunk_id: ChunkId, digest: str | None = None) -> bytes:
        key = self.key(chunk_id)
        where = f"s3://{self.objects.where.bucket}/{key}"
        attempts = 1 + max(0, self.options.error_retry)
        for attempt in range(1, attempts + 1):
            try:
                body = self.objects.read(key)
                if body is None:
                    raise ChunkMissing(chunk_id, [self.location])
                return self.checked(chunk_id, body, self.converters, where, digest)
            except (ChunkInvalid, CodecError, TransientRead):
                if attempt == attempts:
                    raise
                time.sleep(attempt * self.options.error_retry_base)
        raise AssertionError("unreachable")

    def has(self, chunk_id: ChunkId) -> bool:
        return self.objects.exists(self.key(chunk_id))

    @property
    def writable(self) -> bool:
        return True

    def put_stored(self, chunk_id: ChunkId, stored: bytes | memoryview,
                   fmt: Converters | None = None) -> None:
        self.objects.write(self.key(chunk_id), bytes(self.in_own_format(chunk_id, stored, fmt)))

    def get_stored(self, chunk_id: ChunkId) -> tuple[bytes, Converters]:
        """The object's bytes as they are, and their format (for servers)."""
        body = self.objects.read(self.key(chunk_id))
        if body is None:
            raise ChunkMissing(chunk_id, [self.location])
        return bytes(body), self.converters

    def remove(self, chunk_id: ChunkId) -> None:
        self.objects.delete(self.key(chunk_id))

    def ids(self) -> Iterator[ChunkId]:
        """Chunk ids in the store, streamed from the listing; other keys are ignored."""
        for key in self.objects.keys(self.prefix):
            chunk_id = self._id_of(key[len(self.prefix):])
            if chunk_id is not None:
                yield chunk_id

    def _id_of(self, name: str) -> ChunkId | None:
        folder, _, file = name.partition("/")
        if not _PREFIX.match(folder) or not file.endswith(self._suffix):
            return None
        hexid = file[: len(file) - len(self._suffix)] if self._suffix else file
        if not _CHUNK_ID.match(hexid) or hexid[:4] != folder:
            return None
        return ChunkId(hexid)

    def close(self) -> None:
        self.objects.close()


def upgrade_flat_layout(store: Store, progress: Callable[[int], None] | None = None) -> int:
    """Move chunks of the old flat layout (`<prefix><id><ext>`) to `<prefix><4 hex>/<id><ext>`:
    copy, then delete the old key (a crash leaves both, and rerunning finishes). Returns the count."""
    if not isinstance(store, S3Store):
        raise UsageError(f"upgrade-s3 needs an s3+http(s):// store, not {store.location}")
    objects = store.objects
    moved = 0
    suffix = store.converters.extension
    for key in objects.keys(store.prefix):
        name = key[len(store.prefix):]
        if "/" in name or not name.endswith(suffix):
            continue
        hexid = name[: len(name) - len(suffix)] if suffix else name
        if not _CHUNK_ID.match(hexid):
            continue
        target = store.key(ChunkId(hexid))
        source = {"Bucket": objects.where.bucket, "Key": key}
        copy = functools.partial(objects.client.copy_object, Bucket=objects.where.bucket, Key=target,
                                 CopySource=source, ContentType=CONTENT_TYPE, MetadataDirective="REPLACE")
        objects.call(key, copy)
        objects.delete(key)
        moved += 1
        if progress is not None:
            progress(moved)
    return moved


def _index_objects(location: str, options: StoreOptions | None) -> S3Objects:
    if location.lower().startswith("gs://"):
        location = gcs_location(location)
    base, _, query = location.partition("?")
    store_location = base.rpartition("/")[0] + "/" + ("?" + query if query else "")
    return S3Objects(store_location, options or StoreOptions())


def _index_key(objects: S3Objects, location: str) -> str:
    return objects.where.prefix + location.partition("?")[0].rpartition("/")[2]


def read_index_bytes(location: str, options: StoreOptions | None = None) -> bytes | None:
    """An index file in a bucket (`s3+https://host/bucket/prefix/name.caibx`)."""
    objects = _index_objects(location, options)
    try:
        return objects.read(_index_key(objects, location), MAX_INDEX_BYTES)
    finally:
        objects.close()


def write_index_bytes(location: str, data: bytes, options: StoreOptions | None = None) -> None:
    objects = _index_objects(location, options)
    try:
        objects.write(_index_key(objects, location), data, "application/octet-stream")
    finally:
        objects.close()


KIND = StoreKind("s3", lambda location, options, _create: S3Store(
    gcs_location(location) if location.lower().startswith("gs://") else location, options),
                 read_index_bytes, write_index_bytes)
