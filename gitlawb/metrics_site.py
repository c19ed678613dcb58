"""
The metrics listener and the poller that keeps the gauges current.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.twisted import MetricsResource
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from gitlawb import metrics
from gitlawb.db.service import DatabaseService
from gitlawb.web import maybe_deferred


class MetricsSite(Service):
    """
    Serves C{GET /metrics} (Prometheus text format) from the node's own
    registry, on a listener of its own so the public port never serves it.

    The port is bound in C{privilegedStartService}: an address that cannot
    be bound stops start-up with one clear line.
    """

    name = "metrics"
    log = Logger()

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self._reactor = reactor
        self.host = host
        self.port = port
        self.listening: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.listening is not None:
            return
        families = metrics.families()
        assert families is not None, "metrics.initialise() runs before the site"
        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=families.registry))
        site = Site(root)
        site.noisy = False
        try:
            self.listening = self._reactor.listenTCP(
                self.port, site, interface=self.host
            )
        except CannotListenError as e:
            raise SystemExit(
                f"gitlawb: cannot listen on {self.host}:{self.port} "
                f"(GITLAWB_METRICS_ADDR): {e.socketError}"
            ) from None

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        super().startService()

    @property
    def bound_port(self) -> int:
        assert self.listening is not None
        return int(self.listening.getHost().port)  # type: ignore[attr-defined]

    def stopService(self) -> Deferred[None]:
        """
        Stop listening; a scrape in progress is small and is not waited for.

        @return: a Deferred that fires when the port is closed.
        """
        super().stopService()
        if self.listening is None:
            return succeed(None)
        listening, self.listening = self.listening, None
        return Deferred.fromCoroutine(maybe_deferred(listening.stopListening()))


class MetricsPoller(Service):
    """
    Every C{interval} seconds, reads what no event reports by itself: peers
    connected (from C{peer_count}), database pool connections in use, sync
    queue depth by status and webhook deliveries pending.
    """

    name = "metrics-poller"
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        database: DatabaseService,
        peer_count: Callable[[], int],
        interval: float = 15.0,
    ) -> None:
        self._database = database
        self._peer_count = peer_count
        self._interval = interval
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock
        self._running: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def poll(self) -> Deferred[None]:
        self._running = Deferred.fromCoroutine(self._poll())
        self._running.addErrback(lambda f: self.log.failure("metrics poll failed", f))
        return self._running

    async def _poll(self) -> None:
        families = metrics.families()
        if families is None:
            return
        families.peers_connected.set(self._peer_count())
        if not self._database.is_ready:
            return
        database = self._database.database
        families.db_connections_in_use.set(database.in_use)
        rows = await database.query(
            "SELECT status, count(*) AS n FROM sync_queue GROUP BY status"
        )
        depth = {row["status"]: row["n"] for row in rows}
        for status in ("pending", "running", "done", "failed", "rejected"):
            families.sync_queue_depth.labels(status=status).set(depth.get(status, 0))
        rows = await database.query(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
        )
        families.webhook_pending.set(rows[0][0])

    def stopService(self) -> Deferred[None]:
        """
        Stop polling; a poll in progress is awaited (it is a few queries).

        @return: a Deferred that fires when no poll runs.
        """
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        running = self._running
        if running is None or running.called:
            return succeed(None)
        return Deferred.fromCoroutine(_settled(running))


async def _settled(running: Deferred[None]) -> None:
    try:
        await running
    except Exception:
        pass
