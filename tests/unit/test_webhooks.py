"""
The webhook dispatcher and its SSRF guard, on a Clock, a MemoryReactor,
StubTreq and an in-memory queue: no sockets, no sleeping.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from gitlawb import metrics
from gitlawb.api.hooks import delivery_json, hook_json
from gitlawb.config import ConfigError, Settings
from gitlawb.webhooks import (
    ClaimedDelivery,
    PinnedEndpointFactory,
    UnresolvableWebhookHost,
    UnsafeWebhookUrl,
    WebhookDispatcher,
    backoff_delay,
    check_public_url,
    check_url_form,
    classify_response,
    refusal_reason,
    should_give_up,
    signature_header,
)

PUBLIC_IP = "93.184.216.34"
BODY = '{"ref":"refs/heads/main","before":"0000","after":"1111"}'


# -- Fakes ---------------------------------------------------------------------


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Answers from a table; a name mapped to C{None} never answers.
    """

    def __init__(self, table: dict[str, list[str] | None]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        self.asked.append(hostName)
        resolutionReceiver.resolutionBegan(None)  # type: ignore[arg-type]
        answer = self.table.get(hostName, [])
        if answer is None:
            return None
        for address in answer:
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return None


@dataclass
class Row:
    delivery: ClaimedDelivery
    created: float
    status: str = "pending"
    due: float = 0.0
    claimed: bool = False
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    delays: list[float] = field(default_factory=list)


class FakeQueue:
    """
    The deliveries table in memory, on the test's clock.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rows: dict[str, Row] = {}
        self.ready = True
        self.releases: list[str] = []

    def add(
        self,
        url: str = "http://hooks.example/in",
        secret: str | None = None,
        hook: str | None = None,
        age: float = 0.0,
    ) -> str:
        delivery_id = str(uuid.uuid4())
        delivery = ClaimedDelivery(
            id=delivery_id,
            webhook_id=hook or str(uuid.uuid5(uuid.NAMESPACE_URL, url)),
            event="push",
            body=BODY,
            attempts=0,
            age=0.0,
            url=url,
            secret=secret,
        )
        now = self.clock.seconds()
        self.rows[delivery_id] = Row(delivery, created=now - age, due=now)
        return delivery_id

    async def claim(
        self, admit: Any, limit: int, lease: float, exclude: Sequence[str] = ()
    ) -> list[ClaimedDelivery]:
        now = self.clock.seconds()
        due = sorted(
            (
                r
                for r in self.rows.values()
                if r.status == "pending" and not r.claimed and r.due <= now
            ),
            key=lambda r: r.due,
        )
        claimed, busy = [], set()
        for row in due:
            if len(claimed) >= limit:
                break
            if row.delivery.webhook_id in busy or row.delivery.id in exclude:
                continue
            if not admit(row.delivery.url):
                busy.add(row.delivery.webhook_id)
                continue
            row.claimed = True
            claimed.append(
                ClaimedDelivery(
                    **{
                        **row.delivery.__dict__,
                        "attempts": row.attempts,
                        "age": now - row.created,
                    }
                )
            )
        return claimed

    def _settle(self, delivery_id: str, code: int | None, error: str | None) -> Row:
        row = self.rows[delivery_id]
        row.attempts += 1
        row.claimed = False
        row.last_status_code = code
        row.last_error = error
        return row

    async def delivered(self, delivery_id: str, status_code: int | None) -> None:
        self._settle(delivery_id, status_code, None).status = "delivered"

    async def retry(
        self, delivery_id: str, status_code: int | None, error: str | None, delay: float
    ) -> None:
        row = self._settle(delivery_id, status_code, error)
        row.due = self.clock.seconds() + delay
        row.delays.append(delay)

    async def failed(
        self, delivery_id: str, status_code: int | None, error: str | None
    ) -> None:
        self._settle(delivery_id, status_code, error).status = "failed"

    async def release(self, delivery_ids: Sequence[str]) -> None:
        for delivery_id in delivery_ids:
            self.rows[delivery_id].claimed = False
            self.releases.append(delivery_id)


class BodyTransport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    def __init__(self, code: int, headers: dict[bytes, list[bytes]] | None = None):
        self.code = code
        self.headers = Headers(headers or {})
        self.body = BodyTransport()

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(self.body)  # type: ignore[arg-type]


@dataclass
class Sent:
    url: str
    body: bytes
    headers: Headers
    allow_redirects: bool
    answer: Deferred[Any]


class FakeClient:
    """
    A treq client whose every request waits for the test to answer it.
    """

    def __init__(self, chained: bool = False) -> None:
        self.sent: list[Sent] = []
        self.addresses: list[Sequence[str]] = []
        self.chained = chained

    def factory(self, addresses: Sequence[str]) -> FakeClient:
        self.addresses.append(list(addresses))
        return self

    def post(
        self, url: str, data: bytes, headers: Headers, allow_redirects: bool
    ) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()
        self.sent.append(Sent(url, data, headers, allow_redirects, answer))
        if self.chained:
            # As an Agent's request once connected: already "called", paused
            # on the Deferred of the response.
            outer: Deferred[Any] = Deferred()
            outer.callback(None)
            outer.addCallback(lambda _: answer)
            return outer
        return answer

    def pending(self) -> list[Sent]:
        return [s for s in self.sent if not s.answer.called]


def counted(result: str) -> float:
    families = metrics.families()
    assert families is not None
    value = families.registry.get_sample_value(
        "gitlawb_webhook_deliveries_total", {"result": result}
    )
    return value or 0.0


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    metrics.reset()
    metrics.initialise("test", "did:key:z6Mktest")
    yield
    metrics.reset()


# -- Classification, backoff, signatures ---------------------------------------


def test_2xx_is_delivered() -> None:
    """A 2xx answer counts as delivered."""
    outcome = classify_response(204)

    assert outcome.delivered and outcome.result == "ok"


@pytest.mark.parametrize("code", [429, 500, 502, 503, 599])
def test_429_and_5xx_are_retried(code: int) -> None:
    """429 and 5xx are http errors worth another attempt."""
    outcome = classify_response(code)

    assert (outcome.result, outcome.retryable, outcome.status_code) == (
        "http_error",
        True,
        code,
    )


@pytest.mark.parametrize("code", [301, 302, 307, 400, 401, 404, 410, 422])
def test_other_statuses_are_final(code: int) -> None:
    """3xx (redirects are not followed) and other 4xx are final."""
    outcome = classify_response(code)

    assert outcome.result == "http_error" and not outcome.retryable


def test_retry_after_seconds_are_read() -> None:
    """A Retry-After in seconds is passed on; an HTTP date is ignored."""
    assert classify_response(429, "120").retry_after == 120.0
    assert classify_response(503, "Wed, 21 Oct 2026 07:28:00 GMT").retry_after is None


def test_backoff_doubles_up_to_the_cap() -> None:
    """Without jitter the wait doubles per attempt and stops at the cap."""
    delays = [backoff_delay(n, 10.0, 60.0, jitter=1.0) for n in range(1, 6)]

    assert delays == [10.0, 20.0, 40.0, 60.0, 60.0]


def test_backoff_jitter_keeps_the_upper_half() -> None:
    """Jitter scales a wait between half of it and all of it."""
    assert backoff_delay(3, 10.0, 3600.0, jitter=0.0) == 20.0
    assert backoff_delay(3, 10.0, 3600.0, jitter=0.5) == 30.0


def test_backoff_survives_huge_attempt_counts() -> None:
    """A very high attempt number does not overflow."""
    assert backoff_delay(10_000, 1.0, 5.0) == 5.0


def test_give_up_after_max_attempts_or_age() -> None:
    """A retryable failure is final once attempts or the age are used up."""
    assert should_give_up(8, 8, age=0, delay=1, max_age=100)
    assert should_give_up(2, 8, age=95, delay=10, max_age=100)
    assert not should_give_up(2, 8, age=10, delay=10, max_age=100)


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    """The signature header is sha256= and the hex HMAC of the exact bytes."""
    body = BODY.encode()

    value = signature_header("s3cret", body)

    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert value == f"sha256={expected}"


# -- The SSRF guard ------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example/x",
        "hooks.example/x",
        "http:///x",
        "http://user:pw@hooks.example/x",
        "http://hooks.example:0/x",
        "http://hooks.example:99999/x",
        "http://hooks.example/a b",
        "http://localhost:8080/x",
        "http://LOCALHOST./x",
        "http://printer.local/x",
        "http://metadata.google.internal/x",
        "http://app.localhost/x",
    ],
)
def test_url_form_refusals(url: str) -> None:
    """Non-http(s) URLs, credentials, bad ports and private names are refused."""
    with pytest.raises(UnsafeWebhookUrl):
        check_url_form(url, allow_private=False)


def test_private_names_allowed_by_the_switch() -> None:
    """The operator's switch lets private names through."""
    target = check_url_form("http://localhost:8080/x", allow_private=True)

    assert (target.scheme, target.host, target.port) == ("http", "localhost", 8080)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "192.0.2.1",
        "::1",
        "::",
        "fc00::1",
        "fe80::1%eth0",
        "ff02::1",
        "::ffff:127.0.0.1",
        "2002:7f00:1::",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    """Loopback, private, link-local, shared, reserved, multicast and embedded
    private IPv4 addresses are refused."""
    assert refusal_reason(address, allow_private=False) is not None


@pytest.mark.parametrize("address", [PUBLIC_IP, "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_accepted(address: str) -> None:
    """Global unicast addresses are fine."""
    assert refusal_reason(address, allow_private=False) is None


def test_switch_allows_private_but_not_multicast() -> None:
    """With the switch, private and loopback pass; multicast never does."""
    assert refusal_reason("127.0.0.1", allow_private=True) is None
    assert refusal_reason("10.0.0.1", allow_private=True) is None
    assert refusal_reason("224.0.0.1", allow_private=True) is not None


class CheckPublicUrlTests(SynchronousTestCase):
    def check(self, url: str, resolver: FakeResolver, **kw: Any) -> Deferred[Any]:
        self.clock = Clock()
        return Deferred.fromCoroutine(
            check_public_url(
                url,
                self.clock,
                kw.pop("allow_private", False),
                resolver=resolver,
                **kw,
            )
        )

    def test_public_name_returns_its_addresses(self) -> None:
        """A name resolving to public addresses answers with those addresses."""
        resolver = FakeResolver({"hooks.example": [PUBLIC_IP, "2606:4700::1"]})

        addresses = self.successResultOf(
            self.check("https://hooks.example/x", resolver)
        )

        self.assertEqual(addresses, [PUBLIC_IP, "2606:4700::1"])

    def test_public_name_resolving_to_private_is_refused(self) -> None:
        """A public-looking name whose address is private is refused."""
        resolver = FakeResolver({"innocent.example": ["10.0.0.5"]})

        failure = self.failureResultOf(
            self.check("http://innocent.example/x", resolver), UnsafeWebhookUrl
        )

        self.assertIn("10.0.0.5", str(failure.value))

    def test_one_private_address_among_public_ones_is_refused(self) -> None:
        """Every resolved address must be public, not just the first."""
        resolver = FakeResolver({"mixed.example": [PUBLIC_IP, "127.0.0.1"]})

        self.failureResultOf(
            self.check("http://mixed.example/x", resolver), UnsafeWebhookUrl
        )

    def test_ip_literal_is_checked_without_dns(self) -> None:
        """An IP literal is judged as it is and no resolver is asked."""
        resolver = FakeResolver({})

        self.failureResultOf(
            self.check("http://127.0.0.1:9000/x", resolver), UnsafeWebhookUrl
        )
        self.assertEqual(resolver.asked, [])

    def test_unresolvable_name(self) -> None:
        """A name that resolves to nothing is reported as unresolvable."""
        self.failureResultOf(
            self.check("http://nowhere.example/x", FakeResolver({})),
            UnresolvableWebhookHost,
        )

    def test_resolution_times_out_on_the_clock(self) -> None:
        """A resolver that never answers is given up on after the timeout."""
        d = self.check(
            "http://slow.example/x", FakeResolver({"slow.example": None}), timeout=3
        )
        self.assertNoResult(d)

        self.clock.advance(3)

        self.failureResultOf(d, UnresolvableWebhookHost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_switch_allows_loopback(self) -> None:
        """With the switch on, a loopback target is accepted."""
        resolver = FakeResolver({})

        addresses = self.successResultOf(
            self.check("http://127.0.0.1:9000/x", resolver, allow_private=True)
        )

        self.assertEqual(addresses, ["127.0.0.1"])


class PinnedEndpointTests(SynchronousTestCase):
    def test_agent_connects_to_the_checked_address(self) -> None:
        """An Agent on the pinned factory connects to the checked IP, not to
        whatever the name would resolve to now."""
        reactor = MemoryReactorClock()
        factory = PinnedEndpointFactory(reactor, [PUBLIC_IP], 10)
        agent = Agent.usingEndpointFactory(
            reactor, factory, HTTPConnectionPool(reactor, persistent=False)
        )

        agent.request(b"POST", b"http://hooks.example:8080/in")

        host, port, _, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), (PUBLIC_IP, 8080, 10))

    def test_https_connects_to_the_checked_address(self) -> None:
        """An https endpoint wraps TLS around a connection to the checked IP."""
        reactor = MemoryReactorClock()
        factory = PinnedEndpointFactory(reactor, [PUBLIC_IP], 10)
        endpoint = factory.endpointForURI(URI.fromBytes(b"https://hooks.example/in"))

        endpoint.connect(Factory.forProtocol(Protocol))

        host, port, *_ = reactor.tcpClients[0]
        self.assertEqual((host, port), (PUBLIC_IP, 443))

    def test_next_address_after_a_refused_one(self) -> None:
        """When the first checked address refuses, the next one is tried."""
        reactor = MemoryReactorClock()
        factory = PinnedEndpointFactory(reactor, ["2606:4700::1", PUBLIC_IP], 10)
        endpoint = factory.endpointForURI(URI.fromBytes(b"http://hooks.example/in"))
        endpoint.connect(Factory.forProtocol(Protocol))

        _, _, connecting, _, _ = reactor.tcpClients[0]
        connecting.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

        self.assertEqual(
            [c[0] for c in reactor.tcpClients], ["2606:4700::1", PUBLIC_IP]
        )


# -- The dispatcher ------------------------------------------------------------


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.queue = FakeQueue(self.clock)
        self.client = FakeClient()
        self.resolver = FakeResolver(
            {
                "hooks.example": [PUBLIC_IP],
                "slow.example": ["203.0.113.200"],
                "fast.example": ["198.51.100.200"],
                "sneaky.example": ["192.168.0.10"],
            }
        )
        # 203.0.113.0/24 and 198.51.100.0/24 are documentation ranges, which
        # the guard refuses; the tests that use them allow private targets.
        self.dispatcher: WebhookDispatcher | None = None

    def start(self, **settings: Any) -> WebhookDispatcher:
        options: dict[str, Any] = {
            "grace": lambda: 5.0,
            "resolver": self.resolver,
            "client_factory": self.client.factory,
            "jitter": lambda: 1.0,
            "retry_base": 1.0,
            "retry_max": 60.0,
            "connect_timeout": 10.0,
            "response_timeout": 10.0,
            **settings,
        }
        dispatcher = WebhookDispatcher(self.clock, self.queue, **options)  # type: ignore[arg-type]
        dispatcher.startService()
        self.dispatcher = dispatcher
        return dispatcher

    def stop(self) -> None:
        assert self.dispatcher is not None
        if self.dispatcher.running:
            self.successResultOf(self.dispatcher.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def answer(self, sent: Sent, code: int, **headers: str) -> None:
        raw = {k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()}
        sent.answer.callback(FakeResponse(code, raw))

    def test_sends_the_stored_body_with_the_protocol_headers(self) -> None:
        """A delivery is POSTed with its body, event, id and HMAC signature."""
        delivery_id = self.queue.add(secret="s3cret")

        self.start()

        [sent] = self.client.sent
        self.assertEqual(sent.url, "http://hooks.example/in")
        self.assertEqual(sent.body, BODY.encode())
        self.assertFalse(sent.allow_redirects)
        header = sent.headers.getRawHeaders
        self.assertEqual(header(b"content-type"), [b"application/json"])
        self.assertEqual(header(b"x-gitlawb-event"), [b"push"])
        self.assertEqual(header(b"x-gitlawb-delivery"), [delivery_id.encode()])
        self.assertEqual(
            header(b"x-gitlawb-signature-256"),
            [signature_header("s3cret", BODY.encode()).encode()],
        )
        self.assertEqual(self.client.addresses, [[PUBLIC_IP]])
        self.answer(sent, 200)
        self.stop()

    def test_no_signature_without_a_secret(self) -> None:
        """A hook without a secret gets no signature header."""
        self.queue.add(secret=None)

        self.start()

        [sent] = self.client.sent
        self.assertIsNone(sent.headers.getRawHeaders(b"x-gitlawb-signature-256"))
        self.answer(sent, 200)
        self.stop()

    def test_2xx_records_delivered_and_counts_ok(self) -> None:
        """A 2xx answer marks the row delivered and is counted ok."""
        delivery_id = self.queue.add()
        self.start()
        response = FakeResponse(202)

        self.client.sent[0].answer.callback(response)

        row = self.queue.rows[delivery_id]
        self.assertEqual(
            (row.status, row.attempts, row.last_status_code), ("delivered", 1, 202)
        )
        self.assertTrue(response.body.stopped)
        self.assertEqual(counted("ok"), 1)
        self.stop()

    def test_5xx_twice_then_200_keeps_the_delivery_id(self) -> None:
        """Two 500s are retried with backoff and the third attempt, carrying
        the same delivery id, is delivered."""
        delivery_id = self.queue.add()
        self.start()

        self.answer(self.client.sent[0], 500)
        self.clock.advance(1.0)
        self.answer(self.client.sent[1], 500)
        self.clock.advance(2.0)
        self.answer(self.client.sent[2], 200)

        ids = {
            s.headers.getRawHeaders(b"x-gitlawb-delivery")[0] for s in self.client.sent
        }
        row = self.queue.rows[delivery_id]
        self.assertEqual(ids, {delivery_id.encode()})
        self.assertEqual(
            (row.status, row.attempts, row.delays), ("delivered", 3, [1.0, 2.0])
        )
        self.assertEqual((counted("http_error"), counted("ok")), (2, 1))
        self.stop()

    def test_retry_waits_for_the_backoff(self) -> None:
        """A retry is not sent before its backoff has passed."""
        self.queue.add()
        self.start()

        self.answer(self.client.sent[0], 503)
        self.clock.advance(0.9)

        self.assertEqual(len(self.client.sent), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.sent), 2)
        self.answer(self.client.sent[1], 200)
        self.stop()

    def test_retry_after_lengthens_the_wait(self) -> None:
        """A 429's Retry-After is honoured when longer than the backoff."""
        delivery_id = self.queue.add()
        self.start()

        self.answer(self.client.sent[0], 429, retry_after="30")

        self.assertEqual(self.queue.rows[delivery_id].delays, [30.0])
        self.stop()

    def test_404_is_final(self) -> None:
        """A 404 fails the delivery at once, without a retry."""
        delivery_id = self.queue.add()
        self.start()

        self.answer(self.client.sent[0], 404)
        self.clock.advance(3600)

        row = self.queue.rows[delivery_id]
        self.assertEqual(
            (row.status, row.attempts, row.last_error), ("failed", 1, "HTTP 404")
        )
        self.assertEqual(len(self.client.sent), 1)
        self.stop()

    def test_redirect_is_final_and_not_followed(self) -> None:
        """A 302 is recorded as a final failure, its Location never visited."""
        delivery_id = self.queue.add()
        self.start()

        self.answer(self.client.sent[0], 302, location="http://127.0.0.1/")

        row = self.queue.rows[delivery_id]
        self.assertEqual(row.status, "failed")
        self.assertIn("redirect", row.last_error or "")
        self.assertEqual(len(self.client.sent), 1)
        self.stop()

    def test_network_error_is_retried(self) -> None:
        """A refused connection is a network error, retried."""
        delivery_id = self.queue.add()
        self.start()

        self.client.sent[0].answer.errback(ConnectionRefusedError())

        row = self.queue.rows[delivery_id]
        self.assertEqual((row.status, row.attempts), ("pending", 1))
        self.assertIn("ConnectionRefusedError", row.last_error or "")
        self.assertEqual(counted("network_error"), 1)
        self.stop()

    def test_silent_receiver_times_out_within_the_bound(self) -> None:
        """A receiver that never answers is cut off after connect + response
        timeout and the delivery retried."""
        delivery_id = self.queue.add()
        self.start(connect_timeout=2.0, response_timeout=3.0)

        self.clock.advance(4.9)
        self.assertEqual(self.queue.rows[delivery_id].attempts, 0)
        self.clock.advance(0.1)

        row = self.queue.rows[delivery_id]
        self.assertTrue(self.client.sent[0].answer.called)
        self.assertEqual((row.status, row.attempts), ("pending", 1))
        self.assertIn("no answer within 5s", row.last_error or "")
        self.stop()

    def test_max_attempts_make_a_retryable_failure_final(self) -> None:
        """After the last allowed attempt a 500 fails the delivery."""
        delivery_id = self.queue.add()
        self.start(max_attempts=2)

        self.answer(self.client.sent[0], 500)
        self.clock.advance(1.0)
        self.answer(self.client.sent[1], 500)
        self.clock.advance(3600)

        row = self.queue.rows[delivery_id]
        self.assertEqual((row.status, row.attempts), ("failed", 2))
        self.assertEqual(len(self.client.sent), 2)
        self.stop()

    def test_max_age_makes_a_retryable_failure_final(self) -> None:
        """A delivery whose next attempt would fall after the maximum age fails."""
        delivery_id = self.queue.add(age=99.5)
        self.start(max_age=100.0)

        self.answer(self.client.sent[0], 503)

        self.assertEqual(self.queue.rows[delivery_id].status, "failed")
        self.stop()

    def test_host_resolving_to_private_is_refused_at_delivery(self) -> None:
        """A host that now resolves to a private address is refused without a
        request, and the refusal is final."""
        delivery_id = self.queue.add(url="http://sneaky.example/in")

        self.start()

        row = self.queue.rows[delivery_id]
        self.assertEqual(self.client.sent, [])
        self.assertEqual(row.status, "failed")
        self.assertIn("192.168.0.10", row.last_error or "")
        self.stop()

    def test_unresolvable_host_is_retried(self) -> None:
        """A host that does not resolve is a network error, retried."""
        delivery_id = self.queue.add(url="http://gone.example/in")

        self.start()

        row = self.queue.rows[delivery_id]
        self.assertEqual((row.status, row.attempts), ("pending", 1))
        self.assertEqual(counted("network_error"), 1)
        self.stop()

    def test_slow_host_holds_only_its_own_slots(self) -> None:
        """Three deliveries to a slow host take two slots; another host's
        delivery is sent and finished meanwhile."""
        slow = [self.queue.add(url=f"http://slow.example/{n}") for n in range(3)]
        fast = self.queue.add(url="http://fast.example/in")

        self.start(allow_private=True, per_host=2, concurrency=16)

        urls = [s.url for s in self.client.sent]
        self.assertEqual(
            sorted(urls),
            [
                "http://fast.example/in",
                "http://slow.example/0",
                "http://slow.example/1",
            ],
        )
        fast_sent = next(s for s in self.client.sent if "fast" in s.url)
        self.answer(fast_sent, 200)
        self.assertEqual(self.queue.rows[fast].status, "delivered")
        self.assertEqual(self.queue.rows[slow[2]].attempts, 0)

        # A slow slot frees up: the third slow delivery goes out on the next
        # reactor turn.
        self.answer(self.client.sent[0], 200)
        self.clock.advance(0)
        self.assertIn("http://slow.example/2", [s.url for s in self.client.sent])
        for sent in self.client.pending():
            self.answer(sent, 200)
        self.stop()

    def test_total_concurrency_is_bounded(self) -> None:
        """No more than the total limit is in flight at once."""
        for n in range(5):
            self.queue.add(url=f"http://h{n}.example/in")
        self.resolver.table.update({f"h{n}.example": [PUBLIC_IP] for n in range(5)})

        dispatcher = self.start(concurrency=3)

        self.assertEqual((len(self.client.sent), dispatcher.in_flight), (3, 3))
        for sent in self.client.pending():
            self.answer(sent, 200)
        self.clock.advance(0)
        self.assertEqual(len(self.client.sent), 5)
        for sent in self.client.pending():
            self.answer(sent, 200)
        self.stop()

    def test_wake_claims_without_waiting_for_the_poll(self) -> None:
        """wake() looks for new work on the next reactor turn."""
        self.start(poll_interval=60.0)
        self.queue.add()

        assert self.dispatcher is not None
        self.dispatcher.wake()
        self.assertEqual(self.client.sent, [])
        self.clock.advance(0)

        self.assertEqual(len(self.client.sent), 1)
        self.answer(self.client.sent[0], 200)
        self.stop()

    def test_poll_finds_new_work(self) -> None:
        """Without a wake, new work is found at the next poll."""
        self.start(poll_interval=1.0)
        self.queue.add()

        self.clock.advance(1.0)

        self.assertEqual(len(self.client.sent), 1)
        self.answer(self.client.sent[0], 200)
        self.stop()

    def test_not_ready_database_is_skipped(self) -> None:
        """While the database is not ready nothing is claimed."""
        self.queue.ready = False
        self.queue.add()

        self.start()

        self.assertEqual(self.client.sent, [])
        self.stop()

    def test_database_error_while_claiming_is_survived(self) -> None:
        """A claim that fails with a lost connection is tried again at the
        next poll."""
        self.queue.add()
        real_claim = self.queue.claim
        failures = [psycopg2.OperationalError("server closed the connection")]

        async def flaky_claim(*args: Any, **kwargs: Any) -> list[ClaimedDelivery]:
            if failures:
                raise failures.pop()
            return await real_claim(*args, **kwargs)

        self.queue.claim = flaky_claim  # type: ignore[method-assign]
        self.start(poll_interval=1.0)
        self.assertEqual(self.client.sent, [])

        self.clock.advance(1.0)

        self.assertEqual(len(self.client.sent), 1)
        self.answer(self.client.sent[0], 200)
        self.stop()

    def test_stop_waits_for_deliveries_in_flight(self) -> None:
        """stopService fires only once the delivery in flight has finished."""
        delivery_id = self.queue.add()
        dispatcher = self.start()

        stopped = dispatcher.stopService()
        self.assertNoResult(stopped)
        self.answer(self.client.sent[0], 200)

        self.successResultOf(stopped)
        self.assertEqual(self.queue.rows[delivery_id].status, "delivered")
        self.assertEqual(dispatcher.cut_off, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cuts_off_at_the_grace_deadline(self) -> None:
        """At the grace deadline a delivery in flight is cut off, released
        and left pending with its attempt not counted."""
        delivery_id = self.queue.add()
        dispatcher = self.start(grace=lambda: 2.0, response_timeout=60.0)

        stopped = dispatcher.stopService()
        self.clock.advance(2.0)

        self.successResultOf(stopped)
        row = self.queue.rows[delivery_id]
        self.assertTrue(self.client.sent[0].answer.called)
        self.assertEqual((row.status, row.attempts, row.claimed), ("pending", 0, False))
        self.assertEqual(self.queue.releases, [delivery_id])
        self.assertEqual(dispatcher.cut_off, 1)
        self.assertEqual(counted("network_error"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cut_reaches_a_request_waiting_on_its_response(self) -> None:
        """The grace deadline cancels a request that is already connected and
        waiting for the answer (a Deferred paused on a chained one)."""
        self.client.chained = True
        delivery_id = self.queue.add()
        dispatcher = self.start(grace=lambda: 1.0, response_timeout=60.0)

        stopped = dispatcher.stopService()
        self.clock.advance(1.0)

        self.successResultOf(stopped)
        self.assertTrue(self.client.sent[0].answer.called)
        self.assertEqual(self.queue.releases, [delivery_id])

    def test_cut_delivery_is_sent_after_restart(self) -> None:
        """A delivery cut off by a stop is sent, with the same id, by the
        next dispatcher."""
        delivery_id = self.queue.add()
        first = self.start(grace=lambda: 0.0)
        stopped = first.stopService()
        self.clock.advance(0)
        self.successResultOf(stopped)

        self.start()

        self.assertEqual(len(self.client.sent), 2)
        self.assertEqual(
            self.client.sent[1].headers.getRawHeaders(b"x-gitlawb-delivery"),
            [delivery_id.encode()],
        )
        self.answer(self.client.sent[1], 200)
        self.assertEqual(self.queue.rows[delivery_id].status, "delivered")
        self.stop()

    def test_stop_with_nothing_in_flight_is_immediate(self) -> None:
        """An idle dispatcher stops at once and leaves no timer behind."""
        dispatcher = self.start()

        self.successResultOf(dispatcher.stopService())

        self.assertEqual(self.clock.getDelayedCalls(), [])


class StubTreqDispatcherTests(SynchronousTestCase):
    def test_real_treq_response_through_a_stub(self) -> None:
        """Through treq's StubTreq, the receiver sees the headers and body and
        its 200 marks the row delivered."""
        seen: list[tuple[Request, bytes]] = []

        class Receiver(Resource):
            isLeaf = True

            def render_POST(self, request: Request) -> bytes:
                seen.append((request, request.content.read()))
                return b"thanks"

        clock = Clock()
        queue = FakeQueue(clock)
        delivery_id = queue.add(secret="k")
        stub = StubTreq(Receiver())
        dispatcher = WebhookDispatcher(
            clock,
            queue,  # type: ignore[arg-type]
            grace=lambda: 1.0,
            resolver=FakeResolver({"hooks.example": [PUBLIC_IP]}),
            client_factory=lambda addresses: stub,  # type: ignore[arg-type,return-value]
        )

        dispatcher.startService()
        stub.flush()

        [(request, body)] = seen
        self.assertEqual(body, BODY.encode())
        self.assertEqual(
            request.requestHeaders.getRawHeaders(b"x-gitlawb-signature-256"),
            [signature_header("k", BODY.encode()).encode()],
        )
        self.assertEqual(queue.rows[delivery_id].status, "delivered")
        self.successResultOf(dispatcher.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])


# -- Settings and JSON -----------------------------------------------------------


def test_webhook_settings_defaults() -> None:
    """The webhook settings default to 10 s timeouts, 2 per host, 16 in all."""
    settings = Settings.load(environ={})

    assert (
        settings.webhook_connect_timeout_secs,
        settings.webhook_timeout_secs,
        settings.webhook_retry_base_secs,
        settings.webhook_retry_max_secs,
        settings.webhook_max_age_secs,
        settings.webhook_concurrency,
        settings.webhook_per_host_concurrency,
    ) == (10.0, 10.0, 10.0, 3600.0, 86400.0, 16, 2)


def test_retry_max_below_base_is_refused() -> None:
    """A longest retry wait shorter than the first one stops start-up."""
    with pytest.raises(ConfigError, match="GITLAWB_WEBHOOK_RETRY_MAX_SECS"):
        Settings.load(
            environ={
                "GITLAWB_WEBHOOK_RETRY_BASE_SECS": "10",
                "GITLAWB_WEBHOOK_RETRY_MAX_SECS": "5",
            }
        )


def test_dispatcher_from_settings() -> None:
    """from_settings carries every webhook setting into the dispatcher."""
    settings = Settings.load(
        environ={
            "GITLAWB_WEBHOOK_TIMEOUT_SECS": "3",
            "GITLAWB_WEBHOOK_PER_HOST_CONCURRENCY": "1",
            "GITLAWB_ALLOW_PRIVATE_WEBHOOKS": "true",
        }
    )

    dispatcher = WebhookDispatcher.from_settings(settings, Clock(), None)  # type: ignore[arg-type]

    assert (dispatcher.response_timeout, dispatcher.per_host) == (3.0, 1)
    assert dispatcher.allow_private


def test_hook_json_masks_the_secret() -> None:
    """A hook with a secret shows "***"; one without shows null."""
    row = {
        "id": uuid.uuid4(),
        "repo_id": uuid.uuid4(),
        "url": "https://hooks.example/in",
        "secret": "s3cret",
        "events": ["push"],
        "created_by_did": "did:key:z6Mkowner",
        "created_at": None,
        "active": True,
    }

    assert hook_json(row)["secret"] == "***"
    assert hook_json({**row, "secret": None})["secret"] is None


def test_settled_delivery_has_no_next_attempt() -> None:
    """A delivered or failed delivery shows next_attempt_at null."""
    row = {
        "id": uuid.uuid4(),
        "webhook_id": uuid.uuid4(),
        "event": "push",
        "status": "failed",
        "attempts": 8,
        "last_status_code": 503,
        "last_error": "HTTP 503",
        "next_attempt_at": None,
        "in_flight": False,
        "created_at": None,
        "delivered_at": None,
    }

    shown = delivery_json(row)

    assert (shown["status"], shown["next_attempt_at"], shown["attempts"]) == (
        "failed",
        None,
        8,
    )
