"""
Durable webhook delivery (PROTOCOL.md section 8).

A push writes one C{webhook_deliveries} row per matching hook, holding the
exact JSON body, in the transaction that records the push.  The
L{WebhookDispatcher} sends them from there:

  - it claims due rows with C{FOR UPDATE SKIP LOCKED} and a lease
    (C{claimed_until}), so several nodes on one database never send a row
    twice at once, and a row claimed by a node that died is claimed again
    once the lease has run out;
  - it POSTs the stored bytes with C{X-Gitlawb-Event}, C{X-Gitlawb-Delivery}
    (the row's id, the same on every attempt) and, when the hook has a
    secret, C{X-Gitlawb-Signature-256: sha256=<hex HMAC-SHA256>};
  - network errors, timeouts, 429 and 5xx are retried with exponential
    backoff and jitter, up to a number of attempts and a maximum age; any
    other status (3xx included: redirects are not followed) is final;
  - a slow receiver holds at most its host's slots, never the others'.

Delivery is at least once: a node that dies after the receiver answered but
before the row was updated sends the row again after the lease.  Receivers
deduplicate on C{X-Gitlawb-Delivery}.

The guard against server-side request forgery lives here too
(L{check_public_url}): a hook URL must be public http(s) when it is created
and again at every attempt, judged on the addresses its host resolves to, and
the connection goes to exactly the address that was judged
(L{PinnedEndpointFactory}), so DNS cannot change the answer in between.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from gitlawb import __version__, metrics
from gitlawb.config import Settings
from gitlawb.db.pool import CONNECTION_ERRORS
from gitlawb.db.service import DatabaseService, DatabaseUnavailable

__all__ = [
    "AttemptOutcome",
    "ClaimedDelivery",
    "DeliveryQueue",
    "PinnedEndpointFactory",
    "UnresolvableWebhookHost",
    "UnsafeWebhookUrl",
    "WebhookDispatcher",
    "WebhookUrlError",
    "backoff_delay",
    "check_public_url",
    "check_url_form",
    "classify_response",
    "refusal_reason",
    "should_give_up",
    "signature_header",
]

#: Longest hook URL accepted.
MAX_URL_LENGTH = 2000

# Host names that always mean "this machine or its private network".
_PRIVATE_NAMES = ("localhost", "localhost.localdomain")
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal")

# At most this many of a host's addresses are tried, in the resolver's order.
_MAX_ADDRESSES = 4

# Longest error text stored on a delivery row.
_MAX_ERROR = 500


# -- The SSRF guard ------------------------------------------------------------


class WebhookUrlError(ValueError):
    """
    A hook URL cannot be used; C{str()} says why, for the API's answer.
    """


class UnsafeWebhookUrl(WebhookUrlError):
    """
    The URL is not public http(s): wrong scheme, credentials, a private host
    name, or a host that resolves to a non-public address.  Final: retrying
    does not change it.
    """


class UnresolvableWebhookHost(WebhookUrlError):
    """
    The URL's host did not resolve (or not in time).  At delivery time this is
    a network error and is retried.
    """


@dataclass(frozen=True)
class UrlTarget:
    """
    What a hook URL points at: scheme, host (lower case, no brackets) and port.
    """

    scheme: str
    host: str
    port: int


def check_url_form(url: str, allow_private: bool) -> UrlTarget:
    """
    Check what can be checked without DNS: an absolute http(s) URL with a
    host, no credentials, a usable port, and (unless C{allow_private}) no
    host name that names a private network.

    @raise UnsafeWebhookUrl: with a message saying what is wrong.
    """
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeWebhookUrl(f"url must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise UnsafeWebhookUrl("url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeWebhookUrl("url is not a valid URL (check the port)") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeWebhookUrl("url must start with http:// or https://")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UnsafeWebhookUrl("url must name a host")
    if parts.username is not None or parts.password is not None:
        # They would be shown back in every listing; the hook's secret is the
        # way to authenticate deliveries.
        raise UnsafeWebhookUrl(
            "url must not carry credentials (user:password@); use a secret"
        )
    if port == 0:
        raise UnsafeWebhookUrl("url must not use port 0")
    if not allow_private and (
        host in _PRIVATE_NAMES or host.endswith(_PRIVATE_SUFFIXES)
    ):
        raise UnsafeWebhookUrl(
            f"url host {host!r} is a private name; webhooks must be public"
        )
    default_port = 443 if parts.scheme == "https" else 80
    return UrlTarget(parts.scheme, host, port or default_port)


def refusal_reason(address: str, allow_private: bool) -> str | None:
    """
    Why a webhook must not connect to C{address}, or C{None} when it may.

    Unspecified and multicast addresses are never targets; loopback, private,
    link-local, shared (CGNAT), documentation and reserved ones are refused
    unless C{allow_private}.  IPv6 forms that embed an IPv4 address
    (mapped, 6to4, Teredo) are judged by that address.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is not None:
            reason = refusal_reason(str(embedded), allow_private)
            return None if reason is None else f"{address} embeds {reason}"
    if ip.is_unspecified or ip.is_multicast:
        return f"{address} is not a unicast address"
    if allow_private:
        return None
    for flag, kind in (
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
    ):
        if flag:
            return f"{address} is a {kind} address"
    if not ip.is_global:
        return f"{address} is not a public address"
    return None


