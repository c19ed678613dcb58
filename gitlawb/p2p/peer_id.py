"""
libp2p peer ids of did:key identities, and back.

A node's libp2p host key is built from the same 32-byte Ed25519 seed as its
node key, so its peer id and its DID name one public key. An Ed25519 peer id
is the identity multihash (code C{0x00}, length C{0x24}) of the libp2p
C{PublicKey} protobuf (C{Type = Ed25519}, C{Data = the 32 key bytes}), written
in base58btc: it always begins C{12D3KooW}.

Nothing here imports libp2p: the mapping is plain bytes and base58.
"""

from __future__ import annotations

import base58

from gitlawb.identity.keys import did_from_public_key, public_key_from_did

__all__ = [
    "InvalidPeerId",
    "did_for_peer_id",
    "peer_id_for_did",
    "peer_id_for_public_key",
]

# identity multihash, 36 bytes of protobuf: field 1 (KeyType) = 1 (Ed25519),
# field 2 (Data) = 32 bytes.
_ED25519_PEER_ID_PREFIX = bytes.fromhex("002408011220")
_KEY_BYTES = 32


class InvalidPeerId(ValueError):
    """The text is not the base58 peer id of an Ed25519 key."""


def peer_id_for_public_key(public_key: bytes) -> str:
    """Return the base58 peer id (C{12D3KooW...}) of a 32-byte Ed25519 key."""
    if len(public_key) != _KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")
    return base58.b58encode(_ED25519_PEER_ID_PREFIX + public_key).decode("ascii")


def peer_id_for_did(did: str) -> str:
    """
    Return the peer id of a did:key (full or short form).

    @raise gitlawb.identity.keys.InvalidDid: when C{did} is not an Ed25519
        did:key.
    """
    return peer_id_for_public_key(public_key_from_did(did))


def did_for_peer_id(peer_id: str) -> str:
    """
    Return the full did:key of an Ed25519 peer id.

    @raise InvalidPeerId: when C{peer_id} is not base58, or names a key that is
        not Ed25519 (RSA and secp256k1 peers have no did:key).
    """
    try:
        decoded = base58.b58decode(peer_id)
    except ValueError as e:
        raise InvalidPeerId(f"not a base58 peer id: {peer_id!r}") from e
    if len(decoded) != len(
        _ED25519_PEER_ID_PREFIX
    ) + _KEY_BYTES or not decoded.startswith(_ED25519_PEER_ID_PREFIX):
        raise InvalidPeerId(f"not the peer id of an Ed25519 key: {peer_id!r}")
    return did_from_public_key(decoded[len(_ED25519_PEER_ID_PREFIX) :])
