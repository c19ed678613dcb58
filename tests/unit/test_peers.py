"""Unit tests for gitlawb.peers: peer addresses, the peer client, the relay."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from gitlawb.identity.keys import NodeKey
from gitlawb.identity.signatures import content_digest, verify_signed_request
from gitlawb.peers import (
    OutboxItem,
    OutboxRelay,
    Peer,
    PeerAddressRefused,
    PeerClient,
    PeerError,
    PeerTimeout,
    PublicAddressEndpoints,
    backoff_delay,
    normalise_peer_url,
    resolve_public,
)

NODE = NodeKey.from_seed(bytes(range(32)))


class Peerish(Resource):
    """
    A peer that records every request and answers with a fixed status.
    """

    isLeaf = True

    def __init__(self, status: int = 200, body: bytes = b'{"status":"ok"}') -> None:
        super().__init__()
        self.status = status
        self.body = body
        self.requests: list[dict[str, Any]] = []

    def render(self, request: IRequest) -> bytes:
        assert request.content is not None
        body = request.content.read()

        def header(name: str) -> str | None:
            value = request.getHeader(name.encode("ascii"))
            return None if value is None else value.decode("latin-1")

        signer = verify_signed_request(
            method=request.method.decode(),
            target=request.uri.decode(),
            headers=header,
            body_digest=content_digest(body) if body else None,
            now=0,
            replay=None,
        ).signer_did
        self.requests.append(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "signer": signer,
                "body": json.loads(body) if body else None,
                "host": header("host"),
            }
        )
        request.setResponseCode(self.status)
        if self.status in (301, 302):
            request.setHeader(b"location", b"http://127.0.0.1/elsewhere")
        return self.body


class Silent:
    """
    An HTTP client whose requests are never answered.
    """

    def __init__(self) -> None:
        self.cancelled = 0

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        def cancelled(_: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancelled)


def client(http: Any, clock: Clock | None = None, **kwargs: Any) -> PeerClient:
    return PeerClient(
        Clock(),
        NODE,
        http=http,
        clock=clock or Clock(),
        allow_private=kwargs.pop("allow_private", True),
        **kwargs,
    )


def result_of(testcase: SynchronousTestCase, work: Any) -> Any:
    return testcase.successResultOf(Deferred.fromCoroutine(work))


# -- addresses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://node.example.com/", "https://node.example.com"),
        ("http://8.8.8.8:7545", "http://8.8.8.8:7545"),
        ("HTTPS://node.example.com/base/", "https://node.example.com/base"),
    ],
)
def test_public_peer_urls_are_accepted(url: str, expected: str) -> None:
    """A public http(s) URL is accepted without its trailing slash."""
    assert normalise_peer_url(url, allow_private=False) == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://node.example.com",
        "http://",
        "https://user:pw@node.example.com",
        "https://node.example.com/?x=1",
        "https://node.example.com/#f",
        "http://127.0.0.1:7545",
        "http://10.1.2.3",
        "http://192.168.0.1",
        "http://169.254.169.254",
        "http://100.64.0.1",
        "http://[::1]:7545",
        "http://[fe80::1]",
        "http://[::ffff:127.0.0.1]",
        "http://localhost:7545",
        "http://box.local",
        "http://metadata.google.internal",
        "http://node.example.com:99999",
    ],
)
def test_private_or_malformed_peer_urls_are_refused(url: str) -> None:
    """Non-public hosts, credentials, queries and other schemes are refused."""
    with pytest.raises(PeerAddressRefused):
        normalise_peer_url(url, allow_private=False)


def test_private_peer_urls_are_accepted_when_allowed() -> None:
    """A private cluster may use loopback peers."""
    assert normalise_peer_url("http://127.0.0.1:7545/", allow_private=True) == (
        "http://127.0.0.1:7545"
    )


class PublicEndpointTests(SynchronousTestCase):
    def endpoint(self, reactor: MemoryReactor, address: str) -> Any:
        def resolve(host: str, port: int) -> Deferred[list[str]]:
            return succeed([address])

        factory = PublicAddressEndpoints(reactor, 5.0, resolve)
        return factory.endpointForURI(URI.fromBytes(b"http://node.example:7545/x"))

    def test_connects_to_the_checked_address(self) -> None:
        """The connection goes to the address that was checked, not a new lookup."""
        reactor = MemoryReactor()

        self.endpoint(reactor, "93.184.216.34").connect(Factory())

        assert [c[:2] for c in reactor.tcpClients] == [("93.184.216.34", 7545)]

    def test_refuses_a_name_resolving_to_loopback(self) -> None:
        """A name that resolves to loopback is never connected to."""
        reactor = MemoryReactor()

        d = self.endpoint(reactor, "127.0.0.1").connect(Factory())

        self.failureResultOf(d, PeerAddressRefused)
        assert reactor.tcpClients == []


class ResolveTests(SynchronousTestCase):
    def test_name_resolving_to_private_address_is_refused(self) -> None:
        """A public-looking name that resolves to loopback is refused."""

        def resolve(host: str, port: int) -> Deferred[list[str]]:
            return succeed(["93.184.216.34", "127.0.0.1"])

        work = resolve_public("sneaky.example", 80, resolve, allow_private=False)

        self.failureResultOf(Deferred.fromCoroutine(work), PeerAddressRefused)

    def test_name_resolving_to_public_address_is_accepted(self) -> None:
        """A name resolving only to public addresses passes."""

        def resolve(host: str, port: int) -> Deferred[list[str]]:
            return succeed(["93.184.216.34"])

        work = resolve_public("node.example", 80, resolve, allow_private=False)

        assert result_of(self, work) == ["93.184.216.34"]


# -- the client -------------------------------------------------------------------


class PeerClientTests(SynchronousTestCase):
    def test_calls_are_signed_by_the_node(self) -> None:
        """Every call carries the node's signature over method, path and body."""
        peer = Peerish()
        http = StubTreq(peer)

        work = client(http).request(
            "POST", "http://peer.test/api/v1/sync/notify?x=1", json_body={"a": 1}
        )
        d = Deferred.fromCoroutine(work)
        http.flush()

        assert self.successResultOf(d).ok
        assert peer.requests == [
            {
                "method": "POST",
                "uri": "/api/v1/sync/notify?x=1",
                "signer": NODE.did,
                "body": {"a": 1},
                "host": "peer.test",
            }
        ]

    def test_redirects_are_answers_not_followed(self) -> None:
        """A redirect is returned as it is; its target is never called."""
        peer = Peerish(status=302, body=b"")
        http = StubTreq(peer)

        d = Deferred.fromCoroutine(client(http).request("GET", "http://peer.test/x"))
        http.flush()

        assert self.successResultOf(d).status == 302
        assert len(peer.requests) == 1

    def test_call_is_cut_at_its_bound(self) -> None:
        """A peer that never answers costs the timeout; the call is cancelled."""
        clock, silent = Clock(), Silent()
        d = Deferred.fromCoroutine(
            client(silent, clock, timeout=5).request("GET", "http://peer.test/health")
        )

        clock.advance(4.9)
        assert not d.called
        clock.advance(0.1)

        self.failureResultOf(d, PeerTimeout)
        assert silent.cancelled == 1
        assert clock.getDelayedCalls() == []

    def test_large_answers_are_refused(self) -> None:
        """An answer over the size bound fails the call."""
        http = StubTreq(Peerish(body=b"x" * 2000))

        d = Deferred.fromCoroutine(
            client(http, max_body=1000).request("GET", "http://peer.test/x")
        )
        http.flush()

        self.failureResultOf(d, PeerError)

    def test_private_peer_refused_before_any_call(self) -> None:
        """Without private peers allowed, a loopback URL is never called."""
        peer = Peerish()
        http = StubTreq(peer)

        d = Deferred.fromCoroutine(
            client(http, allow_private=False).request("GET", "http://127.0.0.1/x")
        )

        self.failureResultOf(d, PeerAddressRefused)
        assert peer.requests == []

    def test_health_is_any_2xx(self) -> None:
        """A peer is healthy when /health answers 2xx, not otherwise."""
        healthy, sick = StubTreq(Peerish(status=204)), StubTreq(Peerish(status=503))

        good = Deferred.fromCoroutine(client(healthy).is_healthy("http://a.test"))
        bad = Deferred.fromCoroutine(client(sick).is_healthy("http://b.test"))
        healthy.flush()
        sick.flush()

        assert self.successResultOf(good) is True
        assert self.successResultOf(bad) is False