@implementer(IResolutionReceiver)
class _Addresses:
    """
    Collects what a resolver reports into a Deferred list of IP strings.
    """

    def __init__(self) -> None:
        self.found: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, IPv4Address | IPv6Address):
            if address.host not in self.found:
                self.found.append(address.host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.found)


async def resolve_host(
    resolver: IHostnameResolver,
    clock: IReactorTime,
    host: str,
    port: int,
    timeout: float,
) -> list[str]:
    """
    The addresses C{host} resolves to (an IP literal is its own answer).

    @raise UnresolvableWebhookHost: when nothing came back within C{timeout}
        seconds.
    """
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass

    receiver = _Addresses()
    resolver.resolveHostName(receiver, host, port)
    timer = clock.callLater(timeout, receiver.done.cancel)
    try:
        addresses = await receiver.done
    except CancelledError:
        if timer.active():
            # Cancelled from outside (shutdown), not by the timer.
            raise
        raise UnresolvableWebhookHost(
            f"host {host!r} did not resolve within {timeout:g}s"
        ) from None
    finally:
        if timer.active():
            timer.cancel()
    if not addresses:
        raise UnresolvableWebhookHost(f"host {host!r} does not resolve")
    return addresses


async def check_public_url(
    url: str,
    reactor: Any,
    allow_private: bool,
    *,
    resolver: IHostnameResolver | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """
    Check that C{url} may be the target of a webhook (or any request the node
    makes on a user's behalf), after DNS.

    @param reactor: times the resolution; its C{nameResolver} resolves unless
        C{resolver} is given.
    @param allow_private: the operator's switch: private targets are fine.
    @return: the addresses to connect to, every one of them checked; connect
        to these, not to the name, so DNS cannot answer differently later.
    @raise UnsafeWebhookUrl: the URL or any address it resolves to is not
        public.
    @raise UnresolvableWebhookHost: the host did not resolve.
    """
    target = check_url_form(url, allow_private)
    if resolver is None:
        resolver = reactor.nameResolver
    assert resolver is not None
    addresses = await resolve_host(resolver, reactor, target.host, target.port, timeout)
    for address in addresses:
        reason = refusal_reason(address, allow_private)
        if reason is not None:
            raise UnsafeWebhookUrl(
                f"url host {target.host!r} resolves to {reason};"
                " webhooks must be public"
            )
    return addresses


@implementer(IStreamClientEndpoint)
class _PinnedTCPEndpoint:
    """
    Connects to the first of C{addresses} that answers, all of them together
    bounded by C{timeout} seconds.
    """

    def __init__(
        self, reactor: Any, addresses: Sequence[str], port: int, timeout: float
    ) -> None:
        self._reactor = reactor
        self._addresses = list(addresses)[:_MAX_ADDRESSES]
        self._port = port
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        deadline = self._reactor.seconds() + self._timeout
        failure: Exception = ConnectError(string="no address to connect to")
        for address in self._addresses:
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                break
            endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = endpoint_type(self._reactor, address, self._port, remaining)
            try:
                protocol: IProtocol = await endpoint.connect(factory)
                return protocol
            except CancelledError:
                raise
            except Exception as e:
                failure = e
        raise failure


@implementer(IAgentEndpointFactory)
class PinnedEndpointFactory:
    """
    Endpoints for an L{Agent} that connect only to addresses already checked:
    the URL's host goes into the C{Host} header and the TLS server name (and
    certificate check), never to a resolver.

    @param addresses: the checked IP addresses, tried in order.
    @param connect_timeout: seconds all connection attempts may take.
    """

    def __init__(
        self, reactor: Any, addresses: Sequence[str], connect_timeout: float
    ) -> None:
        self._reactor = reactor
        self._addresses = list(addresses)
        self._timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = _PinnedTCPEndpoint(
            self._reactor, self._addresses, uri.port, self._timeout
        )
        if uri.scheme == b"https":
            host = uri.host.decode("ascii").strip("[]")
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint


# -- What an attempt came to ----------------------------------------------------


@dataclass(frozen=True)
class AttemptOutcome:
    """
    The result of one delivery attempt.

    @ivar result: the metrics label: C{ok}, C{http_error} or C{network_error}.
    @ivar retryable: whether another attempt may succeed.
    @ivar status_code: the receiver's HTTP status, when it answered.
    @ivar error: what went wrong, for the owner (C{None} on success).
    @ivar retry_after: seconds the receiver asked to wait (C{Retry-After}).
    """

    result: str
    retryable: bool
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.result == "ok"


def classify_response(code: int, retry_after: str | None = None) -> AttemptOutcome:
    """
    What a receiver's status means: 2xx delivered; 429 and 5xx retried
    (honouring a C{Retry-After} in seconds); anything else final, 3xx
    included, because redirects are not followed.
    """
    if 200 <= code < 300:
        return AttemptOutcome("ok", False, code)
    if code == 429 or 500 <= code < 600:
        return AttemptOutcome(
            "http_error", True, code, f"HTTP {code}", _retry_after(retry_after)
        )
    if 300 <= code < 400:
        return AttemptOutcome(
            "http_error", False, code, f"HTTP {code}: redirects are not followed"
        )
    return AttemptOutcome("http_error", False, code, f"HTTP {code}")


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form; an HTTP date is rare from webhook receivers.
    if value is None:
        return None
    try:
        seconds = int(value.strip())
    except ValueError:
        return None
    return float(seconds) if seconds >= 0 else None


def backoff_delay(attempts: int, base: float, cap: float, jitter: float = 1.0) -> float:
    """
    Seconds to wait after the C{attempts}-th failed attempt: C{base * 2 **
    (attempts - 1)}, at most C{cap}, then scaled into its upper half by
    C{jitter} in [0, 1] ("equal jitter": never less than half the step, so
    retries spread out without collapsing to zero).
    """
    step = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 62))
    return step / 2 + step / 2 * jitter


