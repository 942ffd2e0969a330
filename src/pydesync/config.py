"""desync's JSON config file: store-options per location, matched with Go's glob rules.

Go's path.Match differs from fnmatch: `*` and `?` never match `/`, and `[^...]`
negates. URL locations compare with trailing slashes removed; paths compare
absolute and cleaned.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .store import StoreOptions, location_scheme
from .store.converters import encryption_key_fallback

OWN_CONFIG = os.path.join("~", ".config", "pydesync", "config.json")
DESYNC_CONFIG = os.path.join("~", ".config", "desync", "config.json")


def default_config_path() -> str:
    """pydesync's own config if it exists, else desync's (so a desync setup keeps working)."""
    own = os.path.expanduser(OWN_CONFIG)
    return own if os.path.exists(own) else os.path.expanduser(DESYNC_CONFIG)


def go_glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a Go path.Match pattern to an anchored regex."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch == "[":
            close = pattern.find("]", i + 2)
            if close < 0:
                raise UsageError(f"syntax error in pattern '{pattern}'")
            body = pattern[i + 1:close]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            cls = "".join("\\" + c if c in "\\]^[" else c for c in body)
            out.append(f"[{'^' if negate else ''}{cls}]")
            i = close
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _is_url(location: str) -> bool:
    """URL-like, including patterns such as `*://host` (a single letter is a drive, not a scheme)."""
    head, sep, _ = location.partition("://")
    return location_scheme(location) is not None or bool(sep and head and not head.isalpha())


def _normalise(location: str) -> tuple[str, bool]:
    """(comparable form, is_url) of a location or a pattern."""
    if _is_url(location):
        return location.rstrip("/"), True
    return os.path.normpath(os.path.abspath(os.path.expanduser(location))), False


def location_matches(pattern: str, location: str) -> bool:
    pat, pat_url = _normalise(pattern)
    loc, loc_url = _normalise(location)
    if pat_url != loc_url:
        return False
    return bool(go_glob_regex(pat).match(loc))


@dataclass
class Config:
    """Parsed config; unknown sections are kept for the commands that will use them."""

    store_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    s3_credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    oci_credentials: dict[str, dict[str, Any]] = field(default_factory=dict)

    def raw_options_for(self, location: str) -> dict[str, Any]:
        matches = [k for k in self.store_options if location_matches(k, location)]
        if len(matches) > 1:
            raise UsageError(f"multiple store-options entries match the location {location}: "
                             + ", ".join(matches))
        return dict(self.store_options[matches[0]]) if matches else {}

    def options_for(self, location: str) -> StoreOptions:
        """Store defaults, then the matching `store-options` entry (durations in nanoseconds).

        The encryption settings are taken as given (with the key falling back to
        $DESYNC_ENCRYPTION_KEY when encryption is on); chunk stores validate them
        when they open (store.converters), index stores refuse them all.
        """
        raw = self.raw_options_for(location)
        timeout = raw.get("timeout")
        encryption = bool(_typed(raw, "encryption", bool, location))
        return StoreOptions().override(
            uncompressed=_bool(raw, "uncompressed"),
            skip_verify=_bool(raw, "skip-verify"),
            timeout=None if timeout is None else (60.0 if timeout == 0 else (
                float("inf") if timeout < 0 else timeout / 1e9)),
            error_retry=raw.get("error-retry"),
            error_retry_base=None if raw.get("error-retry-base-interval") is None
            else raw["error-retry-base-interval"] / 1e9,
            trust_insecure=_bool(raw, "trust-insecure"),
            ca_cert=raw.get("ca-cert"),
            client_cert=raw.get("client-cert"),
            client_key=raw.get("client-key"),
            http_auth=raw.get("http-auth"),
            http_cookie=raw.get("http-cookie"),
            encryption=encryption,
            encryption_key=encryption_key_fallback(
                encryption, _typed(raw, "encryption-key", str, location) or None),
            encryption_algorithm=_typed(raw, "encryption-algorithm", str, location) or None,
            s3_credentials=self.s3_entry_for(location),
            oci_credentials=self.oci_entry_for(location),
        )

    def oci_entry_for(self, location: str) -> dict[str, Any] | None:
        """The `oci-credentials` entry of an oci+http(s) location, matched like store-options."""
        if not location.lower().startswith(("oci+http://", "oci+https://")):
            return None
        matches = [k for k in self.oci_credentials if location_matches(k, location)]
        if len(matches) > 1:
            raise UsageError(f"multiple oci-credentials entries match the location {location}: "
                             + ", ".join(matches))
        entry = self.oci_credentials[matches[0]] if matches else None
        return dict(entry) if isinstance(entry, dict) else None

    def s3_entry_for(self, location: str) -> dict[str, Any] | None:
        """The `s3-credentials` entry of an s3+http(s) (or gs) location: key `http(s)://host[:port]`,
        looked up exactly as desync does."""
        head = location.partition("://")[0].lower()
        if head not in ("s3+http", "s3+https", "gs"):
            return None
        from .store.s3 import s3_credentials_key

        try:
            entry = self.s3_credentials.get(s3_credentials_key(location))
        except UsageError:
            return None  # the store reports the bad location when it opens
        return dict(entry) if isinstance(entry, dict) else None

    def as_json(self) -> dict[str, Any]:
        return {"s3-credentials": self.s3_credentials or None,
                "oci-credentials": self.oci_credentials or None,
                "store-options": self.store_options or None}


def _typed(raw: dict[str, Any], key: str, kind: type, location: str) -> Any:
    """raw[key] (None if absent or null), which must be of `kind` (as Go's JSON decoding insists)."""
    value = raw.get(key)
    if value is not None and type(value) is not kind:
        raise UsageError(f"store-options for {location}: '{key}' must be a "
                         f"{'boolean' if kind is bool else 'string'}")
    return value


def _bool(raw: dict[str, Any], key: str) -> bool | None:
    return None if raw.get(key) is None else bool(raw[key])


def load_config(path: str | None) -> Config:
    """Load the config; a missing default file is fine, a missing explicit one is an error."""
    explicit = path is not None
    path = os.path.expanduser(path) if path else default_config_path()
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} does not exist") from None
        return Config()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read config file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path}: expected a JSON object")
    return Config(store_options=raw.get("store-options") or {},
                  s3_credentials=raw.get("s3-credentials") or {},
                  oci_credentials=raw.get("oci-credentials") or {})
