"""The ref-update gossip layer over a fake swarm: encoding, verification, hand-on."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from gitlawb.identity.keys import NodeKey
from gitlawb.p2p.gossip import (
    MAX_MESSAGE_BYTES,
    REF_UPDATE_FIELDS,
    REF_UPDATES_TOPIC,
    GossipService,
    decode_ref_update,
    encode_ref_update,
)
from gitlawb.p2p.peer_id import peer_id_for_did
from gitlawb.p2p.swarm import PubsubMessage, SwarmService

NODE = NodeKey.from_seed(b"\x01" * 32)
OTHER = NodeKey.from_seed(b"\x02" * 32)


def an_update(**changes: Any) -> dict[str, Any]:
    update: dict[str, Any] = {
        "node_did": OTHER.did,
        "pusher_did": OTHER.did,
        "repo": "z6Mkowner/project",
        "owner_did": OTHER.did,
        "ref_name": "refs/heads/main",
        "old_sha": "0" * 40,
        "new_sha": "a" * 40,
        "timestamp": "2026-12-03T15:26:00.123456+00:00",
        "cert_id": "cert-1",
        "cid": None,
    }
    update.update(changes)
    return update


class FakeSwarm:
    """What GossipService uses of a SwarmService, recording publishes."""

    def __init__(self, did: str = NODE.did) -> None:
        self.did = did
        self.handlers: dict[str, Callable[[PubsubMessage], None]] = {}
        self.published: list[tuple[str, bytes]] = []

    def subscribe(self, topic: str, handler: Callable[[PubsubMessage], None]) -> None:
        self.handlers[topic] = handler

    def publish(self, topic: str, data: bytes) -> Deferred[None]:
        self.published.append((topic, data))
        return succeed(None)

    def deliver(self, data: bytes, signer: NodeKey) -> None:
        self.handlers[REF_UPDATES_TOPIC](
            PubsubMessage(REF_UPDATES_TOPIC, data, peer_id_for_did(signer.did), b"1")
        )


def started_gossip(
    handler: Callable[[dict[str, Any], str, bool], object],
) -> tuple[GossipService, FakeSwarm]:
    swarm = FakeSwarm()
    gossip = GossipService(cast(SwarmService, swarm), handler)
    gossip.startService()
    return gossip, swarm


def test_encoding_is_compact_json_in_field_order() -> None:
    """A message is compact JSON with the ten fields in the protocol's order."""
    data = encode_ref_update(an_update(extra="dropped"), NODE.did)

    assert b" " not in data
    assert list(json.loads(data)) == list(REF_UPDATE_FIELDS)


def test_encoding_fills_in_the_node_did() -> None:
    """An update naming no node is published under this node's DID."""
    update = an_update()
    del update["node_did"]

    assert json.loads(encode_ref_update(update, NODE.did))["node_did"] == NODE.did


@pytest.mark.parametrize("field", ["pusher_did", "timestamp", "old_sha"])
def test_encoding_needs_what_the_reference_node_reads(field: str) -> None:
    """A field the reference node cannot do without must be a string."""
    with pytest.raises(ValueError):
        encode_ref_update(an_update(**{field: None}), NODE.did)


def test_encoding_refuses_a_number_where_text_belongs() -> None:
    """Optional fields are strings or None."""
    with pytest.raises(ValueError):
        encode_ref_update(an_update(cid=5), NODE.did)


def test_decoding_keeps_only_the_known_fields() -> None:
    """Unknown keys are dropped and absent optional ones become None."""
    update = an_update(extra=1)
    del update["cid"], update["owner_did"]

    decoded = decode_ref_update(json.dumps(update).encode())

    assert set(decoded) == set(REF_UPDATE_FIELDS)
    assert decoded["cid"] is None and decoded["owner_did"] is None


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        json.dumps(an_update(repo=None)).encode(),
        json.dumps(an_update(new_sha=7)).encode(),
        json.dumps(an_update(cert_id=["x"])).encode(),
        b" " * (MAX_MESSAGE_BYTES + 1),
    ],
)
def test_decoding_refuses_what_is_not_a_ref_update(data: bytes) -> None:
    """Malformed, incomplete, mistyped or oversized messages are refused."""
    with pytest.raises(ValueError):
        decode_ref_update(data)


