"""
Keeping in touch with peers (PROTOCOL.md section 9): announcing this node to
the bootstrap peers, and checking every known peer's liveness.

This module holds the peer part of the node's heartbeat; the operator's
on-chain heartbeat is a separate concern.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gitlawb.db.service import DatabaseService, DatabaseUnavailable
from gitlawb.identity.keys import InvalidDid, full_did
from gitlawb.peers import (
    PeerClient,
    PeerError,
    list_peers,
    record_peer,
    record_reachability,
)
from gitlawb.workloop import InFlight

__all__ = ["HeartbeatService"]


class HeartbeatService(Service):
    """
    Announces this node to C{bootstrap_peers} at start and every
    C{announce_interval} seconds after, and fetches every known peer's
    C{/health} every C{ping_interval} seconds (any 2xx marks it reachable
    and seen).

    A bootstrap peer that answers is recorded as a peer under the DID it
    names, at the URL this node dialled.  Nothing here delays start-up: the
    first round runs in the background once the database is up, and every
    call is bounded by the peer client.

    @param repo_count: how many repositories this node holds, for the
        announce body.
    """

    name = "heartbeat"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        database: DatabaseService,
        client: PeerClient,
        *,
        public_url: Callable[[], str],
        bootstrap_peers: Sequence[str] = (),
        repo_count: Callable[[], Awaitable[int | None]] | None = None,
        announce_interval: float = 300.0,
        ping_interval: float = 300.0,
        max_parallel: int = 16,
        clock: IReactorTime | None = None,
    ) -> None:
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._database = database
        self._client = client
        self._public_url = public_url
        self._bootstrap = list(
            dict.fromkeys(url.rstrip("/") for url in bootstrap_peers)
        )
        self._repo_count = repo_count
        self._announce_interval = announce_interval
        self._ping_interval = ping_interval
        self._parallel = DeferredSemaphore(max_parallel)
        self._announcing = LoopingCall(self._round, self.announce_all)
        self._announcing.clock = self._clock
        self._pinging = LoopingCall(self._round, self.ping_all)
        self._pinging.clock = self._clock
        self._rounds: set[Deferred[None]] = set()
        self._in_flight = InFlight()

    def startService(self) -> None:
        super().startService()
        self._in_flight = InFlight()
        if self._bootstrap:
            self._announcing.start(self._announce_interval, now=True)
        # The first liveness check waits a full interval: peers were just
        # announced to, or announced themselves.
        self._pinging.start(self._ping_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """
        Stop the timers and cut the calls to peers in progress (announces
        and pings are repeated anyway; none leaves anything half-written).

        @return: a Deferred that fires when no round runs.
        """
        super().stopService()
        for loop in (self._announcing, self._pinging):
            if loop.running:
                loop.stop()
        self._in_flight.cut()
        rounds = list(self._rounds)
        if not rounds:
            return succeed(None)
        done: Deferred[Any] = DeferredList(rounds, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def _round(self, work: Callable[[], Awaitable[Any]]) -> None:
        """
        Start one round in the background (the looping call never waits for
        it, so a slow round cannot stall the timer or the start).
        """

        async def run() -> None:
            await work()

        running = Deferred.fromCoroutine(run())
        self._rounds.add(running)

        def finished(result: object) -> None:
            self._rounds.discard(running)
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("peer heartbeat round failed", result)

        running.addBoth(finished)

    async def _database_ready(self) -> None:
        await self._database.when_ready()

    async def announce_all(self) -> int:
        """
        Announce this node to every bootstrap peer.

        @return: how many accepted.
        """
        await self._in_flight.run(self._database_ready())
        count = None
        if self._repo_count is not None:
            try:
                count = await self._repo_count()
            except Exception:
                count = None
        body: dict[str, Any] = {
            "did": self._client.key.did,
            "http_url": self._public_url(),
        }
        if count is not None:
            body["repo_count"] = count
        calls = [
            Deferred.fromCoroutine(self.announce(url, body)) for url in self._bootstrap
        ]
        results = await DeferredList(calls, consumeErrors=True)
        return sum(1 for ok, accepted in results if ok and accepted)

    async def announce(self, url: str, body: dict[str, Any]) -> bool:
        """
        Announce this node to one peer and record the peer from its answer.

        @return: whether it accepted.
        """
        await self._parallel.acquire()
        try:
            response = await self._in_flight.run(
                self._client.request(
                    "POST",
                    self._client.url_for(url, "/api/v1/peers/announce"),
                    json_body=body,
                )
            )
            answer = response.json() if response.ok else None
        except PeerError as e:
            self.log.warn("announce to {url} failed: {error}", url=url, error=e)
            return False
        finally:
            self._parallel.release()
        if not isinstance(answer, dict):
            self.log.warn(
                "announce to {url} refused status={status} body={body}",
                url=url,
                status=response.status,
                body=response.body[:200],
            )
            return False
        try:
            peer_did = full_did(str(answer.get("node_did", "")))
        except (InvalidDid, ValueError):
            self.log.warn("peer {url} answered without a valid node_did", url=url)
            return True
        if peer_did == self._client.key.did:
            self.log.warn("bootstrap peer {url} is this node itself", url=url)
            return True
        recorded = await record_peer(
            self._database.database, peer_did, url, signed=False
        )
        self.log.info(
            "announced to {url} peer={did} recorded={recorded}",
            url=url,
            did=peer_did,
            recorded=recorded,
        )
        return True

    async def ping_all(self) -> int:
        """
        Check every known peer's liveness and record it.

        @return: how many are reachable.
        """
        try:
            db = self._database.database
        except DatabaseUnavailable:
            return 0
        peers = await list_peers(db, limit=10_000)
        calls = [
            Deferred.fromCoroutine(self._ping(peer.did, peer.http_url))
            for peer in peers
        ]
        results = await DeferredList(calls, consumeErrors=True)
        return sum(1 for ok, reachable in results if ok and reachable)

    async def _ping(self, did: str, url: str) -> bool:
        await self._parallel.acquire()
        try:
            reachable = await self._in_flight.run(self._client.is_healthy(url))
        finally:
            self._parallel.release()
        await record_reachability(self._database.database, did, reachable)
        return reachable
