"""
Unit tests for the graceful shutdown, on a Clock: the node's one grace
deadline and its stop order (L{gitlawb.node.GitlawbNode}), and the drain of
the HTTP listener (L{gitlawb.web.ApiSite} and L{gitlawb.web.NodeSite}).
"""

from __future__ import annotations

import signal
from types import SimpleNamespace
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import LogEvent, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gitlawb.config import Settings
from gitlawb.git.smart_http import GitService, _wait_only
from gitlawb.identity.keys import NodeKey
from gitlawb.node import GitlawbNode
from gitlawb.web import ApiSite, NodeSite

GRACE = 10.0
KEY = NodeKey.from_seed(bytes(range(32)))


# -- the node: one deadline, children stopped in reverse -----------------------


class StubService(Service):
    """
    A child whose stop lasts until the test fires C{stopping}; it notes when
    its stop began and how much grace the node had left then.
    """

    def __init__(self, name: str, node: GitlawbNode, order: list[str]) -> None:
        self.name = name
        self.node = node
        self.order = order
        self.stopping: Deferred[None] | None = None
        self.grace_seen: float | None = None
        self.cut_off = 0

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.order.append(self.name)
        self.grace_seen = self.node.grace_remaining()
        self.stopping = Deferred()
        return self.stopping


def make_node(
    names: tuple[str, ...] = ("first", "second", "third"),
) -> tuple[GitlawbNode, Clock, dict[str, StubService], list[str], list[str]]:
    """
    A node on a Clock with stub children started in the order of C{names}.

    @return: the node, its clock, the children by name, the order their
        stops began in, and the node's log lines.
    """
    settings = Settings.load(
        environ={"GITLAWB_SHUTDOWN_GRACE_SECS": str(GRACE)}, flags={}
    )
    clock = Clock()
    node = GitlawbNode(settings, clock, KEY)
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event))

    node.log = Logger(observer=observe)  # type: ignore[misc]
    order: list[str] = []
    children = {}
    for name in names:
        child = StubService(name, node, order)
        child.setServiceParent(node)
        children[name] = child
    return node, clock, children, order, lines


def finish(child: StubService) -> None:
    assert child.stopping is not None
    child.stopping.callback(None)


def test_grace_remaining_is_the_whole_grace_before_the_stop() -> None:
    """Until the shutdown starts, the grace left is the configured grace."""
    node, clock, _, _, _ = make_node()

    clock.advance(100)

    assert node.grace_remaining() == GRACE


def test_grace_remaining_counts_down_from_the_stop_to_zero() -> None:
    """From the stop on, the grace left shrinks with the clock and stays at 0."""
    node, clock, _, _, _ = make_node()
    clock.advance(50)

    node.stopService()
    clock.advance(3)
    partway = node.grace_remaining()
    clock.advance(20)

    assert partway == GRACE - 3
    assert node.grace_remaining() == 0.0


def test_children_stop_one_at_a_time_last_started_first() -> None:
    """Each child stops only once the one started after it has stopped."""
    node, _, children, order, _ = make_node()

    stopped = node.stopService()
    first_step = list(order)
    finish(children["third"])
    second_step = list(order)
    finish(children["second"])
    third_step = list(order)
    waiting = stopped.called
    finish(children["first"])

    assert first_step == ["third"]
    assert second_step == ["third", "second"]
    assert third_step == ["third", "second", "first"]
    assert not waiting
    assert stopped.called


def test_children_share_one_deadline() -> None:
    """A child's stop gets what the children stopped before it left of the
    grace, not a grace of its own."""
    node, clock, children, _, _ = make_node()

    node.stopService()
    clock.advance(4)
    finish(children["third"])
    clock.advance(5)
    finish(children["second"])

    assert children["third"].grace_seen == GRACE
    assert children["second"].grace_seen == GRACE - 4
    assert children["first"].grace_seen == GRACE - 9


def test_closing_line_says_the_stop_was_clean() -> None:
    """With nothing cut off the node logs one line saying it stopped cleanly."""
    node, _, children, _, lines = make_node()

    node.stopService()
    for name in ("third", "second", "first"):
        finish(children[name])

    assert [line for line in lines if line.startswith("stopped")] == [
        "stopped cleanly in 0.00s; nothing was cut off"
    ]


def test_closing_line_names_what_was_cut_off() -> None:
    """A child that cut work at the deadline is named with its count in the
    closing line."""
    node, _, children, _, lines = make_node()
    children["second"].cut_off = 2

    node.stopService()
    for name in ("third", "second", "first"):
        finish(children[name])

    assert node.cut_off == {"second": 2}
    assert lines[-1].endswith("cut off at the grace deadline: second: 2")


def test_a_child_failing_to_stop_does_not_stop_the_others() -> None:
    """A child whose stop fails is logged and named; the ones before it in
    the start order still stop."""
    node, _, children, order, lines = make_node()

    stopped = node.stopService()
    third = children["third"].stopping
    assert third is not None
    third.errback(RuntimeError("broken"))
    finish(children["second"])
    finish(children["first"])

    assert order == ["third", "second", "first"]
    assert stopped.called
    assert any("service third failed to stop" in line for line in lines)
    assert "failed to stop: third" in lines[-1]