def should_give_up(
    attempts: int, max_attempts: int, age: float, delay: float, max_age: float
) -> bool:
    """
    Whether a retryable failure is final: the attempts are used up, or the
    next attempt would start after the delivery's maximum age.

    @param attempts: attempts made so far, this one included.
    @param age: seconds since the delivery was created.
    """
    return attempts >= max_attempts or age + delay > max_age


def signature_header(secret: str, body: bytes) -> str:
    """
    The C{X-Gitlawb-Signature-256} value: C{sha256=} and the hex HMAC-SHA256
    of the raw body, keyed with the hook's secret.
    """
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def _describe(error: BaseException | Failure) -> str:
    value = error.value if isinstance(error, Failure) else error
    # ResponseNeverReceived, ResponseFailed and friends carry a list of
    # Failures; the first one says what happened.
    reasons = getattr(value, "reasons", None)
    if reasons:
        return _describe(reasons[0])
    text = str(value).strip() or type(value).__name__
    return f"{type(value).__name__}: {text}"[:_MAX_ERROR]


# -- The queue -----------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedDelivery:
    """
    A delivery this node holds the lease of.

    @ivar attempts: attempts made before this one.
    @ivar age: seconds since the row was created, when it was claimed.
    """

    id: str
    webhook_id: str
    event: str
    body: str
    attempts: int
    age: float
    url: str
    secret: str | None