def test_backoff_doubles_up_to_its_maximum() -> None:
    """The retry delay doubles from the initial value and stops at the maximum."""
    delays = [backoff_delay(n, 2.0, 30.0) for n in range(1, 7)]

    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


# -- the relay ----------------------------------------------------------------------


class MemoryRelayStore:
    """
    The relay's rows in memory, with the outcome of each recorded.
    """

    def __init__(self, payloads: Sequence[dict[str, Any]], peers: list[Peer]) -> None:
        self.rows: dict[int, dict[str, Any]] = {
            n + 1: {"payload": p, "attempts": 0, "state": "due"}
            for n, p in enumerate(payloads)
        }
        self._peers = peers
        self.outcomes: list[tuple[str, int, Any]] = []

    async def claim(self, limit: int, lease: float) -> list[OutboxItem]:
        items: list[OutboxItem] = []
        for item_id, row in self.rows.items():
            if row["state"] == "due" and len(items) < limit:
                row["attempts"] += 1
                row["state"] = "claimed"
                items.append(OutboxItem(item_id, row["payload"], row["attempts"]))
        return items

    async def peers(self) -> list[Peer]:
        return list(self._peers)

    async def done(self, item: OutboxItem, note: str | None) -> None:
        self.rows[item.id]["state"] = "done"
        self.outcomes.append(("done", item.id, note))

    async def retry(self, item: OutboxItem, delay: float, error: str) -> None:
        self.rows[item.id]["state"] = "due"
        self.outcomes.append(("retry", item.id, delay))

    async def release(self, items: Sequence[OutboxItem]) -> None:
        for item in items:
            self.rows[item.id]["state"] = "due"
            self.rows[item.id]["attempts"] -= 1
            self.outcomes.append(("release", item.id, None))