def test_the_listener_stops_accepting_when_the_stop_starts() -> None:
    """The public port closes as soon as the shutdown starts, while the
    children started after it are still stopping."""
    node, _, _, _, _ = make_node(("first",))
    site = FakeSite(busy=0)
    api = ApiSite(node.reactor, site, "127.0.0.1", 0, node.grace_remaining)
    port = FakePort()
    api.listening = port
    api.setServiceParent(node)
    later = StubService("later", node, [])
    later.setServiceParent(node)

    node.stopService()

    assert port.stopped == 1
    assert site.draining
    assert later.stopping is not None and not later.stopping.called


class StoppableClock(Clock):
    """A Clock that stops like a reactor: a second stop raises."""

    stops = 0
    _exitSignal: int | None = None

    def stop(self) -> None:
        if self.stops:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stops += 1


def signalled_node() -> tuple[GitlawbNode, StoppableClock, list[str]]:
    clock = StoppableClock()
    settings = Settings.load(environ={}, flags={})
    node = GitlawbNode(settings, clock, KEY)
    lines: list[str] = []
    node.log = Logger(observer=lambda e: lines.append(formatEvent(e)))  # type: ignore[misc]
    return node, clock, lines


def test_signal_stops_the_reactor_and_names_the_exit_signal() -> None:
    """The first signal stops the reactor and leaves the signal for twistd to
    re-raise, so the exit status names it."""
    node, clock, lines = signalled_node()

    node._signal_received(signal.SIGTERM)

    assert clock.stops == 1
    assert clock._exitSignal == signal.SIGTERM
    assert lines == ["SIGTERM received: shutting down"]


def test_second_signal_in_the_same_turn_is_only_acknowledged() -> None:
    """A second signal handled before the stop has begun does not stop the
    reactor again; it is logged as a shutdown already under way."""
    node, clock, lines = signalled_node()

    node._signal_received(signal.SIGINT)
    node._signal_received(signal.SIGTERM)

    assert clock.stops == 1
    assert clock._exitSignal == signal.SIGINT
    assert lines[-1] == "SIGTERM received: shutdown already under way (grace 30.0s)"


# -- ApiSite: drained until the deadline, then cut ---------------------------------


class FakePort:
    """A listening port that counts how often it was told to stop."""

    stopped = 0

    def stopListening(self) -> None:
        self.stopped += 1


class FakeSite:
    """
    What L{ApiSite} uses of a L{NodeSite}: C{busy} connections each with a
    request in flight, until L{finish_all}.
    """

    def __init__(self, busy: int, idle: int = 0) -> None:
        self.draining = False
        self.connections: set[object] = {object() for _ in range(busy)}
        self.in_flight: set[object] = set(self.connections)
        self.idle = idle
        self.idle_closes = 0
        self.aborted = 0
        self._waiters: list[Deferred[None]] = []

    def close_idle_connections(self) -> int:
        self.idle_closes += 1
        return self.idle

    def when_closed(self) -> Deferred[None]:
        if not self.connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def finish_all(self) -> None:
        self.connections.clear()
        self.in_flight.clear()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def abort_all(self) -> int:
        self.aborted += 1
        cut = len(self.connections)
        self.connections.clear()
        return cut


def make_api(
    site: FakeSite, grace: float = 5.0
) -> tuple[ApiSite, Clock, FakePort, list[float]]:
    """
    A started L{ApiSite} on a Clock over C{site}, whose grace callable
    returns C{grace} and notes each call.
    """
    clock = Clock()
    asked: list[float] = []

    def remaining() -> float:
        asked.append(grace)
        return grace

    api = ApiSite(clock, site, "127.0.0.1", 0, remaining)  # type: ignore[arg-type]
    port = FakePort()
    api.listening = port  # type: ignore[assignment]
    api.startService()
    return api, clock, port, asked


