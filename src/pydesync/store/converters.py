"""Storage converters: the layers between chunk data and the bytes a store holds, as desync has them.

A stack is applied in order when writing (compression, then encryption) and
in reverse when reading. Each layer contributes to the chunk file's extension:

    compressed   encrypted   extension
    yes          no          .cacnk
    no           no          (none)
    no           yes         .<alg>-<keyid>
    yes          yes         .cacnk.<alg>-<keyid>

The encryption layer is an AEAD (xchacha20-poly1305, the default, with a
24-byte nonce, or aes-256-gcm with a 12-byte nonce) under a 32-byte key: a
fresh random nonce is prepended to the ciphertext, no associated data. The
key id in the extension is the first 4 bytes of SHA-256 of the key, so chunks
written under another key are simply invisible. The crypto libraries
(PyNaCl, cryptography) are the optional `crypto` extra, imported only when
a store actually encrypts.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence

from ..codec import ZSTD, CodecError, compress, decompress
from ..errors import UsageError
from .options import StoreOptions

COMPRESSED_EXTENSION = ".cacnk"
XCHACHA20_POLY1305 = "xchacha20-poly1305"
AES_256_GCM = "aes-256-gcm"
ALGORITHMS = (XCHACHA20_POLY1305, AES_256_GCM)
KEY_SIZE = 32
MISSING_EXTRA = "encryption needs the 'crypto' extra: pip install pydesync[crypto]"


class DecryptError(CodecError):
    """Stored bytes that do not decrypt (wrong key, wrong algorithm, damaged or not encrypted)."""


class Layer:
    """One conversion between a chunk's plainer and its more stored form."""

    extension = ""

    def encode(self, data: bytes | memoryview) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes | memoryview) -> bytes:
        raise NotImplementedError


class Compression(Layer):
    """zstd (or the configured method) on write; any zstd/xz/gzip stream on read."""

    extension = COMPRESSED_EXTENSION

    def __init__(self, method: str = ZSTD):
        self.method = method

    def encode(self, data: bytes | memoryview) -> bytes:
        return compress(data, self.method)

    def decode(self, data: bytes | memoryview) -> bytes:
        return decompress(data)

    def __eq__(self, other: object) -> bool:
        # Every compression layer reads every other's output: stored bytes can be reused as they are.
        return isinstance(other, Compression)

    def __hash__(self) -> int:
        return hash(Compression)

    def __repr__(self) -> str:
        return f"Compression({self.method!r})"


class Encryption(Layer):
    """AEAD with a random nonce in front of the ciphertext and no associated data."""

    def __init__(self, key: bytes, algorithm: str = XCHACHA20_POLY1305):
        if len(key) != KEY_SIZE:
            raise UsageError(f"encryption key must be {KEY_SIZE} bytes, got {len(key)}")
        if algorithm not in ALGORITHMS:
            raise UsageError(f'unsupported encryption algorithm "{algorithm}"')
        self.algorithm = algorithm
        self._key = bytes(key)
        self.key_id = hashlib.sha256(self._key).hexdigest()[:8]
        self.extension = f".{algorithm}-{self.key_id}"
        try:
            if algorithm == XCHACHA20_POLY1305:
                from nacl import bindings

                self.nonce_size = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
                self._seal: Callable[[bytes, bytes], bytes]  # (nonce, data)
                self._open: Callable[[bytes, bytes], bytes]
                self._seal = functools.partial(_xchacha_seal, bindings, self._key)
                self._open = functools.partial(_xchacha_open, bindings, self._key)
                self._failure = "chacha20poly1305: message authentication failed"
            else:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM

                aead = AESGCM(self._key)
                self.nonce_size = 12
                self._seal = lambda nonce, data: aead.encrypt(nonce, data, None)
                self._open = lambda nonce, data: aead.decrypt(nonce, data, None)
                self._failure = "cipher: message authentication failed"
        except ImportError:
            raise UsageError(MISSING_EXTRA) from None

    def encode(self, data: bytes | memoryview) -> bytes:
        nonce = os.urandom(self.nonce_size)
        return nonce + self._seal(nonce, bytes(data))

    def decode(self, data: bytes | memoryview) -> bytes:
        if len(data) < self.nonce_size:
            raise DecryptError("no nonce prefix found in chunk, not encrypted or wrong algorithm")
        view = memoryview(data)
        try:
            return self._open(bytes(view[: self.nonce_size]), bytes(view[self.nonce_size:]))
        except Exception:  # nacl CryptoError / cryptography InvalidTag (and short ciphertexts)
            raise DecryptError(self._failure) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Encryption) and other.algorithm == self.algorithm and other._key == self._key

    def __hash__(self) -> int:
        return hash((self.algorithm, self._key))

    def __repr__(self) -> str:  # never the key itself
        return f"Encryption({self.algorithm!r}, key id {self.key_id})"


def _xchacha_seal(bindings: object, key: bytes, nonce: bytes, data: bytes) -> bytes:
    return bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(data, None, nonce, key)  # type: ignore[attr-defined]  # (in PyNaCl's bindings, not in its stubs)


