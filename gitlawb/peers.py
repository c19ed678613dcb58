"""
Other nodes, over HTTP: who they are, how to call them, and relaying this
node's ref updates to them (PROTOCOL.md section 9).

Every call to a peer goes through L{PeerClient}: it is signed with the
node's key (the peer learns which node calls, and can check that a notify
really comes from the C{node_did} it names), bounded in time as a whole
(connect, answer and body), bounded in size, and never follows a redirect.
Unless the operator allows private peers, a peer URL must name a public
host, and the address a name resolves to is checked again just before the
connection is made, so that a peer cannot point this node at its own
loopback or private network through DNS.

L{OutboxRelay} carries out the C{ref_update} rows that a push writes into
the outbox in its own transaction: each is sent as a signed
C{POST /api/v1/sync/notify} to every reachable peer and handed to the gossip
service when there is one, retried with backoff while a peer cannot be
reached, and marked done.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    FirstError,
    gatherResults,
)
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol as WireProtocol
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from gitlawb import __version__
from gitlawb.db.pool import Database
from gitlawb.db.service import DatabaseService
from gitlawb.identity.keys import NodeKey
from gitlawb.identity.signatures import sign_request
from gitlawb.jsontools import parse_json
from gitlawb.workloop import InFlight, WorkLoop, stop_within_grace

__all__ = [
    "GossipPublish",
    "OutboxItem",
    "OutboxRelay",
    "Peer",
    "PeerAddressRefused",
    "PeerClient",
    "PeerError",
    "PeerResponse",
    "PeerTimeout",
    "PublicAddressEndpoints",
    "RelayStore",
    "Resolver",
    "SqlRelayStore",
    "address_is_public",
    "backoff_delay",
    "get_peer",
    "host_is_private",
    "list_peers",
    "normalise_peer_url",
    "record_peer",
    "record_reachability",
    "resolve_public",
]

log = Logger()

#: Longest peer URL accepted.
MAX_PEER_URL_LENGTH = 2048

#: Largest answer read from a peer (a page of 200 repositories is ~100 KB).
MAX_PEER_BODY = 8 * 1024 * 1024

# Host names that are never public, whatever they resolve to.
_PRIVATE_NAMES = ("localhost",)
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa")


# -- Addresses -----------------------------------------------------------------


class PeerError(Exception):
    """
    A call to a peer got no usable answer: the network failed, the peer was
    too slow or sent too much, or its address is refused.
    """


class PeerTimeout(PeerError):
    """
    A call to a peer ran past its time bound and was cut.
    """


class PeerAddressRefused(PeerError, ValueError):
    """
    A peer URL is malformed, or names (or resolves to) an address that is
    not public while private peers are not allowed.
    """


def address_is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """
    Whether an IP address is globally routable unicast (an IPv4-mapped IPv6
    address is judged by its IPv4 address).
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def host_is_private(host: str) -> bool:
    """
    Whether a URL's host is known not to be public without resolving it: a
    loopback, private, link-local or otherwise non-global IP literal, or a
    name such as C{localhost} or C{*.local}.  Other names are judged after
    resolution (L{resolve_public}).
    """
    name = host.strip("[]").lower().rstrip(".")
    if name in _PRIVATE_NAMES or name.endswith(_PRIVATE_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return not address_is_public(address)


def normalise_peer_url(url: str, *, allow_private: bool) -> str:
    """
    Check a peer's base URL and return it without a trailing slash.

    @raise PeerAddressRefused: when it is not an http(s) URL with a host, has
        credentials, a query or a fragment, or (unless C{allow_private})
        names a host that is not public.
    """
    text = url.strip()
    if not text or len(text) > MAX_PEER_URL_LENGTH:
        raise PeerAddressRefused("a peer URL must be 1 to 2048 characters")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise PeerAddressRefused(f"not a valid URL: {text[:100]!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise PeerAddressRefused("a peer URL must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise PeerAddressRefused("a peer URL must not carry credentials")
    if parts.query or parts.fragment:
        raise PeerAddressRefused("a peer URL must not have a query or fragment")
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        raise PeerAddressRefused("a peer URL must not contain whitespace")
    if not allow_private and host_is_private(parts.hostname):
        raise PeerAddressRefused(
            f"{parts.hostname} is not a public address (private peers are not"
            " allowed on this node)"
        )
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


Resolver = Callable[[str, int], "Deferred[list[str]]"]


def _system_resolver(reactor: Any) -> Resolver:
    def resolve(host: str, port: int) -> Deferred[list[str]]:
        def lookup() -> list[str]:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return [str(info[4][0]) for info in infos]

        return cast(
            "Deferred[list[str]]",
            deferToThreadPool(reactor, reactor.getThreadPool(), lookup),
        )

    return resolve


async def resolve_public(
    host: str, port: int, resolve: Resolver, *, allow_private: bool
) -> list[str]:
    """
    The addresses C{host} resolves to.

    @raise PeerAddressRefused: when it resolves to nothing, or (unless
        C{allow_private}) when any address is not public.
    """
    name = host.strip("[]")
    try:
        ipaddress.ip_address(name)
        addresses = [name]
    except ValueError:
        try:
            addresses = await resolve(name, port)
        except OSError as e:
            raise PeerError(f"cannot resolve {name}: {e}") from None
    if not addresses:
        raise PeerError(f"{name} resolves to no address")
    if not allow_private:
        for address in addresses:
            if not address_is_public(ipaddress.ip_address(address.split("%")[0])):
                raise PeerAddressRefused(
                    f"{name} resolves to {address}, which is not public"
                )
    return addresses


@implementer(IStreamClientEndpoint)
class _PublicAddressEndpoint:
    """
    Connects to a host only after checking what its name resolves to, and
    to that checked address (so a second lookup cannot answer differently).
    """

    def __init__(
        self,
        reactor: Any,
        scheme: bytes,
        host: str,
        port: int,
        resolve: Resolver,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._scheme = scheme
        self._host = host
        self._port = port
        self._resolve = resolve
        self._connect_timeout = connect_timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        addresses = await resolve_public(
            self._host, self._port, self._resolve, allow_private=False
        )
        address = addresses[0]
        timeout = max(1, int(self._connect_timeout))
        endpoint: IStreamClientEndpoint
        if ":" in address:
            endpoint = TCP6ClientEndpoint(
                self._reactor, address, self._port, timeout=timeout
            )
        else:
            endpoint = TCP4ClientEndpoint(
                self._reactor, address, self._port, timeout=timeout
            )
        if self._scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(self._host), endpoint)
        return await endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class PublicAddressEndpoints:
    """
    An agent endpoint factory that refuses hosts resolving to non-public
    addresses (see L{_PublicAddressEndpoint}).
    """

    def __init__(
        self, reactor: Any, connect_timeout: float, resolve: Resolver | None = None
    ) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._resolve = resolve or _system_resolver(reactor)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _PublicAddressEndpoint(
            self._reactor,
            uri.scheme,
            uri.host.decode("ascii"),
            uri.port,
            self._resolve,
            self._connect_timeout,
        )


# -- Calling peers ---------------------------------------------------------


@dataclass(frozen=True)
class PeerResponse:
    """
    A peer's answer.
    """

    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """
        The body parsed as JSON.

        @raise PeerError: when it is not JSON.
        """
        try:
            return parse_json(self.body)
        except (UnicodeDecodeError, ValueError):
            raise PeerError(f"the peer answered {self.status} without JSON") from None


class _BodyReader(WireProtocol):
    """
    Collects a response body up to a limit; cancelling L{finished} (or
    going over the limit) aborts the connection.
    """

    def __init__(self, limit: int) -> None:
        self.finished: Deferred[bytes] = Deferred(lambda _: self._abort())
        self._limit = limit
        self._size = 0
        self._parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._abort()
            self.finished.errback(
                PeerError(f"the peer's answer is larger than {self._limit} bytes")
            )
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._parts))
        else:
            self.finished.errback(reason)

    def _abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]