class DeliveryQueue:
    """
    The C{webhook_deliveries} table, as the dispatcher uses it.  Times are
    the database's, so nodes sharing it agree on what is due.
    """

    def __init__(self, database: DatabaseService) -> None:
        self._service = database

    @property
    def ready(self) -> bool:
        return self._service.is_ready

    async def claim(
        self,
        admit: Callable[[str], bool],
        limit: int,
        lease: float,
        exclude: Sequence[str] = (),
    ) -> list[ClaimedDelivery]:
        """
        Claim up to C{limit} due deliveries, oldest due first, for C{lease}
        seconds.

        @param admit: called with each candidate's URL in order; C{True}
            takes it (and counts it against its host), C{False} passes over
            it and every other row of the same hook in this claim.
        @param exclude: delivery ids never to claim (those in flight here).
        @return: the claimed deliveries.
        """
        return await self._service.database.transaction(
            self._claim, admit, limit, lease, list(exclude)
        )

    @staticmethod
    async def _claim(
        cursor: Any,
        admit: Callable[[str], bool],
        limit: int,
        lease: float,
        exclude: list[str],
    ) -> list[ClaimedDelivery]:
        # Rows are locked as they are read; a row passed over because its
        # host is busy stays locked until COMMIT, but SKIP LOCKED does not
        # skip this transaction's own locks, so its hook is excluded from the
        # next round instead.  Every round takes or excludes what it read, so
        # the rounds end.
        chosen: list[str] = []
        busy_hooks: list[str] = []
        for _ in range(4):
            batch = max(limit * 4, 32)
            await cursor.execute(
                "SELECT d.id, d.webhook_id, w.url"
                " FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
                " WHERE d.status = 'pending' AND w.active"
                "  AND d.next_attempt_at <= now()"
                "  AND (d.claimed_until IS NULL OR d.claimed_until < now())"
                "  AND NOT (d.id = ANY(%s::uuid[]))"
                "  AND NOT (d.webhook_id = ANY(%s::uuid[]))"
                " ORDER BY d.next_attempt_at, d.created_at"
                " LIMIT %s"
                " FOR UPDATE OF d SKIP LOCKED",
                (exclude + chosen, busy_hooks, batch),
            )
            rows = cursor.fetchall()
            for row in rows:
                hook = str(row["webhook_id"])
                if len(chosen) < limit and hook not in busy_hooks and admit(row["url"]):
                    chosen.append(str(row["id"]))
                elif hook not in busy_hooks:
                    busy_hooks.append(hook)
            if len(rows) < batch or len(chosen) >= limit:
                break
        if not chosen:
            return []

        await cursor.execute(
            "UPDATE webhook_deliveries d"
            " SET claimed_until = now() + make_interval(secs => %s)"
            " FROM webhooks w"
            " WHERE w.id = d.webhook_id AND d.id = ANY(%s::uuid[])"
            " RETURNING d.id, d.webhook_id, d.event, d.body, d.attempts,"
            "  extract(epoch FROM now() - d.created_at)::float8 AS age,"
            "  w.url, w.secret",
            (lease, chosen),
        )
        claimed = {
            str(row["id"]): ClaimedDelivery(
                id=str(row["id"]),
                webhook_id=str(row["webhook_id"]),
                event=row["event"],
                body=row["body"],
                attempts=int(row["attempts"]),
                age=float(row["age"]),
                url=row["url"],
                secret=row["secret"] or None,
            )
            for row in cursor.fetchall()
        }
        return [claimed[id] for id in chosen if id in claimed]

    async def delivered(self, delivery_id: str, status_code: int | None) -> None:
        """
        Record a successful attempt.
        """
        await self._service.database.execute(
            "UPDATE webhook_deliveries SET status = 'delivered',"
            " attempts = attempts + 1, last_status_code = %s, last_error = NULL,"
            " delivered_at = now(), claimed_until = NULL"
            " WHERE id = %s AND status = 'pending'",
            (status_code, delivery_id),
        )

    async def retry(
        self,
        delivery_id: str,
        status_code: int | None,
        error: str | None,
        delay: float,
    ) -> None:
        """
        Record a failed attempt that will be retried after C{delay} seconds.
        """
        await self._service.database.execute(
            "UPDATE webhook_deliveries SET attempts = attempts + 1,"
            " last_status_code = %s, last_error = %s, claimed_until = NULL,"
            " next_attempt_at = now() + make_interval(secs => %s)"
            " WHERE id = %s AND status = 'pending'",
            (status_code, error, delay, delivery_id),
        )

    async def failed(
        self, delivery_id: str, status_code: int | None, error: str | None
    ) -> None:
        """
        Record a final failure.
        """
        await self._service.database.execute(
            "UPDATE webhook_deliveries SET status = 'failed',"
            " attempts = attempts + 1, last_status_code = %s, last_error = %s,"
            " claimed_until = NULL"
            " WHERE id = %s AND status = 'pending'",
            (status_code, error, delivery_id),
        )

    async def release(self, delivery_ids: Sequence[str]) -> None:
        """
        Give up the lease of deliveries not (fully) attempted: they are due
        again at once, their attempts unchanged.
        """
        if delivery_ids:
            await self._service.database.execute(
                "UPDATE webhook_deliveries SET claimed_until = NULL"
                " WHERE id = ANY(%s::uuid[])",
                (list(delivery_ids),),
            )


