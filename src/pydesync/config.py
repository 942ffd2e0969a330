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
from .store.converters import ALGORITHMS, encryption_key_fallback

OWN_CONFIG = os.path.join("~", ".config", "pydesync", "config.json")
DESYNC_CONFIG = os.path.join("~", ".config", "desync", "config.json")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
GO_DURATION = r"^[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+$|^[-+]?0$"


def go_duration(text: str) -> float:
    """A Go duration ("500ms", "1m30s", "-1h"; "0" alone) in seconds; ValueError if it is not one."""
    if text in ("0", "-0", "+0"):
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in "+-" else text
    pos, total = 0, 0.0
    for m in _DURATION.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(body) or not body:
        raise ValueError(f"invalid duration '{text}'")
    return sign * total


def _nullable(*types: str, **rules: Any) -> dict[str, Any]:
    """null is allowed wherever desync's JSON decoding leaves the default in place."""
    return {"type": [*types, "null"], **rules}


_STRING = _nullable("string")
_BOOLEAN = _nullable("boolean")
_DURATION_VALUE = _nullable("integer", "string", pattern=GO_DURATION)  # the pattern applies to strings
_STORE_OPTIONS = {
    "n": _nullable("integer"),
    "client-cert": _STRING, "client-key": _STRING, "ca-cert": _STRING,
    "trust-insecure": _BOOLEAN,
    "http-auth": _STRING, "http-cookie": _STRING,
    "timeout": _DURATION_VALUE,
    "error-retry": _nullable("integer", minimum=0),
    "error-retry-base-interval": _DURATION_VALUE,
    "skip-verify": _BOOLEAN, "uncompressed": _BOOLEAN,
    "encryption": _BOOLEAN,
    "encryption-key": _STRING,
    "encryption-algorithm": {"enum": [None, "", *sorted(ALGORITHMS)]},
}
_S3_CREDENTIALS = {key: _STRING for key in ("access-key", "secret-key", "session-token",
                                             "aws-credentials-file", "aws-profile", "aws-region")}
_OCI_CREDENTIALS = {key: _STRING for key in ("username", "secret")}
_SECTIONS = {"store-options": _STORE_OPTIONS, "s3-credentials": _S3_CREDENTIALS,
             "oci-credentials": _OCI_CREDENTIALS}
SCHEMA = {  # desync's config file (its Go structs), as JSON Schema
    "type": "object",
    "properties": {
        section: _nullable("object", additionalProperties=_nullable("object", properties=keys))
        for section, keys in _SECTIONS.items()},
}
# The same, one validator per level: errors then name their key exactly (locations hold dots).
_LEVELS = {
    "": {"type": "object", "properties": {section: _nullable("object") for section in _SECTIONS}},
    **{section: _nullable("object", properties=keys) for section, keys in _SECTIONS.items()},
}
_EXPECTED = {"boolean": "true or false", "integer": "a whole number", "string": "a string",
             "object": "an object"}


def validate_config(raw: Any, path: str) -> list[str]:
    """Check a parsed config against SCHEMA: UsageError naming the file, the key and what it
    expects; the unknown keys are returned (warnings: desync ignores them too)."""
    import fastjsonschema  # a well-kept validator; compiled on the first config read

    validators = _validators(fastjsonschema)
    try:
        validators[""](raw)
    except fastjsonschema.JsonSchemaValueException as e:
        section = (e.name or "").partition(".")[2]
        raise UsageError(f"config file {path}: {section or 'the top level'}: expected "
                         f"{'an object of locations (or null)' if section else 'a JSON object'}, "
                         f"got {json.dumps(e.value)}") from None
    for section, keys in _SECTIONS.items():
        for location, entry in (raw.get(section) or {}).items():
            try:
                validators[section](entry)
            except fastjsonschema.JsonSchemaValueException as e:
                key = (e.name or "").partition(".")[2]
                where = f"{section}: {json.dumps(location)}"
                expected = _expectation(keys[key]) if key in keys else "an object of options (or null)"
                raise UsageError(f"config file {path}: {where}{': ' + key if key else ''}: expected "
                                 f"{expected}, got {json.dumps(e.value)}") from None
    return [f"{section}: {location}: {key}" if location else f"{section}"
            for section, location, key in _unknown_keys(raw)]


_compiled: dict[str, Any] = {}


def _validators(fastjsonschema: Any) -> dict[str, Any]:
    if not _compiled:
        _compiled.update({level: fastjsonschema.compile(schema) for level, schema in _LEVELS.items()})
    return _compiled


def _expectation(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " or ".join(json.dumps(v) for v in schema["enum"] if v)
    if "pattern" in schema:
        return 'a duration: nanoseconds or a Go duration such as "500ms" or "1m"'
    text = _EXPECTED[schema["type"][0]]
    return text + (" (0 or more)" if "minimum" in schema else "")


def _unknown_keys(raw: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = [(key, "", "") for key in raw if key not in _SECTIONS]
    for section, keys in _SECTIONS.items():
        for location, entry in (raw.get(section) or {}).items():
            out += [(section, location, key) for key in (entry or {}) if key not in keys]
    return out


def duration_seconds(value: int | str | None, what: str) -> float | None:
    """A config duration (nanoseconds, or a Go duration string) in seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return go_duration(value)
        except ValueError:
            raise UsageError(f"{what}: invalid duration {value!r}") from None
    return value / 1e9


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
    """A config file checked against SCHEMA (its unknown keys only warned about, as desync ignores them)."""

    store_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    s3_credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    oci_credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # unknown keys, for the CLI to print

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
        timeout = duration_seconds(raw.get("timeout"), f"store-options for {location}: timeout")
        base = duration_seconds(raw.get("error-retry-base-interval"),
                                f"store-options for {location}: error-retry-base-interval")
        encryption = bool(raw.get("encryption"))
        return StoreOptions().override(
            uncompressed=raw.get("uncompressed"),
            skip_verify=raw.get("skip-verify"),
            timeout=None if timeout is None else (60.0 if timeout == 0 else (
                float("inf") if timeout < 0 else timeout)),
            error_retry=raw.get("error-retry"),
            error_retry_base=None if base is None else max(0.0, base),
            trust_insecure=raw.get("trust-insecure"),
            ca_cert=raw.get("ca-cert"),
            client_cert=raw.get("client-cert"),
            client_key=raw.get("client-key"),
            http_auth=raw.get("http-auth"),
            http_cookie=raw.get("http-cookie"),
            encryption=encryption,
            encryption_key=encryption_key_fallback(encryption, raw.get("encryption-key") or None),
            encryption_algorithm=raw.get("encryption-algorithm") or None,
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
    unknown = validate_config(raw, path)
    return Config(store_options=raw.get("store-options") or {},
                  s3_credentials=raw.get("s3-credentials") or {},
                  oci_credentials=raw.get("oci-credentials") or {},
                  warnings=[f"config file {path}: unknown key {key} (ignored)" for key in unknown])