class ApiSiteDrainTests(SynchronousTestCase):
    def test_nothing_in_flight_stops_at_once(self) -> None:
        """With no connection open the drain ends at once and leaves no timer."""
        api, clock, port, _ = make_api(FakeSite(busy=0))

        stopped = api.stopService()

        self.successResultOf(stopped)
        self.assertEqual(port.stopped, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_request_finished_before_the_deadline(self) -> None:
        """A request that finishes within the grace ends the drain then, with
        nothing cut and no timer left behind."""
        site = FakeSite(busy=1)
        api, clock, _, _ = make_api(site, grace=5.0)

        stopped = api.stopService()
        clock.advance(4.9)
        self.assertNoResult(stopped)
        site.finish_all()

        self.successResultOf(stopped)
        self.assertEqual((site.aborted, api.cut_off), (0, 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_request_cut_at_the_deadline(self) -> None:
        """A request still running at the deadline is cut then, not before."""
        site = FakeSite(busy=1)
        api, clock, _, _ = make_api(site, grace=5.0)

        stopped = api.stopService()
        clock.advance(4.999)
        self.assertNoResult(stopped)
        clock.advance(0.001)

        self.successResultOf(stopped)
        self.assertEqual((site.aborted, api.cut_off), (1, 1))

    def test_deadline_is_what_the_node_has_left(self) -> None:
        """The drain waits what the grace callable says is left when its turn
        comes, not a full grace."""
        site = FakeSite(busy=2)
        api, clock, _, asked = make_api(site, grace=1.5)

        stopped = api.stopService()
        clock.advance(1.5)

        self.successResultOf(stopped)
        self.assertEqual(asked, [1.5])
        self.assertEqual(api.cut_off, 2)

    def test_stop_accepting_happens_once(self) -> None:
        """Stopping to accept early and then draining closes the port and the
        idle connections once."""
        site = FakeSite(busy=0, idle=3)
        api, _, port, _ = make_api(site)

        api.stop_accepting()
        api.stop_accepting()
        self.successResultOf(api.stopService())

        self.assertEqual((port.stopped, site.idle_closes), (1, 1))
        self.assertIsNone(api.listening)


# -- NodeSite: real HTTP channels over string transports --------------------------


class Held(Resource):
    """Leaves every GET unanswered until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


def make_site() -> tuple[NodeSite, Held]:
    held = Held()
    site = NodeSite(held, body_limit=lambda path: 1024, reactor=Clock(), timeout=None)
    return site, held


def connect(site: NodeSite) -> StringTransportWithDisconnection:
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransportWithDisconnection()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return transport


GET = b"GET /held HTTP/1.1\r\nHost: node\r\n\r\n"


def answer(request: Request) -> None:
    request.write(b"ok")
    request.finish()


def test_idle_keep_alive_connection_is_closed() -> None:
    """A kept-alive connection whose request is answered counts as idle and
    is closed."""
    site, held = make_site()
    transport = connect(site)
    transport.protocol.dataReceived(GET)
    answer(held.requests[0])

    closed = site.close_idle_connections()

    assert closed == 1
    assert not transport.connected
    assert site.connections == set()


def test_busy_connection_closes_after_its_response() -> None:
    """While draining, a connection with a request in flight is left open and
    closed once its response is out."""
    site, held = make_site()
    transport = connect(site)
    transport.protocol.dataReceived(GET)
    site.draining = True

    closed = site.close_idle_connections()
    still_open = transport.connected
    waiting = site.when_closed()
    answer(held.requests[0])

    assert closed == 0
    assert still_open
    assert not transport.connected
    assert waiting.called
    assert transport.value().endswith(b"2\r\nok\r\n0\r\n\r\n")


def test_connection_receiving_a_body_is_busy() -> None:
    """A request whose body is still arriving (not in flight yet) keeps its
    connection from being closed as idle."""
    site, _ = make_site()
    transport = connect(site)
    transport.protocol.dataReceived(
        b"POST /held HTTP/1.1\r\nHost: node\r\nContent-Length: 10\r\n\r\n12345"
    )

    closed = site.close_idle_connections()

    assert closed == 0
    assert transport.connected


def test_abort_all_cuts_every_open_connection() -> None:
    """At the deadline every connection still open is aborted and counted."""
    site, _ = make_site()
    busy = connect(site)
    busy.protocol.dataReceived(GET)
    other = connect(site)
    other.protocol.dataReceived(GET)

    cut = site.abort_all()

    assert cut == 2
    assert not busy.connected and not other.connected
    assert site.connections == set()
    assert site.in_flight == set()


def test_when_closed_waits_for_the_last_connection() -> None:
    """The wait ends when the last connection is gone, not before."""
    site, held = make_site()
    transport = connect(site)
    transport.protocol.dataReceived(GET)

    waiting = site.when_closed()
    answer(held.requests[0])
    before = waiting.called
    transport.loseConnection()

    assert not before
    assert waiting.called


# -- GitService: pushes being recorded ---------------------------------------------


def git_service() -> GitService:
    """A GitService with no git running, on a stand-in context."""
    context = SimpleNamespace(
        settings=Settings.load(environ={}, flags={}),
        key=KEY,
        public_url=lambda: "http://127.0.0.1:7545",
        now=lambda: 0,
    )
    return GitService(context, store=None)  # type: ignore[arg-type]


def test_stop_waits_for_a_push_whose_request_was_cut() -> None:
    """Cutting a push request (Klein cancels its wait) does not end the stop's
    wait for the push to be recorded."""
    git = git_service()
    recording: Deferred[None] = Deferred()
    git.track(recording)
    request_wait = _wait_only(recording)

    request_wait.cancel()
    stopped = git.stopService()
    before = stopped.called
    recording.callback(None)

    assert isinstance(request_wait.result.value, CancelledError)
    request_wait.addErrback(lambda _: None)
    assert not before
    assert stopped.called
