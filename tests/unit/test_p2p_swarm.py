"""SwarmService before it runs, its backoff, and the route of py-libp2p's logging."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any, cast

from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gitlawb.identity.keys import NodeKey
from gitlawb.p2p.peer_id import peer_id_for_did
from gitlawb.p2p.swarm import (
    SwarmNotRunning,
    SwarmService,
    _describe,
    _TwistedLogHandler,
    redial_delays,
    route_library_logging,
)

KEY = NodeKey.from_seed(b"\x07" * 32)


class ImmediateReactor:
    """A reactor whose callFromThread runs the call at once."""

    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def test_redial_delays_double_up_to_the_maximum() -> None:
    """Waits between dials double from the first one and stay at the maximum."""
    delays = list(itertools.islice(redial_delays(1.0, 10.0), 6))

    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_describe_names_the_errors_inside_a_group() -> None:
    """A failure description lists the errors inside nested exception groups."""
    inner = ExceptionGroup("listen", [OSError("Address already in use")])
    group = ExceptionGroup("nursery", [inner, ValueError()])

    assert _describe(group) == "Address already in use; ValueError"


class NotRunningTests(SynchronousTestCase):
    """
    A SwarmService that was never started.
    """

    def setUp(self) -> None:
        self.swarm = SwarmService(ImmediateReactor(), KEY, 0, "127.0.0.1")

    def test_peer_id_is_the_dids(self) -> None:
        """The peer id is known before start and belongs to the node DID."""
        self.assertEqual(self.swarm.peer_id, peer_id_for_did(KEY.did))
        self.assertEqual(self.swarm.did, KEY.did)

    def test_info_shows_no_peers(self) -> None:
        """info() answers without a running host."""
        self.assertEqual(
            self.swarm.info(),
            {
                "enabled": True,
                "peer_id": self.swarm.peer_id,
                "topics": [],
                "connected_peers": 0,
                "gossipsub_mesh_peers": 0,
                "gossipsub_all_peers": 0,
                "listen_addrs": [],
            },
        )

    def test_publish_fails(self) -> None:
        """A publish before start fails with SwarmNotRunning."""
        self.failureResultOf(self.swarm.publish("t", b"x"), SwarmNotRunning)

    def test_call_fails(self) -> None:
        """A call into trio before start fails with SwarmNotRunning."""

        async def nothing(host: object) -> None:
            pass

        self.failureResultOf(self.swarm.call(nothing), SwarmNotRunning)

    def test_when_running_fails(self) -> None:
        """when_running() of a swarm never started fails at once."""
        self.failureResultOf(self.swarm.when_running(), SwarmNotRunning)

    def test_stop_is_immediate(self) -> None:
        """Stopping a swarm that never started fires at once."""
        self.successResultOf(self.swarm.stopService())


class LibraryLoggingTests(SynchronousTestCase):
    """
    py-libp2p's stdlib log records reach twisted.logger.
    """

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_warning_becomes_a_twisted_event(self) -> None:
        """A warning record is emitted as a twisted.logger warning naming its logger."""
        logger = logging.getLogger("gitlawb-test-libp2p")
        logger.propagate = False
        handler = _TwistedLogHandler(ImmediateReactor(), logging_target())
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)

        logger.warning("dial to %s failed", "peer")

        [event] = [e for e in self.events if e.get("library") == logger.name]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["text"], "dial to peer failed")

    def test_errors_become_warnings(self) -> None:
        """py-libp2p's errors (a peer gone, a failed dial) are logged as warnings."""
        logger = logging.getLogger("gitlawb-test-libp2p-errors")
        logger.propagate = False
        handler = _TwistedLogHandler(ImmediateReactor(), logging_target())
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)

        logger.error("listener failed")

        [event] = [e for e in self.events if e.get("library") == logger.name]
        self.assertEqual(event["log_level"], LogLevel.warn)

    def test_routing_is_installed_once(self) -> None:
        """route_library_logging() adds one handler and stops stderr output."""
        from twisted.internet import reactor

        self.addCleanup(route_library_logging, reactor)
        route_library_logging(ImmediateReactor())
        route_library_logging(ImmediateReactor())

        libp2p = logging.getLogger("libp2p")
        handlers = [h for h in libp2p.handlers if isinstance(h, _TwistedLogHandler)]
        self.assertEqual(len(handlers), 1)
        self.assertFalse(libp2p.propagate)
        self.assertGreaterEqual(libp2p.level, logging.WARNING)


def logging_target() -> Any:
    from twisted.logger import Logger

    return Logger(namespace="gitlawb.test.libp2p")
