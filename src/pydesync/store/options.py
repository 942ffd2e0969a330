"""The settings of one store: desync's config `store-options` for its location, overridden by
explicit command line flags. A module of its own so that everything below the stores (the
converters, the index readers) can take them typed without importing the stores."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class StoreOptions:
    """Per-store settings (desync's config `store-options`, overridden by explicit CLI flags)."""

    uncompressed: bool = False
    skip_verify: bool = False
    compression: str = "zstd"
    timeout: float | None = 60.0        # seconds for a whole request; None = no limit
    error_retry: int = 3                # attempts (HTTP: at least one)
    error_retry_base: float = 0.5       # seconds; attempt n waits n times this
    trust_insecure: bool = False
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    http_auth: str | None = None        # sent verbatim as Authorization
    http_cookie: str | None = None      # sent verbatim as Cookie
    concurrency: int = 10               # connections / requests at once for network stores
    encryption: bool = False            # AEAD layer on top of compression (see store.converters)
    encryption_key: str | None = field(default=None, repr=False)  # 64 hex chars
    encryption_algorithm: str | None = None  # xchacha20-poly1305 (default) or aes-256-gcm
    s3_credentials: dict[str, Any] | None = field(default=None, repr=False)  # config entry for the endpoint
    oci_credentials: dict[str, Any] | None = field(default=None, repr=False)  # config entry for the repo

    @property
    def encryption_configured(self) -> bool:
        """Any encryption option set, valid or not (index stores refuse them all)."""
        return bool(self.encryption or self.encryption_key or self.encryption_algorithm)

    def override(self, **changes: object) -> StoreOptions:
        """A copy with the given fields changed; None means 'not given' and keeps the current value."""
        # (each value is its field's own type: the callers pass flags parsed for that field)
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