def _xchacha_open(bindings: object, key: bytes, nonce: bytes, data: bytes) -> bytes:
    return bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(data, None, nonce, key)  # type: ignore[attr-defined]  # (in PyNaCl's bindings, not in its stubs)


class Converters(tuple):
    """An ordered stack of layers (towards storage); empty means plain chunks without extension."""

    def __new__(cls, layers: Sequence[Layer] = ()) -> Converters:
        return super().__new__(cls, tuple(layers))

    @property
    def extension(self) -> str:
        return "".join(layer.extension for layer in self)

    @property
    def compressed(self) -> bool:
        return any(isinstance(layer, Compression) for layer in self)

    @property
    def encrypted(self) -> bool:
        return any(isinstance(layer, Encryption) for layer in self)

    def encode(self, data: bytes | memoryview) -> bytes:
        """Plain data to its stored form (layers in order)."""
        out: bytes | memoryview = data
        for layer in self:
            out = layer.encode(out)
        return bytes(out)

    def decode(self, stored: bytes | memoryview) -> bytes:
        """Stored bytes back to plain data (layers in reverse); CodecError/DecryptError if they don't."""
        out: bytes | memoryview = stored
        for layer in reversed(self):
            out = layer.decode(out)
        return bytes(out)

    def common_prefix(self, other: Sequence[Layer]) -> int:
        """How many leading layers the two stacks share."""
        n = 0
        while n < len(self) and n < len(other) and self[n] == other[n]:
            n += 1
        return n

    def convert(self, stored: bytes, target: Converters) -> bytes:
        """Bytes in this stack's format re-encoded for `target`, undoing and redoing only the layers
        after the shared leading ones (a compressed chunk served encrypted is only encrypted)."""
        n = self.common_prefix(target)
        if n == len(self) == len(target):
            return stored
        plainer = Converters(self[n:]).decode(stored)
        return Converters(target[n:]).encode(plainer)

    def __repr__(self) -> str:
        return f"Converters({list(self)!r})"


PLAIN = Converters()
COMPRESSED = Converters([Compression()])


def parse_key(text: str, check_size: bool = True) -> bytes:
    """A hex key from the config or a flag, with desync's error messages."""
    problem = _hex_problem(text)
    if problem:
        raise UsageError(f"invalid encryption key, expected hex-encoded 256-bit key: {problem}")
    key = bytes.fromhex(text)
    if check_size and len(key) != KEY_SIZE:
        raise UsageError(f"encryption key must be {KEY_SIZE} bytes, got {len(key)}")
    return key


def _hex_problem(text: str) -> str | None:
    """Go's encoding/hex complaint about `text`, or None if it decodes."""
    for ch in text:
        if ch not in "0123456789abcdefABCDEF":
            return f"encoding/hex: invalid byte: U+{ord(ch):04X} {ch!r}"
    return "encoding/hex: odd length hex string" if len(text) % 2 else None


def encryption_configured(encryption: bool, key: str | None, algorithm: str | None) -> bool:
    """Whether any encryption option is set, valid or not."""
    return bool(encryption or key or algorithm)


@functools.lru_cache(maxsize=64)
def build_converters(uncompressed: bool, compression: str, encryption: bool, key: str | None,
                     algorithm: str | None) -> Converters:
    """The layers for a store's options, validated as desync validates them."""
    layers: list[Layer] = [] if uncompressed else [Compression(compression)]
    if not encryption and encryption_configured(encryption, key, algorithm):
        raise UsageError("encryption-key or encryption-algorithm configured without setting "
                         "encryption to true")
    if encryption:
        if not key:
            raise UsageError("no encryption key configured")
        raw = parse_key(key, check_size=False)  # desync's order: hex, algorithm, then key size
        if algorithm not in (None, "", *ALGORITHMS):
            raise UsageError(f'unsupported encryption algorithm "{algorithm}"')
        layers.append(Encryption(raw, algorithm or XCHACHA20_POLY1305))
    return Converters(layers)


def converters_for(options: StoreOptions) -> Converters:
    """The converter stack of a store's options (raises UsageError for invalid encryption settings)."""
    return build_converters(options.uncompressed, options.compression or ZSTD, options.encryption,
                            options.encryption_key, options.encryption_algorithm)


def encryption_key_fallback(enabled: bool, key: str | None) -> str | None:
    """The configured key, or $DESYNC_ENCRYPTION_KEY when encryption is on and no key is configured.
    The variable alone never turns encryption on."""
    if enabled and not key:
        return os.environ.get("DESYNC_ENCRYPTION_KEY") or None
    return key


def wire_converters(uncompressed: bool = False, encryption: bool = False, key: str | None = None,
                    algorithm: str | None = None) -> Converters:
    """chunk-server's wire format from its flags: --encryption-key/--encryption-algorithm imply
    --encryption; the key falls back to $DESYNC_ENCRYPTION_KEY."""
    enabled = encryption_configured(encryption, key, algorithm)
    return build_converters(uncompressed, ZSTD, enabled, encryption_key_fallback(enabled, key), algorithm)
