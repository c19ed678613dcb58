"""Unit tests for the peer heartbeat, on a Clock with StubTreq peers."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from gitlawb.heartbeat import HeartbeatService
from gitlawb.identity.keys import NodeKey
from gitlawb.peers import PeerClient

NODE = NodeKey.from_seed(bytes(range(32)))
BOOTSTRAP = NodeKey.from_seed(bytes(range(1, 33))).did


class FakeDatabase:
    """
    Records statements; answers the peer list and C{RETURNING did}.
    """

    def __init__(self, peers: list[dict[str, Any]] | None = None) -> None:
        self.peers = peers or []
        self.statements: list[tuple[str, Any]] = []

    async def query(self, sql: str, params: Any = None) -> list[Any]:
        self.statements.append((sql, params))
        if sql.startswith("SELECT"):
            return self.peers
        return [{"did": params["did"]}]

    async def execute(self, sql: str, params: Any = None) -> None:
        self.statements.append((sql, params))


class FakeDatabaseService:
    def __init__(self, database: FakeDatabase) -> None:
        self.database = database

    def when_ready(self) -> Deferred[FakeDatabase]:
        return succeed(self.database)


class Network(Resource):
    """
    Peers by host name: the bootstrap node accepts announces, C{up.test}
    is healthy, everything else answers 503.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []

    def render(self, request: IRequest) -> bytes:
        host = (request.getHeader(b"host") or b"").decode()
        self.calls.append((request.method.decode(), host, request.uri.decode()))
        if host == "boot.test" and request.uri == b"/api/v1/peers/announce":
            return json.dumps({"status": "accepted", "node_did": BOOTSTRAP}).encode()
        if host == "up.test":
            return b'{"status": "ok"}'
        request.setResponseCode(503)
        return b"{}"


class Silent:
    def __init__(self) -> None:
        self.cancelled = 0

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred(lambda _: self._cancel())

    def _cancel(self) -> None:
        self.cancelled += 1


def peer_row(did: str, url: str) -> dict[str, Any]:
    return {
        "did": did,
        "http_url": url,
        "reachable": True,
        "signed": False,
        "last_seen": None,
        "repo_count": None,
    }


class HeartbeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def heartbeat(self, http: Any, database: FakeDatabase) -> HeartbeatService:
        client = PeerClient(
            self.clock, NODE, http=http, clock=self.clock, allow_private=True
        )
        return HeartbeatService(
            self.clock,
            FakeDatabaseService(database),  # type: ignore[arg-type]
            client,
            public_url=lambda: "http://me.test",
            bootstrap_peers=["http://boot.test/"],
            clock=self.clock,
        )

    def test_start_announces_and_records_the_bootstrap_peer(self) -> None:
        """At start the node announces itself and records the peer that answered."""
        network, database = Network(), FakeDatabase()
        http = StubTreq(network)

        self.heartbeat(http, database).startService()
        http.flush()

        assert network.calls == [("POST", "boot.test", "/api/v1/peers/announce")]
        inserts = [p for sql, p in database.statements if "INSERT INTO peers" in sql]
        assert inserts == [
            {
                "did": BOOTSTRAP,
                "url": "http://boot.test",
                "count": None,
                "signed": False,
            }
        ]

    def test_silent_bootstrap_peer_does_not_hold_up_start(self) -> None:
        """A silent bootstrap peer costs one bounded call in the background."""
        silent, database = Silent(), FakeDatabase()
        service = self.heartbeat(silent, database)

        service.startService()
        assert service.running
        self.clock.advance(5)

        assert silent.cancelled == 1
        assert database.statements == []
        self.successResultOf(service.stopService())

    def test_ping_records_reachability(self) -> None:
        """Every ping interval each peer's /health decides whether it is reachable."""
        http = StubTreq(Network())
        database = FakeDatabase(
            [
                peer_row("did:key:up", "http://up.test"),
                peer_row("did:key:dn", "http://dn.test"),
            ]
        )
        service = self.heartbeat(http, database)
        service.startService()
        http.flush()

        self.clock.advance(300)
        http.flush()

        updates = sorted(
            (p["did"], p["reachable"])
            for sql, p in database.statements
            if sql.startswith("UPDATE peers")
        )
        assert updates == [("did:key:dn", False), ("did:key:up", True)]
        self.successResultOf(service.stopService())

    def test_stop_cuts_calls_and_leaves_no_timer(self) -> None:
        """Stopping cancels the calls in flight at once and leaves no timer behind."""
        silent = Silent()
        service = self.heartbeat(silent, FakeDatabase())
        service.startService()

        stopped = service.stopService()

        self.successResultOf(stopped)
        assert silent.cancelled == 1
        assert self.clock.getDelayedCalls() == []