class PeerClient:
    """
    Signed, bounded HTTP calls to other nodes.

    @param reactor: makes the connections and, unless C{clock} is given,
        times the bounds.
    @param key: the node key every call is signed with.
    @param timeout: seconds a whole call (connect, answer, body) may take.
    @param allow_private: whether peers on loopback and private networks may
        be called (a private cluster).
    @param http: a treq C{HTTPClient} (or C{StubTreq} in tests); by default
        one over a non-persistent pool, with the public-address check unless
        C{allow_private}.
    @param resolve: host name lookups for the public-address check.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        key: NodeKey,
        *,
        timeout: float = 5.0,
        allow_private: bool = False,
        http: Any = None,
        clock: IReactorTime | None = None,
        resolve: Resolver | None = None,
        max_body: int = MAX_PEER_BODY,
    ) -> None:
        self._reactor = reactor
        self.key = key
        self.timeout = timeout
        self.allow_private = allow_private
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._max_body = max_body
        self._last_created: dict[tuple[str, str, bytes], int] = {}
        self.resolve: Resolver = resolve or _system_resolver(reactor)
        if http is None:
            from treq.client import HTTPClient

            pool = HTTPConnectionPool(reactor, persistent=False)
            if allow_private:
                agent = Agent(reactor, connectTimeout=timeout, pool=pool)
            else:
                agent = Agent.usingEndpointFactory(
                    reactor, PublicAddressEndpoints(reactor, timeout, resolve), pool
                )
            http = HTTPClient(agent)
        self._http = http

    def url_for(self, base: str, path: str) -> str:
        """
        C{path} (starting with C{/}) under a peer's base URL.
        """
        return base.rstrip("/") + path

    def _created(self, method: str, target: str, body: bytes) -> int:
        """
        The C{created} second to sign a request with.

        Ed25519 is deterministic and C{created} has one-second resolution, so
        the same write sent twice within a second would carry the same
        signature, which peers refuse as a replay.  A repeat in the same second
        is dated one second later instead (well inside the 300 s skew).
        """
        now = int(self._clock.seconds())
        key = (method, target, hashlib.sha256(body).digest())
        created = max(now, self._last_created.get(key, now - 1) + 1)
        self._last_created[key] = created
        if len(self._last_created) > 4096:
            # Forget what is too old to collide again.
            self._last_created = {
                k: v for k, v in self._last_created.items() if v >= now
            }
        return created

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        timeout: float | None = None,
    ) -> PeerResponse:
        """
        Make one signed call.  Any answer is returned, whatever its status;
        redirects are answers too (never followed).

        @param json_body: sent as the JSON body when not C{None}.
        @raise PeerTimeout: when the call runs past its bound.
        @raise PeerAddressRefused: when the URL is not allowed.
        @raise PeerError: when the network fails or the answer is too large.
        """
        try:
            parts = urlsplit(url)
        except ValueError:
            raise PeerAddressRefused(f"not a valid URL: {url[:100]!r}") from None
        normalise_peer_url(
            urlunsplit((parts.scheme, parts.netloc, "", "", "")),
            allow_private=self.allow_private,
        )
        body = b"" if json_body is None else _json_bytes(json_body)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = sign_request(
            self.key, method, target, body, self._created(method, target, body)
        )
        headers["User-Agent"] = f"gitlawb-node/{__version__}"
        headers["Accept"] = "application/json"
        if body:
            headers["Content-Type"] = "application/json"

        bound = self.timeout if timeout is None else timeout
        call = Deferred.fromCoroutine(self._exchange(method, url, headers, body))
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            call.cancel()

        timer = self._clock.callLater(bound, expire)
        try:
            return await call
        except CancelledError:
            if expired:
                raise PeerTimeout(
                    f"{method} {url} took longer than {bound:g}s"
                ) from None
            raise
        except PeerError:
            raise
        except Exception as e:
            # The agent reports a cut made while it waits for the answer as
            # ResponseNeverReceived (wrapping the cancellation), not as one.
            if expired:
                raise PeerTimeout(
                    f"{method} {url} took longer than {bound:g}s"
                ) from None
            raise PeerError(f"{method} {url} failed: {_describe(e)}") from None
        finally:
            if timer.active():
                timer.cancel()

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> PeerResponse:
        response = await self._http.request(
            method,
            url,
            headers=headers,
            data=body or None,
            allow_redirects=False,
            unbuffered=True,
        )
        reader = _BodyReader(self._max_body)
        response.deliverBody(reader)
        content = await reader.finished
        return PeerResponse(int(response.code), content)

    async def get_json(self, base: str, path: str) -> Any:
        """
        C{GET} a JSON document from a peer.

        @raise PeerError: for a non-2xx answer or a body that is not JSON,
            besides what L{request} raises.
        """
        response = await self.request("GET", self.url_for(base, path))
        if not response.ok:
            raise PeerError(f"GET {path} answered {response.status}")
        return response.json()

    async def is_healthy(self, base: str) -> bool:
        """
        Whether a peer answers C{GET /health} with a 2xx status in time.
        """
        try:
            response = await self.request("GET", self.url_for(base, "/health"))
        except PeerError as e:
            self.log.debug("peer {url} not healthy: {error}", url=base, error=e)
            return False
        return response.ok


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    return str(error) or type(error).__name__


# -- The peers table -----------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    did: str
    http_url: str
    reachable: bool = True
    signed: bool = False
    last_seen: Any = None
    repo_count: int | None = None


def _peer(row: Any) -> Peer:
    return Peer(
        did=row["did"],
        http_url=row["http_url"],
        reachable=bool(row["reachable"]),
        signed=bool(row["signed"]),
        last_seen=row["last_seen"],
        repo_count=row["repo_count"],
    )


_PEER_COLUMNS = "did, http_url, reachable, signed, last_seen, repo_count"


async def get_peer(db: Database, did: str) -> Peer | None:
    """
    The known peer with this full DID, or C{None}.
    """
    rows = await db.query(f"SELECT {_PEER_COLUMNS} FROM peers WHERE did = %s", (did,))
    return _peer(rows[0]) if rows else None


async def list_peers(
    db: Database, *, reachable_only: bool = False, limit: int = 1000
) -> list[Peer]:
    """
    Known peers, most recently seen first.
    """
    where = "WHERE reachable" if reachable_only else ""
    rows = await db.query(
        f"SELECT {_PEER_COLUMNS} FROM peers {where}"
        " ORDER BY last_seen DESC, did LIMIT %s",
        (limit,),
    )
    return [_peer(row) for row in rows]


async def record_peer(
    db: Database,
    did: str,
    http_url: str,
    *,
    signed: bool,
    repo_count: int | None = None,
) -> bool:
    """
    Add or refresh a peer, seen and reachable now.

    A peer whose URL was recorded from a signed announce keeps that URL
    against unsigned claims: only its own signature (or the same URL) can
    update the row.

    @return: whether the row was written (C{False}: refused as above).
    """
    rows = await db.query(
        "INSERT INTO peers (did, http_url, repo_count, signed, reachable,"
        "  last_seen, announced_at)"
        " VALUES (%(did)s, %(url)s, %(count)s, %(signed)s, true, now(), now())"
        " ON CONFLICT (did) DO UPDATE SET"
        "  http_url = EXCLUDED.http_url,"
        "  repo_count = COALESCE(EXCLUDED.repo_count, peers.repo_count),"
        "  signed = peers.signed OR EXCLUDED.signed,"
        "  reachable = true, last_seen = now(), announced_at = now()"
        " WHERE EXCLUDED.signed OR NOT peers.signed"
        "  OR peers.http_url = EXCLUDED.http_url"
        " RETURNING did",
        {"did": did, "url": http_url, "count": repo_count, "signed": signed},
    )
    return bool(rows)


async def record_reachability(db: Database, did: str, reachable: bool) -> None:
    """
    Note the outcome of a liveness check: reachable peers are also seen now.
    """
    await db.execute(
        "UPDATE peers SET reachable = %(reachable)s,"
        " last_seen = CASE WHEN %(reachable)s THEN now() ELSE last_seen END"
        " WHERE did = %(did)s",
        {"did": did, "reachable": reachable},
    )


# -- Relaying ref updates --------------------------------------------------------


def backoff_delay(attempts: int, initial: float, maximum: float) -> float:
    """
    Seconds to wait after the C{attempts}-th failed attempt: C{initial},
    doubling each time, never more than C{maximum}.
    """
    exponent = min(max(attempts - 1, 0), 62)
    return float(min(maximum, initial * (2**exponent)))


@dataclass(frozen=True)
class OutboxItem:
    """
    One claimed C{ref_update} outbox row.

    @ivar attempts: attempts including this one.
    """

    id: int
    payload: dict[str, Any]
    attempts: int


class RelayStore(Protocol):
    """
    Where the relay finds its work and records the outcome.
    """

    async def claim(self, limit: int, lease: float) -> list[OutboxItem]:
        """
        Lease up to C{limit} due rows for C{lease} seconds, counting an
        attempt on each.
        """

    async def peers(self) -> list[Peer]:
        """
        The peers to notify: reachable ones.
        """

    async def done(self, item: OutboxItem, note: str | None) -> None:
        """
        The row is finished (C{note}: what went wrong, when it was given up).
        """

    async def retry(self, item: OutboxItem, delay: float, error: str) -> None:
        """
        Try the row again in C{delay} seconds.
        """

    async def release(self, items: Sequence[OutboxItem]) -> None:
        """
        Hand back rows whose attempt was cut (the attempt does not count).
        """


class SqlRelayStore:
    """
    The relay's work in the C{outbox} table.  Rows are claimed with a lease
    (C{claimed_until}) taken under C{FOR UPDATE SKIP LOCKED}, so that any
    number of relays on one database never send one row at the same time,
    and a relay that dies lets its rows go when the lease ends.
    """

    def __init__(self, database: DatabaseService, node_did: str) -> None:
        self._database = database
        self._node_did = node_did

    async def claim(self, limit: int, lease: float) -> list[OutboxItem]:
        rows = await self._database.database.query(
            "UPDATE outbox SET attempts = attempts + 1,"
            "  claimed_until = now() + make_interval(secs => %(lease)s)"
            " WHERE id IN ("
            "  SELECT id FROM outbox"
            "  WHERE kind = 'ref_update' AND done_at IS NULL"
            "   AND next_attempt_at <= now()"
            "   AND (claimed_until IS NULL OR claimed_until < now())"
            "  ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, payload, attempts",
            {"lease": lease, "limit": limit},
        )
        items = [
            OutboxItem(int(row["id"]), _payload(row["payload"]), int(row["attempts"]))
            for row in rows
        ]
        return sorted(items, key=lambda item: item.id)

    async def peers(self) -> list[Peer]:
        peers = await list_peers(self._database.database, reachable_only=True)
        return [peer for peer in peers if peer.did != self._node_did]

    async def done(self, item: OutboxItem, note: str | None) -> None:
        await self._database.database.execute(
            "UPDATE outbox SET done_at = now(), claimed_until = NULL,"
            " last_error = %s WHERE id = %s",
            (note, item.id),
        )

    async def retry(self, item: OutboxItem, delay: float, error: str) -> None:
        await self._database.database.execute(
            "UPDATE outbox SET claimed_until = NULL, last_error = %s,"
            " next_attempt_at = now() + make_interval(secs => %s) WHERE id = %s",
            (error[:1000], delay, item.id),
        )

    async def release(self, items: Sequence[OutboxItem]) -> None:
        if not items:
            return
        await self._database.database.execute(
            "UPDATE outbox SET claimed_until = NULL,"
            " attempts = GREATEST(attempts - 1, 0)"
            " WHERE id = ANY(%s) AND done_at IS NULL",
            ([item.id for item in items],),
        )


def _payload(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = parse_json(value)
    return dict(value) if isinstance(value, dict) else {}


GossipPublish = Callable[[dict[str, Any]], "Deferred[Any]"]


class OutboxRelay(Service):
    """
    Sends each C{ref_update} outbox row to every reachable peer as a signed
    C{POST /api/v1/sync/notify}, and to the gossip service when one is set.

    A row is done once every peer has answered (a 4xx answer counts: the
    peer heard it and said no, and asking again will not change that).  When
    a peer cannot be reached or answers 5xx, 429 or a refused replay, the
    whole row is tried again later (a notify is idempotent at the receiver),
    with a delay that doubles from C{backoff_initial} to C{backoff_max}, at
    most C{max_attempts} times.  Gossip is best effort: its failures are
    logged, never retried, because HTTP is the path that is known to
    arrive.

    @ivar gossip_publish: called with each payload when not C{None}; returns
        a Deferred.  The gossip service sets it when p2p is on.
    @ivar cut_off: rows whose sending was cut by the last stop.
    """

    name = "outbox-relay"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: RelayStore,
        client: PeerClient,
        *,
        gossip_publish: GossipPublish | None = None,
        grace: float | Callable[[], float] = 30.0,
        poll_interval: float = 1.0,
        batch_size: int = 20,
        max_attempts: int = 10,
        backoff_initial: float = 2.0,
        backoff_max: float = 300.0,
        max_parallel: int = 16,
        clock: IReactorTime | None = None,
    ) -> None:
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._store = store
        self._client = client
        self.gossip_publish = gossip_publish
        self._grace = grace
        self._batch_size = batch_size
        self._max_attempts = max_attempts
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._parallel = DeferredSemaphore(max_parallel)
        self._in_flight = InFlight()
        self._loop = WorkLoop(
            self._clock, self.relay_due, name=self.name, poll_interval=poll_interval
        )
        self.cut_off = 0

    def startService(self) -> None:
        super().startService()
        self._in_flight = InFlight()
        self._loop.start()

    def wake(self) -> None:
        """
        Rows may have been added: look now rather than at the next poll.
        """
        self._loop.wake()

    def stopService(self) -> Deferred[None]:
        """
        Stop claiming rows; let the rows being sent finish, or at the grace
        deadline cut their calls and hand the rows back.

        @return: a Deferred that fires when no row is being sent.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.cut_off = await stop_within_grace(
            self._clock,
            [self._loop],
            self._in_flight,
            self._grace() if callable(self._grace) else self._grace,
        )
        if self.cut_off:
            self.log.warn("outbox relay cut at the grace deadline")

    async def relay_due(self) -> bool:
        """
        Claim the rows that are due and relay each.

        @return: whether any row was claimed.
        """
        lease = self._batch_size * 2 * (self._client.timeout + 1) + 30
        items = await self._store.claim(self._batch_size, lease)
        if not items:
            return False
        peers = await self._store.peers()
        # The rows of a batch go out together: a peer that hangs costs the
        # batch one client timeout, not one per row, and the rows behind it
        # (their gossip included) are not held up by it.
        outcomes = await DeferredList(
            [Deferred.fromCoroutine(self._relay(item, peers)) for item in items],
            consumeErrors=True,
        )
        cut = [
            item
            for item, (_, result) in zip(items, outcomes, strict=True)
            if isinstance(result, Failure) and result.check(CancelledError)
        ]
        if cut:
            await self._store.release(cut)
            raise CancelledError()
        for _, result in outcomes:
            if isinstance(result, Failure):
                result.raiseException()
        return True

    async def _relay(self, item: OutboxItem, peers: list[Peer]) -> None:
        failures = await self._in_flight.run(self._send(item, peers))
        await self._settle(item, failures, len(peers))

    async def _send(self, item: OutboxItem, peers: list[Peer]) -> list[str]:
        """
        Notify every peer of one row, in parallel, and publish it on gossip.

        @return: what went wrong with each peer that must be asked again.
        """
        calls = [
            Deferred.fromCoroutine(self._notify(peer, item.payload)) for peer in peers
        ]
        if self.gossip_publish is not None:
            calls.append(Deferred.fromCoroutine(self._publish(item.payload)))
        if not calls:
            return []
        try:
            results = await gatherResults(calls, consumeErrors=True)
        except FirstError as e:
            # Cancelling the gathering cancels every call; say so plainly.
            if e.subFailure.check(CancelledError):
                raise CancelledError() from None
            raise
        return [failure for failure in results if failure is not None]

    async def _notify(self, peer: Peer, payload: dict[str, Any]) -> str | None:
        """
        @return: C{None} when the peer answered for good; else why the row
            must be tried again for it.
        """
        await self._parallel.acquire()
        try:
            response = await self._client.request(
                "POST",
                self._client.url_for(peer.http_url, "/api/v1/sync/notify"),
                json_body=payload,
            )
        except PeerError as e:
            return f"{peer.did}: {e}"
        finally:
            self._parallel.release()
        if response.ok:
            return None
        if response.status >= 500 or response.status == 429:
            return f"{peer.did}: answered {response.status}"
        if response.status == 401 and b"replayed_signature" in response.body:
            return f"{peer.did}: signature taken for a replay; will re-sign"
        self.log.info(
            "peer {did} refused a ref update status={status} body={body}",
            did=peer.did,
            status=response.status,
            body=response.body[:200],
        )
        return None

    async def _publish(self, payload: dict[str, Any]) -> None:
        publish = self.gossip_publish
        if publish is None:
            return None
        try:
            await publish(payload)
        except CancelledError:
            raise
        except Exception as e:
            self.log.warn("gossip publish failed: {error}", error=e)
        return None

    async def _settle(self, item: OutboxItem, failures: list[str], peers: int) -> None:
        if not failures:
            await self._store.done(item, None)
            self.log.debug(
                "ref update relayed id={id} peers={peers}", id=item.id, peers=peers
            )
            return
        error = "; ".join(failures)
        if item.attempts >= self._max_attempts:
            await self._store.done(item, f"gave up after {item.attempts}: {error}")
            self.log.warn(
                "ref update not relayed to every peer; giving up id={id}"
                " attempts={attempts} error={error}",
                id=item.id,
                attempts=item.attempts,
                error=error,
            )
            return
        delay = backoff_delay(item.attempts, self._backoff_initial, self._backoff_max)
        await self._store.retry(item, delay, error)
        self.log.info(
            "ref update relay failed for {count} peer(s); retrying in {delay:.0f}s"
            " id={id} error={error}",
            count=len(failures),
            delay=delay,
            id=item.id,
            error=error,
        )
