"""
The HTTP listener of the node: a C{twisted.web} site that bounds request
bodies while they arrive, knows its connections and in-flight requests, and
drains them at shutdown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from gitlawb import metrics
from gitlawb.api.errors import json_bytes

log = Logger()


def body_limit_for(path: bytes, max_pack_bytes: int, max_json_bytes: int) -> int:
    """
    How many request body bytes a path may receive: a push pack up to the
    configured maximum, an upload-pack negotiation up to 64 MiB, a JSON body up
    to C{max_json_bytes}.
    """
    path = path.split(b"?", 1)[0]
    if path.endswith(b"/git-receive-pack"):
        return max_pack_bytes
    if path.endswith(b"/git-upload-pack"):
        return 64 * 1024 * 1024
    return max_json_bytes


async def maybe_deferred(result: Deferred[None] | None) -> None:
    """
    Await what a Twisted call returned when it is a Deferred (C{stopListening}
    may return C{None}).
    """
    if result is not None:
        await result


# How long a connection whose body was refused keeps draining before it is cut.
LINGER_SECONDS = 2.0


class NodeRequest(Request):
    """
    A request whose body is refused with 413 as soon as it is known to be too
    large: from C{Content-Length} before any of it is read (and before
    C{100 Continue} is sent), or while a chunked body arrives.
    """

    site: NodeSite
    _received = 0
    _limit = 0
    rejected = False

    def gotLength(self, length: int | None) -> None:
        path = getattr(self.channel, "_path", b"") or b""
        site: NodeSite = self.channel.site  # type: ignore[attr-defined]
        self._limit = site.body_limit(path)
        if length is not None and length > self._limit:
            # No "100 Continue": the client must not send a body we refuse.
            self.requestHeaders.removeHeader(b"expect")
            self._reject_too_large()
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.rejected:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._reject_too_large()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.rejected:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        site: NodeSite = self.channel.site  # type: ignore[attr-defined]
        site.request_started(self)
        super().process()

    def _reject_too_large(self) -> None:
        self.rejected = True
        body = json_bytes(
            {
                "error": "payload_too_large",
                "message": f"request body is larger than {self._limit} bytes",
            }
        )
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        # A lingering close: end our side after the answer but keep reading
        # (and discarding) what the client is still sending for a moment.
        # Closing at once would reset the connection with unread data in the
        # socket, and the client could lose the 413 before reading it.
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
            # The site's reactor (HTTPFactory.buildProtocol hands the channel
            # its callLater).
            self.channel.callLater(
                LINGER_SECONDS,
                transport.abortConnection,  # type: ignore[attr-defined]
            )
        else:
            transport.loseConnection()


class NodeSite(Site):
    """
    A site that keeps track of its connections and in-flight requests so that
    L{ApiSite} can drain them.
    """

    requestFactory = NodeRequest

    def __init__(
        self,
        resource: IResource,
        body_limit: Callable[[bytes], int],
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.body_limit = body_limit
        self.connections: set[Any] = set()
        self.in_flight: set[NodeRequest] = set()
        self.draining = False
        self._closed_waiters: list[Deferred[None]] = []

    #: Whether each request gets an access log line (C{GITLAWB_ACCESS_LOG}).
    access_log = True

    def log(self, request: Any) -> None:
        """
        Write the access log line, unless the operator turned it off: it
        costs about an eighth of the CPU of a small API read, and every
        request is counted by route and status class in
        C{gitlawb_http_request_duration_seconds} anyway.
        """
        if self.access_log:
            super().log(request)

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is None:
            return None
        site = self
        lost = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            site.connections.discard(protocol)
            lost(reason)
            if not site.connections:
                waiters, site._closed_waiters = site._closed_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        protocol.connectionLost = connection_lost
        self.connections.add(protocol)
        return protocol

    def request_started(self, request: NodeRequest) -> None:
        self.in_flight.add(request)
        started = time.monotonic()
        # A finished request lets go of its channel before telling us.
        channel = request.channel

        def done(result: object) -> None:
            self.in_flight.discard(request)
            metrics.record_request(
                getattr(request, "route_template", "unmatched"),
                request.code,
                time.monotonic() - started,
            )
            if self.draining:
                # Close the connection once the response is out, instead of
                # keeping it alive for a next request that will never be
                # served.
                transport = channel.transport
                if transport is not None:
                    transport.loseConnection()

        request.notifyFinish().addBoth(done)

    def when_closed(self) -> Deferred[None]:
        """
        @return: a Deferred that fires when no connection is open any more (at
            once when none is): every response has been written to the
            network, not merely handed to the transport.  Cancelling it only
            stops the wait.
        """
        if not self.connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._closed_waiters.remove)
        self._closed_waiters.append(waiter)
        return waiter

    def close_idle_connections(self) -> int:
        """
        Close every connection that has no request in progress; the others
        are closed once their response is out.

        @return: how many were closed.
        """
        closed = 0
        busy = {r.channel for r in self.in_flight}
        for protocol in list(self.connections):
            channel = _channel_of(protocol)
            # A request whose body is still arriving is in the channel's
            # queue but not in flight yet.
            if channel in busy or getattr(channel, "requests", None):
                channel.persistent = False
                continue
            transport = channel.transport
            if transport is not None:
                transport.loseConnection()
                closed += 1
        return closed

    def abort_all(self) -> int:
        """
        Cut every connection still open (the grace deadline has passed).

        @return: how many were cut: requests in progress, and responses not
            yet written out whole.
        """
        cut = 0
        for protocol in list(self.connections):
            transport = _channel_of(protocol).transport
            if transport is not None:
                transport.abortConnection()
                cut += 1
        return cut


def _channel_of(protocol: Any) -> Any:
    """
    The C{HTTPChannel} behind what C{Site.buildProtocol} returned: a wrapper
    that negotiates HTTP/1.1 or HTTP/2 and holds the channel, which alone
    has the transport.
    """
    return getattr(protocol, "_channel", protocol)


class ApiSite(Service):
    """
    The public HTTP listener (API and git smart HTTP).

    The port is bound in C{privilegedStartService}, so an address in use stops
    start-up before anything else runs.  L{stop_accepting} (called by the
    node when its shutdown starts) stops listening and closes idle
    connections; C{stopService} then lets the requests in flight finish until
    the grace deadline and cuts the rest.
    """

    name = "api"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        site: NodeSite,
        host: str,
        port: int,
        grace: Callable[[], float],
    ) -> None:
        self._reactor = reactor
        self.site = site
        self.host = host
        self.port = port
        self._grace = grace
        self.listening: IListeningPort | None = None
        self._accepting_stopped: Deferred[None] | None = None
        self.cut_off = 0

    @property
    def bound_port(self) -> int:
        assert self.listening is not None
        return int(self.listening.getHost().port)  # type: ignore[attr-defined]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.listening is None:
            try:
                self.listening = self._reactor.listenTCP(
                    self.port, self.site, interface=self.host
                )
            except CannotListenError as e:
                raise SystemExit(
                    f"gitlawb: cannot listen on {self.host}:{self.port} "
                    f"(GITLAWB_HOST/GITLAWB_PORT): {e.socketError}"
                ) from None

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        super().startService()

    def stop_accepting(self) -> Deferred[None]:
        """
        Refuse new connections from now on and close the idle ones; the
        requests in progress go on.  The node calls it as soon as its
        shutdown starts, before the services started after this one stop
        (they may take the whole grace), and L{stopService} calls it again;
        only the first call does anything.

        @return: a Deferred that fires once the port is closed.
        """
        if self._accepting_stopped is None:
            self.site.draining = True
            self._accepting_stopped = Deferred.fromCoroutine(self._close_listener())
        return self._accepting_stopped

    async def _close_listener(self) -> None:
        if self.listening is not None:
            listening, self.listening = self.listening, None
            await maybe_deferred(listening.stopListening())
        closed = self.site.close_idle_connections()
        self.log.info(
            "http listener closed; idle connections closed={idle}, "
            "requests in flight={busy}",
            idle=closed,
            busy=len(self.site.in_flight),
        )

    def stopService(self) -> Deferred[None]:
        """
        Drain the site.

        @return: a Deferred that fires once every connection has closed (its
            response written out whole), or was cut off at the grace
            deadline.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        await self.stop_accepting()
        if not self.site.connections:
            return

        # Wait for the responses in progress to be written out and their
        # connections closed, bounded by the grace deadline.
        closed = self.site.when_closed()
        deadline = self._reactor.callLater(self._grace(), closed.cancel)
        try:
            await closed
        except CancelledError:
            pass
        finally:
            if deadline.active():
                deadline.cancel()
        if self.site.connections:
            self.cut_off = self.site.abort_all()
            self.log.warn(
                "grace deadline passed; requests cut off={count}", count=self.cut_off
            )
