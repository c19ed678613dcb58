"""
Ref-update gossip: one GossipSub topic, one JSON message per updated ref.

    {"node_did", "pusher_did", "repo", "owner_did", "ref_name", "old_sha",
     "new_sha", "timestamp", "cert_id", "cid"}

Messages are signed by the publishing host's key (strict message signing),
and a node's host key is its node key. A received message is therefore
I{verified} when the DID of the key that signed it is the C{node_did} it
names; otherwise it is still handed on, marked unverified, and the sync layer
decides what an unverified update is worth.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gitlawb.identity.keys import InvalidDid, full_did
from gitlawb.jsontools import parse_json
from gitlawb.p2p.peer_id import InvalidPeerId, did_for_peer_id
from gitlawb.p2p.swarm import PubsubMessage, SwarmService

__all__ = [
    "MAX_MESSAGE_BYTES",
    "REF_UPDATES_TOPIC",
    "REF_UPDATE_FIELDS",
    "GossipService",
    "RefUpdateHandler",
    "decode_ref_update",
    "encode_ref_update",
]

REF_UPDATES_TOPIC = "gitlawb/ref-updates/v1"

REF_UPDATE_FIELDS = (
    "node_did",
    "pusher_did",
    "repo",
    "owner_did",
    "ref_name",
    "old_sha",
    "new_sha",
    "timestamp",
    "cert_id",
    "cid",
)

# What a message we publish must carry: the reference node cannot read an
# update without any of these strings. owner_did, cert_id and cid may be null.
_REQUIRED_TO_PUBLISH = (
    "node_did",
    "pusher_did",
    "repo",
    "ref_name",
    "old_sha",
    "new_sha",
    "timestamp",
)
# What a received message must carry to be of any use.
_REQUIRED_TO_RECEIVE = ("node_did", "repo", "ref_name", "new_sha")

# A ref update is a few hundred bytes; anything far larger is not one.
MAX_MESSAGE_BYTES = 64 * 1024

RefUpdateHandler = Callable[[dict[str, Any], str, bool], object]
"""
C{on_ref_update(update, from_peer_did, verified)}: called in the reactor
thread for each ref update another node published. C{update} has every key
of L{REF_UPDATE_FIELDS} (absent ones are C{None}); C{from_peer_did} is the
DID of the key that signed the message; C{verified} says whether that is
C{update["node_did"]}. It may return a Deferred or a coroutine: the service
waits for those before it stops.
"""


def encode_ref_update(update: Mapping[str, Any], node_did: str) -> bytes:
    """
    The gossip message of C{update}: compact JSON with the fields of
    L{REF_UPDATE_FIELDS} in that order. C{node_did} is used when the update
    names none.

    @raise ValueError: when a field the reference node needs is missing or
        is not a string, or an optional one is neither a string nor C{None}.
    """
    message = {name: update.get(name) for name in REF_UPDATE_FIELDS}
    if message["node_did"] is None:
        message["node_did"] = node_did
    for name in REF_UPDATE_FIELDS:
        value = message[name]
        if name in _REQUIRED_TO_PUBLISH and not isinstance(value, str):
            raise ValueError(f"a ref update needs {name} as a string")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string or None")
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def decode_ref_update(data: bytes) -> dict[str, Any]:
    """
    Read a gossip message: a JSON object whose C{node_did}, C{repo},
    C{ref_name} and C{new_sha} are strings, and whose other fields of
    L{REF_UPDATE_FIELDS} are strings or absent or null. Other keys are
    dropped.

    @return: a dict with every key of L{REF_UPDATE_FIELDS}.
    @raise ValueError: when C{data} is not such a message.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes is too large")
    try:
        parsed = parse_json(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    update = {name: parsed.get(name) for name in REF_UPDATE_FIELDS}
    for name, value in update.items():
        if name in _REQUIRED_TO_RECEIVE and not isinstance(value, str):
            raise ValueError(f"{name} is missing or not a string")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} is not a string")
    return update


def _signer_names_itself(update: Mapping[str, Any], signer_did: str) -> bool:
    try:
        return full_did(str(update["node_did"])) == signer_did
    except InvalidDid:
        return False


class GossipService(Service):
    """
    Publishes this node's ref updates and hands on other nodes' ones.

    Build it before the swarm starts: it subscribes to L{REF_UPDATES_TOPIC}
    then.
    """

    log = Logger()
    name = "gossip"

    def __init__(
        self,
        swarm: SwarmService,
        on_ref_update: RefUpdateHandler,
    ) -> None:
        self._swarm = swarm
        self._on_ref_update = on_ref_update
        self._pending: set[Deferred[object]] = set()
        swarm.subscribe(REF_UPDATES_TOPIC, self._received)

    def publish(self, update: Mapping[str, Any]) -> Deferred[None]:
        """
        Publish one ref update (the keys of L{REF_UPDATE_FIELDS}; C{node_did}
        defaults to this node's DID).

        @return: a Deferred that fires with C{None} once the message has left
            for the peers' queues; it fails with C{ValueError} for an update
            that cannot be published, or with
            L{gitlawb.p2p.swarm.SwarmNotRunning}.
        """
        try:
            data = encode_ref_update(update, self._swarm.did)
        except ValueError:
            return fail()
        return self._swarm.publish(REF_UPDATES_TOPIC, data)

    def stopService(self) -> Deferred[None]:
        """
        Stop handing on updates.

        @return: a Deferred that fires with C{None} once the handlers still
            running for earlier updates have finished.
        """
        super().stopService()
        if not self._pending:
            return succeed(None)
        done: Deferred[None] = DeferredList(
            list(self._pending), consumeErrors=True
        ).addCallback(lambda _: None)
        return done

    def _received(self, message: PubsubMessage) -> None:
        if not self.running:
            return
        try:
            signer_did = did_for_peer_id(message.from_peer_id)
        except InvalidPeerId:
            self.log.warn(
                "gossip: dropped a ref update signed by {peer}, which has no did:key",
                peer=message.from_peer_id,
            )
            return
        try:
            update = decode_ref_update(message.data)
        except ValueError as e:
            self.log.warn(
                "gossip: dropped a malformed ref update from {peer}: {error}",
                peer=signer_did,
                error=str(e),
            )
            return

        verified = _signer_names_itself(update, signer_did)
        self.log.info(
            "gossip: ref update repo={repo} ref={ref} new={new} node={node} "
            "signer={signer} verified={verified}",
            repo=update["repo"],
            ref=update["ref_name"],
            new=update["new_sha"],
            node=update["node_did"],
            signer=signer_did,
            verified=verified,
        )
        self._hand_on(update, signer_did, verified)

    def _hand_on(self, update: dict[str, Any], signer_did: str, verified: bool) -> None:
        try:
            result = self._on_ref_update(update, signer_did, verified)
        except Exception:
            self.log.failure("gossip: ref update handler failed")
            return
        if isinstance(result, Coroutine):
            result = Deferred.fromCoroutine(result)
        if not isinstance(result, Deferred):
            return

        def failed(failure: Failure) -> None:
            self.log.failure(
                "gossip: ref update handler failed", failure, repo=update["repo"]
            )

        def finished(_: object) -> None:
            self._pending.discard(result)

        self._pending.add(result)
        result.addErrback(failed).addBoth(finished)
