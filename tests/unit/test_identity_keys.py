"""Tests for gitlawb.identity.keys: did:key names, NodeKey and key files."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import base58
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import VerifyKey
from twisted.logger import capturedLogs

from gitlawb.identity.keys import (
    InvalidDid,
    KeyFileError,
    NodeKey,
    did_from_public_key,
    full_did,
    load_or_create_key,
    public_key_from_did,
    short_key,
    write_key,
)

VECTOR_SEED = bytes(range(32))
VECTOR_DID = "did:key:z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd"
VECTOR_SHORT = "z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd"


def pem(der: bytes) -> bytes:
    """Wrap DER bytes in a PEM PRIVATE KEY block, 64 columns."""
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [b"-----BEGIN PRIVATE KEY-----", *lines, b"-----END PRIVATE KEY-----\n"]
    )


def pkcs8_v2(seed: bytes, public_key: bytes) -> bytes:
    """Build the 83-byte PKCS#8 v2 DER the gl client writes, from its layout."""
    return (
        bytes.fromhex("3051")  # SEQUENCE, 81 bytes
        + bytes.fromhex("020101")  # INTEGER 1: version 2
        + bytes.fromhex("300506032b6570")  # AlgorithmIdentifier Ed25519
        + bytes.fromhex("04220420")  # OCTET STRING { OCTET STRING (32) }
        + seed
        + bytes.fromhex("812100")  # [1] IMPLICIT BIT STRING, no unused bits
        + public_key
    )


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Run with umask 0, so only the code itself keeps files private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- DIDs --------------------------------------------------------------------


def test_did_from_public_key_matches_vector() -> None:
    """The protocol's test seed has the DID the protocol gives."""
    public_key = bytes(NodeKey.from_seed(VECTOR_SEED).public_key)

    assert did_from_public_key(public_key) == VECTOR_DID


def test_did_from_public_key_refuses_wrong_length() -> None:
    """A public key that is not 32 bytes has no DID."""
    with pytest.raises(ValueError):
        did_from_public_key(b"\x01" * 31)


def test_public_key_from_full_did() -> None:
    """The full did:key decodes to the public key."""
    assert public_key_from_did(VECTOR_DID) == NodeKey.from_seed(VECTOR_SEED).public_key


def test_public_key_from_short_key() -> None:
    """The short key decodes to the same public key."""
    assert public_key_from_did(VECTOR_SHORT) == public_key_from_did(VECTOR_DID)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "did:key:",
        "did:key:z",
        "did:web:example.com",
        "did:key:" + "f" + VECTOR_SHORT[1:],  # not base58btc multibase
        "did:key:z0OIl",  # not base58
        "did:key:z6Mkéh",  # not ASCII
        "z6Mk:" + VECTOR_SHORT,
        "did:key:z" + base58.b58encode(b"\xe7\x01" + b"\x02" * 33).decode(),
        "did:key:z" + base58.b58encode(b"\xed\x01" + b"\x02" * 31).decode(),
        "did:key:z" + base58.b58encode(b"\xed\x01" + b"\x02" * 33).decode(),
        "did:key:z1" + VECTOR_SHORT[1:],  # a leading zero byte
    ],
)
def test_public_key_from_did_refuses(text: str) -> None:
    """Anything but an Ed25519 did:key or short key raises InvalidDid."""
    with pytest.raises(InvalidDid):
        public_key_from_did(text)


def test_invalid_did_is_a_value_error() -> None:
    """Callers catching ValueError also catch InvalidDid."""
    assert issubclass(InvalidDid, ValueError)


def test_short_key_of_full_and_short() -> None:
    """short_key gives the part after the last colon for either form."""
    assert short_key(VECTOR_DID) == VECTOR_SHORT
    assert short_key(VECTOR_SHORT) == VECTOR_SHORT


def test_full_did_of_full_and_short() -> None:
    """full_did gives the did:key form for either form."""
    assert full_did(VECTOR_SHORT) == VECTOR_DID
    assert full_did(VECTOR_DID) == VECTOR_DID