# -- The dispatcher ------------------------------------------------------------


class _Cut(Exception):
    """
    The attempt was cut off by the shutdown deadline.
    """


class _DiscardBody(Protocol):
    """
    Drops a response body unread: the status is all a delivery needs, and a
    receiver trickling a body must not hold the slot.
    """

    def connectionMade(self) -> None:
        producer = cast(IPushProducer, self.transport)
        producer.stopProducing()


class _Job:
    """
    One delivery in flight on this node.
    """

    def __init__(self, delivery: ClaimedDelivery, host: str) -> None:
        self.delivery = delivery
        self.host = host
        self.current: Deferred[Any] | None = None
        self.cut = False
        self.timed_out = False
        self.done: Deferred[None] = succeed(None)

    def cut_off(self) -> None:
        self.cut = True
        # Not "if not called": a Deferred waiting on a chained one (treq's,
        # once connected) counts as called, and cancel() reaches the inner one.
        if self.current is not None:
            self.current.cancel()


def host_of(url: str) -> str:
    """
    The host a URL's deliveries are counted against (lower case).
    """
    try:
        return (urlsplit(url).hostname or url).rstrip(".").lower()
    except ValueError:
        return url


ClientFactory = Callable[[Sequence[str]], HTTPClient]


class _QuietFactory(_HTTP11ClientFactory):
    # One connection per attempt: "Starting factory" / "Stopping factory" for
    # each would drown the log.
    noisy = False


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