class GossipServiceTests(SynchronousTestCase):
    """
    GossipService between a fake swarm and a recording handler.
    """

    def setUp(self) -> None:
        self.received: list[tuple[dict[str, Any], str, bool]] = []
        self.gossip, self.swarm = started_gossip(
            lambda u, p, v: self.received.append((u, p, v))
        )

    def test_publish_sends_json_on_the_topic(self) -> None:
        """publish() hands the encoded update to the swarm on the ref-updates topic."""
        d = self.gossip.publish(an_update())

        self.successResultOf(d)
        [(topic, data)] = self.swarm.published
        self.assertEqual(topic, REF_UPDATES_TOPIC)
        self.assertEqual(json.loads(data), an_update())

    def test_publish_of_an_incomplete_update_fails(self) -> None:
        """An update that cannot be published fails the Deferred, sending nothing."""
        d = self.gossip.publish(an_update(repo=None))

        self.failureResultOf(d, ValueError)
        self.assertEqual(self.swarm.published, [])

    def test_update_signed_by_its_node_is_verified(self) -> None:
        """A message signed by the key of the node_did it names is verified."""
        self.swarm.deliver(json.dumps(an_update()).encode(), signer=OTHER)

        [(update, signer, verified)] = self.received
        self.assertEqual(
            (update["repo"], signer, verified), (an_update()["repo"], OTHER.did, True)
        )

    def test_update_naming_another_node_is_not_verified(self) -> None:
        """A message naming a node_did not its signer's is handed on unverified."""
        self.swarm.deliver(
            json.dumps(an_update(node_did=NODE.did)).encode(), signer=OTHER
        )

        [(update, signer, verified)] = self.received
        self.assertEqual(
            (update["node_did"], signer, verified), (NODE.did, OTHER.did, False)
        )

    def test_short_node_did_is_verified(self) -> None:
        """A node_did given in its short form still names its signer."""
        self.swarm.deliver(
            json.dumps(an_update(node_did=OTHER.short)).encode(), signer=OTHER
        )

        self.assertTrue(self.received[0][2])

    def test_node_did_that_is_not_a_did_is_not_verified(self) -> None:
        """A node_did that is not a did:key cannot be verified."""
        self.swarm.deliver(
            json.dumps(an_update(node_did="did:web:x")).encode(), signer=OTHER
        )

        self.assertFalse(self.received[0][2])

    def test_malformed_message_is_dropped(self) -> None:
        """A message that is not a ref update never reaches the handler."""
        self.swarm.deliver(b"{}", signer=OTHER)

        self.assertEqual(self.received, [])

    def test_signer_without_a_did_is_dropped(self) -> None:
        """A message signed by a key that is not Ed25519 cannot be attributed."""
        handler = self.swarm.handlers[REF_UPDATES_TOPIC]

        handler(
            PubsubMessage(
                REF_UPDATES_TOPIC,
                json.dumps(an_update()).encode(),
                "QmNotEd25519",
                b"1",
            )
        )

        self.assertEqual(self.received, [])

    def test_nothing_is_handed_on_after_stop(self) -> None:
        """Once stopped, the service ignores messages."""
        self.successResultOf(self.gossip.stopService())

        self.swarm.deliver(json.dumps(an_update()).encode(), signer=OTHER)

        self.assertEqual(self.received, [])


class HandlerResultTests(SynchronousTestCase):
    """
    What GossipService does with what the handler returns.
    """

    def test_stop_waits_for_a_pending_handler(self) -> None:
        """stopService fires only once a handler's Deferred has fired."""
        pending: Deferred[None] = Deferred()
        gossip, swarm = started_gossip(lambda u, p, v: pending)
        swarm.deliver(json.dumps(an_update()).encode(), signer=OTHER)

        stopped = gossip.stopService()
        self.assertNoResult(stopped)
        pending.callback(None)

        self.successResultOf(stopped)

    def test_coroutine_handler_runs(self) -> None:
        """A handler may be a coroutine function."""
        seen: list[str] = []

        async def handler(update: dict[str, Any], signer: str, verified: bool) -> None:
            seen.append(signer)

        gossip, swarm = started_gossip(handler)
        swarm.deliver(json.dumps(an_update()).encode(), signer=OTHER)

        self.assertEqual(seen, [OTHER.did])
        self.successResultOf(gossip.stopService())

    def test_failing_handler_is_logged(self) -> None:
        """A handler that raises is logged and the next message still arrives."""
        calls: list[int] = []

        def handler(update: dict[str, Any], signer: str, verified: bool) -> None:
            calls.append(1)
            raise RuntimeError("database down")

        _, swarm = started_gossip(handler)
        swarm.deliver(json.dumps(an_update()).encode(), signer=OTHER)
        swarm.deliver(json.dumps(an_update()).encode(), signer=OTHER)

        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_failed_handler_deferred_is_logged(self) -> None:
        """A handler's failed Deferred is logged, and the stop still completes."""
        gossip, swarm = started_gossip(
            lambda u, p, v: Deferred.fromCoroutine(fail_later())
        )
        swarm.deliver(json.dumps(an_update()).encode(), signer=OTHER)

        self.successResultOf(gossip.stopService())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


async def fail_later() -> None:
    raise RuntimeError("constraint violated")
