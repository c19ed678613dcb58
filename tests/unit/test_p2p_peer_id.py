"""Peer ids of did:key identities, checked against py-libp2p's own."""

from __future__ import annotations

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1_key_pair
from libp2p.peer.id import ID

from gitlawb.identity.keys import InvalidDid, NodeKey
from gitlawb.p2p.peer_id import (
    InvalidPeerId,
    did_for_peer_id,
    peer_id_for_did,
    peer_id_for_public_key,
)

SEED = bytes(range(32))


def test_peer_id_is_libp2ps_for_the_same_seed() -> None:
    """A DID's peer id is the one py-libp2p gives the host key of its seed."""
    key = NodeKey.from_seed(SEED)

    expected = ID.from_pubkey(ed25519_key_pair(SEED).public_key).to_base58()

    assert peer_id_for_did(key.did) == expected


def test_peer_id_begins_like_every_ed25519_peer_id() -> None:
    """An Ed25519 peer id begins 12D3KooW."""
    assert peer_id_for_public_key(NodeKey.generate().public_key).startswith("12D3KooW")


def test_did_round_trips_through_the_peer_id() -> None:
    """did -> peer id -> did gives the DID back."""
    key = NodeKey.generate()

    assert did_for_peer_id(peer_id_for_did(key.did)) == key.did


def test_short_key_is_accepted() -> None:
    """The short form of a DID names the same peer."""
    key = NodeKey.generate()

    assert peer_id_for_did(key.short) == peer_id_for_did(key.did)


def test_not_a_did_is_refused() -> None:
    """A DID of another method is refused."""
    with pytest.raises(InvalidDid):
        peer_id_for_did("did:web:example.com")


def test_secp256k1_peer_has_no_did() -> None:
    """A peer id of a key that is not Ed25519 has no did:key."""
    peer = ID.from_pubkey(secp256k1_key_pair().public_key).to_base58()

    with pytest.raises(InvalidPeerId):
        did_for_peer_id(peer)


@pytest.mark.parametrize("text", ["", "0OIl", "12D3KooW", "héllo"])
def test_garbage_is_refused(text: str) -> None:
    """Text that is not a base58 Ed25519 peer id is refused."""
    with pytest.raises(InvalidPeerId):
        did_for_peer_id(text)


def test_wrong_key_length_is_refused() -> None:
    """A public key must have 32 bytes."""
    with pytest.raises(ValueError):
        peer_id_for_public_key(b"\x01" * 31)