PAYLOAD = {"node_did": NODE.did, "repo": "z6Mk/x", "ref_name": "refs/heads/main"}
PEERS = [Peer("did:key:z6MkA", "http://a.test"), Peer("did:key:z6MkB", "http://b.test")]


def relay(
    store: MemoryRelayStore,
    http: Any,
    clock: Clock,
    timeout: float = 5.0,
    **kwargs: Any,
) -> OutboxRelay:
    peer_client = client(http, clock, timeout=timeout)
    return OutboxRelay(clock, store, peer_client, clock=clock, **kwargs)


class OutboxRelayTests(SynchronousTestCase):
    def test_row_is_sent_to_every_peer_and_marked_done(self) -> None:
        """Each reachable peer gets one signed notify; then the row is done."""
        peer, clock = Peerish(), Clock()
        http = StubTreq(peer)
        store = MemoryRelayStore([PAYLOAD], PEERS)

        d = Deferred.fromCoroutine(relay(store, http, clock).relay_due())
        http.flush()

        assert self.successResultOf(d) is True
        assert sorted(r["host"] for r in peer.requests) == ["a.test", "b.test"]
        assert {r["uri"] for r in peer.requests} == {"/api/v1/sync/notify"}
        assert all(r["body"] == PAYLOAD for r in peer.requests)
        assert store.outcomes == [("done", 1, None)]

    def test_unreachable_peer_means_retry_with_backoff(self) -> None:
        """A 5xx answer schedules the row again after the backoff delay."""
        clock = Clock()
        http = StubTreq(Peerish(status=503))
        store = MemoryRelayStore([PAYLOAD], PEERS)
        service = relay(store, http, clock, backoff_initial=2.0)

        for _ in range(3):
            d = Deferred.fromCoroutine(service.relay_due())
            http.flush()
            self.successResultOf(d)

        assert store.outcomes == [
            ("retry", 1, 2.0),
            ("retry", 1, 4.0),
            ("retry", 1, 8.0),
        ]

    def test_gives_up_after_max_attempts(self) -> None:
        """After the last attempt the row is closed with its error."""
        clock = Clock()
        http = StubTreq(Peerish(status=500))
        store = MemoryRelayStore([PAYLOAD], PEERS[:1])
        service = relay(store, http, clock, max_attempts=2)

        for _ in range(2):
            d = Deferred.fromCoroutine(service.relay_due())
            http.flush()
            self.successResultOf(d)

        kind, item_id, note = store.outcomes[-1]
        assert (kind, item_id) == ("done", 1)
        assert note.startswith("gave up after 2")

    def test_refusal_by_a_peer_is_final(self) -> None:
        """A 4xx answer is the peer's last word: the row is done, not retried."""
        clock = Clock()
        http = StubTreq(Peerish(status=403, body=b'{"error":"forbidden"}'))
        store = MemoryRelayStore([PAYLOAD], PEERS)

        d = Deferred.fromCoroutine(relay(store, http, clock).relay_due())
        http.flush()

        self.successResultOf(d)
        assert store.outcomes == [("done", 1, None)]

    def test_gossip_gets_each_row_and_its_failures_are_not_retried(self) -> None:
        """Gossip sees every payload; a failed publish does not hold the row."""
        clock = Clock()
        http = StubTreq(Peerish())
        published: list[dict[str, Any]] = []

        def publish(payload: dict[str, Any]) -> Deferred[None]:
            published.append(payload)
            return Deferred.fromCoroutine(_raise(RuntimeError("no mesh")))

        store = MemoryRelayStore([PAYLOAD], [])
        service = relay(store, http, clock, gossip_publish=publish)

        d = Deferred.fromCoroutine(service.relay_due())
        http.flush()

        self.successResultOf(d)
        assert published == [PAYLOAD]
        assert store.outcomes == [("done", 1, None)]

    def test_stop_cuts_sends_at_the_grace_deadline_and_hands_rows_back(self) -> None:
        """A stop waits up to the grace period, then cancels and releases."""
        clock, silent = Clock(), Silent()
        store = MemoryRelayStore([PAYLOAD, PAYLOAD], PEERS[:1])
        service = relay(store, silent, clock, timeout=60.0, grace=10.0)
        service.startService()

        stopped = service.stopService()
        clock.advance(9)
        assert not stopped.called
        clock.advance(1)

        self.successResultOf(stopped)
        assert silent.cancelled == 2
        assert store.outcomes == [("release", 1, None), ("release", 2, None)]
        assert all(row["attempts"] == 0 for row in store.rows.values())
        assert service.cut_off == 2
        assert clock.getDelayedCalls() == []


async def _raise(error: Exception) -> None:
    raise error


def test_cancelled_error_is_not_a_peer_error() -> None:
    """A cancellation from outside the client is not reported as a timeout."""
    assert not issubclass(CancelledError, PeerError)


def test_repeated_signed_write_in_one_second_gets_a_new_signature() -> None:
    """The same signed write sent twice in one second is dated a second apart."""
    from twisted.internet.task import Clock

    from gitlawb.identity.keys import NodeKey
    from gitlawb.peers import PeerClient

    clock = Clock()
    clock.advance(1_000)
    client = PeerClient(clock, NodeKey.generate(), http=object(), clock=clock)

    first = client._created("PUT", "/api/v1/repos/o/r/replicas", b"{}")
    second = client._created("PUT", "/api/v1/repos/o/r/replicas", b"{}")
    other = client._created("PUT", "/api/v1/repos/o/other/replicas", b"{}")

    assert (first, second, other) == (1_000, 1_001, 1_000)