def test_full_did_refuses_garbage() -> None:
    """full_did validates rather than prefixing anything."""
    with pytest.raises(InvalidDid):
        full_did("not-a-key")


# -- NodeKey -----------------------------------------------------------------


def test_node_key_names() -> None:
    """A NodeKey carries its seed, DID and short key."""
    key = NodeKey.from_seed(VECTOR_SEED)

    assert (key.seed, key.did, key.short) == (VECTOR_SEED, VECTOR_DID, VECTOR_SHORT)


def test_node_key_signs_verifiably() -> None:
    """sign returns a 64-byte signature that the public key verifies."""
    key = NodeKey.generate()

    signature = key.sign(b"hello")

    assert len(signature) == 64
    VerifyKey(key.public_key).verify(b"hello", signature)


def test_node_key_repr_hides_seed() -> None:
    """Logging a key never shows its seed."""
    key = NodeKey.from_seed(VECTOR_SEED)

    assert repr(VECTOR_SEED) not in repr(key)
    assert VECTOR_DID in repr(key)


def test_node_key_refuses_short_seed() -> None:
    """A seed must be 32 bytes."""
    with pytest.raises(ValueError):
        NodeKey.from_seed(b"\x00" * 31)


def test_node_key_equality_by_seed() -> None:
    """Two keys from one seed are equal; generated keys differ."""
    assert NodeKey.from_seed(VECTOR_SEED) == NodeKey.from_seed(VECTOR_SEED)
    assert NodeKey.generate() != NodeKey.generate()


# -- Key files ---------------------------------------------------------------


def test_missing_key_file_is_created(tmp_path: Path) -> None:
    """A missing key file is created, parent directories included."""
    path = tmp_path / "a" / "b" / "identity.pem"

    key = load_or_create_key(path)

    assert path.is_file()
    assert load_or_create_key(path) == key


def test_created_key_file_is_mode_0600(tmp_path: Path, umask_zero: None) -> None:
    """A created key file is 0600 even under umask 0."""
    path = tmp_path / "identity.pem"

    load_or_create_key(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_created_key_file_never_wider_than_0600(
    tmp_path: Path, umask_zero: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key bytes are 0600 before they appear under the final name."""
    modes: list[int] = []
    real_link: Callable[[str, Path], None] = os.link

    def link(src: str, dst: Path) -> None:
        modes.append(stat.S_IMODE(os.stat(src).st_mode))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)

    load_or_create_key(tmp_path / "identity.pem")

    assert modes == [0o600]
    assert [p.name for p in tmp_path.iterdir()] == ["identity.pem"]


def test_created_key_file_is_pkcs8_v1(tmp_path: Path) -> None:
    """A created key file is a PKCS#8 v1 PEM that cryptography reads."""
    path = tmp_path / "identity.pem"

    key = load_or_create_key(path)

    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert loaded.private_bytes_raw() == key.seed


def test_loads_v1(tmp_path: Path) -> None:
    """A PKCS#8 v1 (48-byte DER) key file loads."""
    path = tmp_path / "identity.pem"
    der = Ed25519PrivateKey.from_private_bytes(VECTOR_SEED).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert len(der) == 48
    path.write_bytes(pem(der))

    assert load_or_create_key(path).did == VECTOR_DID


def test_loads_v2(tmp_path: Path) -> None:
    """A PKCS#8 v2 (83-byte DER) key file, as the gl client writes it, loads."""
    path = tmp_path / "identity.pem"
    key = NodeKey.from_seed(VECTOR_SEED)
    der = pkcs8_v2(key.seed, key.public_key)
    assert len(der) == 83
    path.write_bytes(pem(der))

    assert load_or_create_key(path).did == VECTOR_DID


def test_write_key_v2_matches_layout(tmp_path: Path) -> None:
    """write_key(v2=True) writes the v2 layout byte for byte."""
    path = tmp_path / "identity.pem"
    key = NodeKey.from_seed(VECTOR_SEED)

    write_key(path, key, v2=True)

    assert path.read_bytes() == pem(pkcs8_v2(key.seed, key.public_key))
    assert load_or_create_key(path) == key


def test_write_key_v1_round_trips(tmp_path: Path) -> None:
    """write_key writes v1 by default and it loads back."""
    path = tmp_path / "identity.pem"
    key = NodeKey.generate()

    write_key(path, key)

    assert load_or_create_key(path) == key


def test_v2_with_foreign_public_key_refused(tmp_path: Path) -> None:
    """A v2 file whose public key is not the seed's is refused."""
    path = tmp_path / "identity.pem"
    other = NodeKey.generate()
    path.write_bytes(pem(pkcs8_v2(VECTOR_SEED, other.public_key)))

    with pytest.raises(KeyFileError, match="public key"):
        load_or_create_key(path)


def _rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ec_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _encrypted_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"",
        lambda: b"garbage\x00\xff not a key",
        lambda: b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
        lambda: pem(b"\x30\x03\x02\x01\x00"),
        lambda: pem(pkcs8_v2(VECTOR_SEED, bytes(32))[:-1]),
        _rsa_pem,
        _ec_pem,
        _encrypted_pem,
    ],
    ids=[
        "empty",
        "garbage",
        "bad-base64",
        "bad-der",
        "short-v2",
        "rsa",
        "ec",
        "encrypted",
    ],
)
def test_bad_key_file_refused_and_kept(
    tmp_path: Path, make: Callable[[], bytes]
) -> None:
    """A file that is not an Ed25519 key raises KeyFileError and is left alone."""
    path = tmp_path / "identity.pem"
    content = make()
    path.write_bytes(content)

    with pytest.raises(KeyFileError) as caught:
        load_or_create_key(path)

    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == content


