"""Ed25519 node keys, their did:key names and the PEM files that hold them.

A DID is ``did:key:z`` + base58btc(``0xED 0x01`` + 32-byte public key); the
*short key* is the part after the last ``:``. Key files are PEM ``PRIVATE
KEY`` blocks holding PKCS#8 either in version 1 (48 DER bytes, what this
module writes) or in version 2 (83 DER bytes, the public key appended as
``[1]``; what the ``gl`` client writes and what ``cryptography`` refuses).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import base58
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import SigningKey
from twisted.logger import Logger

__all__ = [
    "InvalidDid",
    "KeyFileError",
    "NodeKey",
    "did_from_public_key",
    "full_did",
    "load_or_create_key",
    "public_key_from_did",
    "short_key",
    "write_key",
]

log = Logger()

DID_KEY_PREFIX = "did:key:"
_ED25519_MULTICODEC = b"\xed\x01"
_KEY_BYTES = 32

# PKCS#8 v1: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 },
# OCTET STRING { OCTET STRING seed } }.
_PKCS8_V1_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
# PKCS#8 v2 (RFC 8410 OneAsymmetricKey): version 1, the same key, then
# publicKey [1] IMPLICIT BIT STRING (0 unused bits, 32 bytes).
_PKCS8_V2_PREFIX = bytes.fromhex("3051020101300506032b657004220420")
_PKCS8_V2_PUBLIC_KEY_HEADER = bytes.fromhex("812100")
_PKCS8_V2_LENGTH = 83

_PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN PRIVATE KEY-----(?P<body>[A-Za-z0-9+/=\s]*)-----END PRIVATE KEY-----"
)


class InvalidDid(ValueError):
    """The text is not an Ed25519 did:key (full or short form)."""


class KeyFileError(Exception):
    """A key file could not be read, parsed or written; the message names it."""


def did_from_public_key(pk: bytes) -> str:
    """Return the ``did:key:z6Mk...`` name of a 32-byte Ed25519 public key."""
    if len(pk) != _KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(pk)}")
    encoded = base58.b58encode(_ED25519_MULTICODEC + pk).decode("ascii")
    return f"{DID_KEY_PREFIX}z{encoded}"


def public_key_from_did(did: str) -> bytes:
    """Return the 32-byte public key named by a full did:key or a short key.

    Raises L{InvalidDid} for any other method, a multibase other than
    base58btc (``z``), bad base58, a multicodec other than Ed25519 or a key of
    the wrong length.
    """
    if did.startswith(DID_KEY_PREFIX):
        multibase = did[len(DID_KEY_PREFIX) :]
    elif ":" in did:
        raise InvalidDid(f"not a did:key: {did!r}")
    else:
        multibase = did
    if not multibase.startswith("z") or ":" in multibase:
        raise InvalidDid(f"not a base58btc did:key: {did!r}")
    try:
        decoded = base58.b58decode(multibase[1:])
    except ValueError as e:
        # UnicodeEncodeError (non-ASCII) is a ValueError too.
        raise InvalidDid(f"bad base58 in did:key: {did!r}") from e
    if decoded[:2] != _ED25519_MULTICODEC:
        raise InvalidDid(f"did:key is not an Ed25519 key: {did!r}")
    if len(decoded) != len(_ED25519_MULTICODEC) + _KEY_BYTES:
        raise InvalidDid(f"did:key has a key of the wrong length: {did!r}")
    return decoded[2:]


def full_did(did_or_short: str) -> str:
    """Return the canonical full ``did:key:`` form of a full DID or short key."""
    return did_from_public_key(public_key_from_did(did_or_short))


def short_key(did: str) -> str:
    """Return the short key (``z6Mk...``) of a full DID or short key."""
    return full_did(did)[len(DID_KEY_PREFIX) :]


@dataclass(frozen=True)
class NodeKey:
    """An Ed25519 key pair named by its did:key.

    The seed is kept out of C{repr} so that logging a key never leaks it.
    """

    seed: bytes = field(repr=False)
    public_key: bytes = field(init=False)
    did: str = field(init=False)
    _signing_key: SigningKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.seed) != _KEY_BYTES:
            raise ValueError(f"an Ed25519 seed has 32 bytes, not {len(self.seed)}")
        signing_key = SigningKey(self.seed)
        public_key = bytes(signing_key.verify_key)
        object.__setattr__(self, "_signing_key", signing_key)
        object.__setattr__(self, "public_key", public_key)
        object.__setattr__(self, "did", did_from_public_key(public_key))

    @property
    def short(self) -> str:
        """The short key: the DID after its last ``:``."""
        return self.did[len(DID_KEY_PREFIX) :]

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """Build the key pair of a 32-byte seed."""
        return cls(bytes(seed))

    @classmethod
    def generate(cls) -> NodeKey:
        """Make a new random key pair."""
        return cls(bytes(SigningKey.generate()))

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of C{data}."""
        return self._signing_key.sign(data).signature