class WebhookDispatcher(Service):
    """
    Sends webhook deliveries from the database, with retries.

    It looks for due deliveries every C{poll_interval} seconds, when
    L{wake} is called (after a push was recorded, a redelivery was asked
    for), when a slot frees up and when a retry falls due.

    @param reactor: connects, resolves and times everything (a C{Clock} in
        tests).
    @param queue: the deliveries table.
    @param grace: returns, at stop, how many seconds deliveries in flight may
        take to finish before they are cut off.
    @param allow_private: the operator's switch: private targets are fine.
    @param max_attempts: attempts before a retryable failure is final.
    @param max_age: seconds after its creation a delivery is no longer
        retried.
    @param connect_timeout: seconds to resolve, and again to connect.
    @param response_timeout: seconds the receiver has to answer, on top of
        the connect time (an attempt lasts at most connect + response after
        resolving).
    @param retry_base: seconds before the first retry; each retry doubles it.
    @param retry_max: the longest wait between attempts.
    @param concurrency: deliveries in flight on this node at most.
    @param per_host: deliveries in flight to one host at most.
    @param resolver: resolves hook hosts; the reactor's by default.
    @param client_factory: makes the HTTP client for one attempt from the
        checked addresses; by default a treq client whose connections go to
        those addresses only.
    @param jitter: returns a number in [0, 1] for the backoff jitter.

    @ivar cut_off: deliveries cut off by the last stop's grace deadline.
    """

    name = "webhooks"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        queue: DeliveryQueue,
        *,
        grace: Callable[[], float],
        allow_private: bool = False,
        max_attempts: int = 8,
        max_age: float = 86400.0,
        connect_timeout: float = 10.0,
        response_timeout: float = 10.0,
        retry_base: float = 10.0,
        retry_max: float = 3600.0,
        concurrency: int = 16,
        per_host: int = 2,
        poll_interval: float = 1.0,
        resolver: IHostnameResolver | None = None,
        client_factory: ClientFactory | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._queue = queue
        self._grace = grace
        self.allow_private = allow_private
        self.max_attempts = max_attempts
        self.max_age = max_age
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.concurrency = concurrency
        self.per_host = per_host
        self._poll_interval = poll_interval
        self._resolver = resolver
        self._client_factory = client_factory or self._pinned_client
        self._jitter = jitter

        self._jobs: dict[str, _Job] = {}
        self._host_load: Counter[str] = Counter()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = reactor
        self._claiming: Deferred[None] | None = None
        self._again = False
        self._wake_call: IDelayedCall | None = None
        self._retry_call: IDelayedCall | None = None
        self.cut_off = 0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        reactor: Any,
        database: DatabaseService,
        grace: Callable[[], float] | None = None,
    ) -> WebhookDispatcher:
        """
        A dispatcher configured by the node's settings.

        @param grace: as for the constructor; C{GITLAWB_SHUTDOWN_GRACE_SECS}
            by default.
        """
        return cls(
            reactor,
            DeliveryQueue(database),
            grace=grace or (lambda: float(settings.shutdown_grace_secs)),
            allow_private=settings.allow_private_webhooks,
            max_attempts=settings.webhook_max_attempts,
            max_age=settings.webhook_max_age_secs,
            connect_timeout=settings.webhook_connect_timeout_secs,
            response_timeout=settings.webhook_timeout_secs,
            retry_base=settings.webhook_retry_base_secs,
            retry_max=settings.webhook_retry_max_secs,
            concurrency=settings.webhook_concurrency,
            per_host=settings.webhook_per_host_concurrency,
        )

    @property
    def lease(self) -> float:
        """
        Seconds a claim holds a row: longer than any attempt can take
        (resolve, connect, answer), with room for the database writes.
        """
        return 2 * self.connect_timeout + self.response_timeout + 60.0

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    # -- Lifecycle --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.cut_off = 0
        self.log.info(
            "webhook dispatcher started: {total} at once, {per_host} per host,"
            " {attempts} attempts within {age:g}s, private targets {private}",
            total=self.concurrency,
            per_host=self.per_host,
            attempts=self.max_attempts,
            age=self.max_age,
            private="allowed" if self.allow_private else "refused",
        )
        self._loop.start(self._poll_interval, now=True)

    def stopService(self) -> Deferred[None]:
        """
        Stop looking for work, let the deliveries in flight finish until the
        grace deadline, then cut the rest off.  A cut delivery stays pending
        with its lease released and its attempt not counted (the receiver
        may have it; the same delivery id lets it tell), so the next start
        sends it again.

        @return: a Deferred that fires once every delivery in flight has
            finished or been cut off and its row written.
        """
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for call in (self._wake_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._wake_call = self._retry_call = None
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        started = self._reactor.seconds()

        # A claim under way finishes first; what it claimed is released, not
        # started (see _claim_and_start).
        if self._claiming is not None:
            await _settled(self._claiming)
        jobs = list(self._jobs.values())
        if not jobs:
            self.log.info("webhook dispatcher stopped; nothing in flight")
            return

        grace = max(0.0, self._grace())
        self.log.info(
            "webhook deliveries in flight={count}; waiting up to {grace:g}s",
            count=len(jobs),
            grace=grace,
        )
        deadline = self._reactor.callLater(grace, self._cut_all)
        try:
            for job in jobs:
                await _settled(job.done)
        finally:
            if deadline.active():
                deadline.cancel()
        elapsed = self._reactor.seconds() - started
        if self.cut_off:
            self.log.warn(
                "webhook deliveries drained in {elapsed:.2f}s; cut off at the"
                " grace deadline={cut} (left pending, sent after restart)",
                elapsed=elapsed,
                cut=self.cut_off,
            )
        else:
            self.log.info(
                "webhook deliveries drained in {elapsed:.2f}s; none cut off",
                elapsed=elapsed,
            )

    def _cut_all(self) -> None:
        for job in list(self._jobs.values()):
            if not job.cut:
                self.cut_off += 1
                job.cut_off()

    # -- Finding work -------------------------------------------------------------

    def wake(self) -> None:
        """
        Look for due deliveries now rather than at the next poll (call it
        after a push with webhook deliveries was recorded).  Cheap and safe to
        call any number of times.
        """
        if not self.running:
            return
        if self._claiming is not None:
            self._again = True
            return
        if self._wake_call is None or not self._wake_call.active():
            self._wake_call = self._reactor.callLater(0, self._poll)

    def _poll(self) -> Deferred[None] | None:
        if self._claiming is not None:
            self._again = True
            return None
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        claiming = Deferred.fromCoroutine(self._claim_loop())
        self._claiming = claiming

        def finished(result: object) -> None:
            self._claiming = None
            if not isinstance(result, Failure):
                return
            if result.check(DatabaseUnavailable, *CONNECTION_ERRORS):
                # The database is away; the pool reconnects, the next poll
                # tries again.  One line, not a traceback a second.
                self.log.warn(
                    "cannot claim webhook deliveries: {error}",
                    error=_describe(result),
                )
            else:
                self.log.failure("claiming webhook deliveries failed", result)

        claiming.addBoth(finished)
        # The loop does not wait for the claim: a wake or a poll while it runs
        # only asks for one more round.
        return None

    async def _claim_loop(self) -> None:
        while True:
            self._again = False
            await self._claim_and_start()
            if not (self._again and self.running):
                return

    async def _claim_and_start(self) -> None:
        if not self.running or not self._queue.ready:
            return
        free = self.concurrency - len(self._jobs)
        if free <= 0:
            return

        # Plan against a copy of the host loads: the claim may fail and roll
        # back, and only what it returns is really ours.
        planned = Counter(self._host_load)

        def admit(url: str) -> bool:
            host = host_of(url)
            if planned[host] >= self.per_host:
                return False
            planned[host] += 1
            return True

        claimed = await self._queue.claim(
            admit, free, self.lease, exclude=list(self._jobs)
        )
        if not self.running:
            # Stopped while claiming: leave the rows to the next start.
            await self._queue.release([d.id for d in claimed])
            return
        for delivery in claimed:
            self._start(delivery)

    def _start(self, delivery: ClaimedDelivery) -> None:
        job = _Job(delivery, host_of(delivery.url))
        self._jobs[delivery.id] = job
        self._host_load[job.host] += 1
        job.done = Deferred.fromCoroutine(self._run(job))

    async def _run(self, job: _Job) -> None:
        try:
            await self._deliver(job)
        except Exception:
            self.log.failure(
                "webhook delivery {id} could not be recorded; it is retried"
                " when its lease runs out",
                id=job.delivery.id,
            )
        finally:
            del self._jobs[job.delivery.id]
            self._host_load[job.host] -= 1
            if self._host_load[job.host] <= 0:
                del self._host_load[job.host]
            # A slot is free: there may be more work due.
            self.wake()

    # -- One attempt --------------------------------------------------------------

    async def _deliver(self, job: _Job) -> None:
        delivery = job.delivery
        started = self._reactor.seconds()
        try:
            outcome = await self._attempt(job)
        except _Cut:
            await self._queue.release([delivery.id])
            self.log.info(
                "webhook delivery {id} cut off by shutdown; left pending",
                id=delivery.id,
            )
            return

        metrics.record_webhook(outcome.result)
        attempts = delivery.attempts + 1
        if outcome.delivered:
            await self._queue.delivered(delivery.id, outcome.status_code)
            self.log.debug(
                "webhook delivered id={id} hook={hook} status={status}",
                id=delivery.id,
                hook=delivery.webhook_id,
                status=outcome.status_code,
            )
            return

        elapsed = self._reactor.seconds() - started
        delay = backoff_delay(attempts, self.retry_base, self.retry_max, self._jitter())
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, self.retry_max))
        if outcome.retryable and not should_give_up(
            attempts, self.max_attempts, delivery.age + elapsed, delay, self.max_age
        ):
            await self._queue.retry(
                delivery.id, outcome.status_code, outcome.error, delay
            )
            self.log.info(
                "webhook delivery {id} attempt {attempt} failed ({error});"
                " retry in {delay:.1f}s",
                id=delivery.id,
                attempt=attempts,
                error=outcome.error,
                delay=delay,
            )
            self._wake_in(delay)
            return

        await self._queue.failed(delivery.id, outcome.status_code, outcome.error)
        self.log.warn(
            "webhook delivery {id} failed after {attempts} attempt(s): {error}",
            id=delivery.id,
            attempts=attempts,
            error=outcome.error,
        )

    async def _attempt(self, job: _Job) -> AttemptOutcome:
        """
        Check the target, send, and say what came of it.

        @raise _Cut: when the shutdown deadline cut the attempt off.
        """
        delivery = job.delivery

        # The target is judged again now: DNS may have changed since the
        # hook was made.  The connection goes to these very addresses.
        check = Deferred.fromCoroutine(
            check_public_url(
                delivery.url,
                self._reactor,
                self.allow_private,
                resolver=self._resolver,
                timeout=self.connect_timeout,
            )
        )
        job.current = check
        try:
            addresses = await check
        except UnsafeWebhookUrl as e:
            return AttemptOutcome("network_error", False, None, f"refused: {e}")
        except UnresolvableWebhookHost as e:
            return AttemptOutcome("network_error", True, None, str(e))
        except CancelledError:
            raise _Cut() from None
        finally:
            job.current = None
        if job.cut:
            raise _Cut()

        body = delivery.body.encode("utf-8")
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"User-Agent": [f"gitlawb-node/{__version__}".encode("ascii")],
                b"X-Gitlawb-Event": [delivery.event.encode("utf-8")],
                b"X-Gitlawb-Delivery": [delivery.id.encode("ascii")],
            }
        )
        if delivery.secret:
            signature = signature_header(delivery.secret, body)
            headers.addRawHeader(b"X-Gitlawb-Signature-256", signature.encode("ascii"))
        client = self._client_factory(addresses)
        request: Deferred[Any] = client.post(
            delivery.url, data=body, headers=headers, allow_redirects=False
        )
        job.current = request
        limit = self.connect_timeout + self.response_timeout

        def timed_out() -> None:
            job.timed_out = True
            request.cancel()

        timer = self._reactor.callLater(limit, timed_out)
        try:
            response = await request
        except Exception as e:
            if job.cut:
                raise _Cut() from None
            if job.timed_out:
                return AttemptOutcome(
                    "network_error", True, None, f"no answer within {limit:g}s"
                )
            return AttemptOutcome("network_error", True, None, _describe(e))
        finally:
            job.current = None
            if timer.active():
                timer.cancel()

        response.deliverBody(_DiscardBody())
        retry_after = response.headers.getRawHeaders(b"retry-after")
        return classify_response(
            int(response.code),
            retry_after[0].decode("latin-1") if retry_after else None,
        )

    def _wake_in(self, delay: float) -> None:
        # One timer for the earliest retry due; the poll covers the others.
        if not self.running:
            return
        due = self._reactor.seconds() + delay
        call = self._retry_call
        if call is not None and call.active():
            if call.getTime() <= due:
                return
            call.cancel()
        self._retry_call = self._reactor.callLater(delay, self.wake)

    def _pinned_client(self, addresses: Sequence[str]) -> HTTPClient:
        # A fresh, non-persistent pool per attempt: a kept-alive connection
        # would outlive the address check it was made under.
        pool = _QuietPool(self._reactor, persistent=False)
        factory = PinnedEndpointFactory(self._reactor, addresses, self.connect_timeout)
        return HTTPClient(Agent.usingEndpointFactory(self._reactor, factory, pool))


async def _settled(deferred: Deferred[Any]) -> None:
    try:
        await deferred
    except Exception:
        pass