def test_rsa_key_named_in_message(tmp_path: Path) -> None:
    """An RSA key file is refused with a message saying it is RSA."""
    path = tmp_path / "identity.pem"
    path.write_bytes(_rsa_pem())

    with pytest.raises(KeyFileError, match="RSA"):
        load_or_create_key(path)


def test_directory_in_place_of_key_refused(tmp_path: Path) -> None:
    """A directory at the key path is refused, not replaced."""
    path = tmp_path / "identity.pem"
    path.mkdir()

    with pytest.raises(KeyFileError, match=str(path)):
        load_or_create_key(path)

    assert path.is_dir()


def test_dangling_symlink_not_replaced(tmp_path: Path) -> None:
    """A dangling symlink at the key path is refused, never written through."""
    path = tmp_path / "identity.pem"
    path.symlink_to(tmp_path / "elsewhere.pem")

    with pytest.raises(KeyFileError):
        load_or_create_key(path)

    assert not (tmp_path / "elsewhere.pem").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file_refused(tmp_path: Path) -> None:
    """A key file without read permission raises KeyFileError."""
    path = tmp_path / "identity.pem"
    write_key(path, NodeKey.generate())
    path.chmod(0o000)

    with pytest.raises(KeyFileError, match="cannot read"):
        load_or_create_key(path)


def test_write_key_never_overwrites(tmp_path: Path) -> None:
    """write_key refuses to replace an existing file."""
    path = tmp_path / "identity.pem"
    path.write_bytes(b"keep me")

    with pytest.raises(KeyFileError, match="already exists"):
        write_key(path, NodeKey.generate())

    assert path.read_bytes() == b"keep me"


def test_world_readable_key_loads_with_warning(tmp_path: Path) -> None:
    """A key file readable by others still loads, with a warning logged."""
    path = tmp_path / "identity.pem"
    key = NodeKey.generate()
    write_key(path, key)
    path.chmod(0o644)

    with capturedLogs() as events:
        loaded = load_or_create_key(path)

    assert loaded == key
    assert any("readable by others" in e["log_format"] for e in events)


def test_permission_denied_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file the process may not open raises KeyFileError, even as root."""
    path = tmp_path / "identity.pem"
    write_key(path, NodeKey.generate())

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)

    with pytest.raises(KeyFileError, match="Permission denied"):
        load_or_create_key(path)