def _pkcs8_v2_der(key: NodeKey) -> bytes:
    return _PKCS8_V2_PREFIX + key.seed + _PKCS8_V2_PUBLIC_KEY_HEADER + key.public_key


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [b"-----BEGIN PRIVATE KEY-----", *lines, b"-----END PRIVATE KEY-----", b""]
    )


def _seed_from_pkcs8_v2(data: bytes) -> bytes | None:
    """Return the seed of a PEM PKCS#8 v2 Ed25519 key, or None if it is not one.

    Raises L{ValueError} when it is laid out as one but its public key does not
    belong to its seed.
    """
    match = _PEM_PRIVATE_KEY.search(data)
    if match is None:
        return None
    try:
        der = base64.b64decode(b"".join(match["body"].split()), validate=True)
    except binascii.Error:
        return None
    if (
        len(der) != _PKCS8_V2_LENGTH
        or der[:16] != _PKCS8_V2_PREFIX
        or der[48:51] != _PKCS8_V2_PUBLIC_KEY_HEADER
    ):
        return None
    seed, public_key = der[16:48], der[51:83]
    if NodeKey(seed).public_key != public_key:
        raise ValueError("its public key does not belong to its private key")
    return seed


def _parse_key_file(path: Path, data: bytes) -> NodeKey:
    # The v2 layout the gl client writes is checked against its fixed layout
    # first: cryptography refuses it today, and if it ever accepts it, the
    # check that the embedded public key belongs to the seed must still run.
    try:
        seed = _seed_from_pkcs8_v2(data)
    except ValueError as e:
        raise KeyFileError(f"{path}: not a valid key: {e}") from e
    if seed is not None:
        return NodeKey(seed)

    # cryptography reads PKCS#8 v1, and names other key types for the message.
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise KeyFileError(f"{path}: encrypted keys are not supported") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path}: not a PEM PKCS#8 Ed25519 private key") from e
    if not isinstance(private_key, Ed25519PrivateKey):
        kind = type(private_key).__name__.lstrip("_")
        raise KeyFileError(f"{path}: holds a {kind}, not an Ed25519 key")
    return NodeKey(private_key.private_bytes_raw())


def _read_key(path: Path) -> NodeKey:
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise KeyFileError(f"{path}: not a regular file")
            data = f.read()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key file: {e.strerror}") from e
    key = _parse_key_file(path, data)
    if mode & 0o077:
        log.warn(
            "key file {path} is readable by others (mode {mode:o}); chmod 600 it",
            path=str(path),
            mode=stat.S_IMODE(mode),
        )
    return key


def _write_exclusive(path: Path, data: bytes) -> None:
    """Write C{data} to a new file at C{path}, mode 0600, all or nothing.

    The bytes go to a temporary file that is created 0600 in the same
    directory and then hard-linked into place, so the key is never visible
    half-written or with wider permissions, and an existing file is never
    replaced: the link raises L{FileExistsError} instead.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".key-tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp_name, path)
    finally:
        os.unlink(tmp_name)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_key(path: Path, key: NodeKey, *, v2: bool = False) -> None:
    """Write C{key} to a new PEM file at C{path} with mode 0600.

    C{v2} writes the PKCS#8 v2 layout the gl client uses instead of v1.
    Raises L{KeyFileError} if the file exists (it is never replaced) or
    cannot be written.
    """
    if v2:
        pem = _pem(_pkcs8_v2_der(key))
    else:
        private_key = Ed25519PrivateKey.from_private_bytes(key.seed)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    try:
        _write_exclusive(path, pem)
    except FileExistsError as e:
        raise KeyFileError(f"{path}: already exists; refusing to replace it") from e
    except OSError as e:
        raise KeyFileError(f"{path}: cannot write key file: {e.strerror}") from e


def load_or_create_key(path: Path) -> NodeKey:
    """Return the key stored at C{path}, creating the file if it is missing.

    A new key is written as PKCS#8 v1 with mode 0600 (parent directories are
    created 0700). An existing file is never replaced: if it cannot be read or
    does not hold an Ed25519 key, L{KeyFileError} says why.
    """
    if not os.path.lexists(path):
        key = NodeKey.generate()
        try:
            write_key(path, key)
        except KeyFileError:
            # Another process may have created it meanwhile; use that one.
            if not os.path.lexists(path):
                raise
        else:
            log.info(
                "created node key path={path} did={did}", path=str(path), did=key.did
            )
            return key
    return _read_key(path)
