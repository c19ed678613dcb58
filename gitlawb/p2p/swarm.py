"""
The node's libp2p host: py-libp2p on trio, in a thread of its own.

py-libp2p is written for trio, the rest of the node for the Twisted reactor.
L{SwarmService} runs the host in one dedicated (non-daemon) thread that runs
C{trio.run}, and is the only bridge between the two worlds:

    - trio -> Twisted: C{reactor.callFromThread}; what it calls runs in the
      reactor thread (message handlers, Deferred results, log lines).
    - Twisted -> trio: the run's trio token; C{token.run_sync_soon} schedules
      a small synchronous step in the trio thread, which starts a task in the
      service's nursery or queues a publish. The result comes back through
      C{callFromThread} into a Deferred. No exception may escape such a step:
      it would end C{trio.run}.

The host listens on QUIC v1 (UDP) and TCP at the same port number, speaks
only encrypted transports (Noise on TCP; QUIC has TLS 1.3 built in), runs
Identify (protocol version C{/gitlawb/1.0.0}), a Kademlia DHT in server
mode, and GossipSub with strict message signing. Its key is the node key, so
its peer id and the node DID name the same Ed25519 public key.

py-libp2p traps this module works around (each reproduced; see the comments
where they are handled): plaintext and secio are accepted unless the
security options are given explicitly; gossipsub's spam protection drops our
own publishes above 10/s; the per-peer outbound queue holds 32 RPCs; a
Pubsub built but not running breaks the host; each Pubsub starts a sweeper
thread nothing stops; closing the swarm closes connections one at a time; a
TCP listen failure is only logged; a node receives its own publishes; the
library logs through stdlib logging to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import base58
import libp2p.identity.identify.identify as identify
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import (
    PROTOCOL_ID,
    PROTOCOL_ID_V11,
    PROTOCOL_ID_V12,
    GossipSub,
)
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.subscription import TrioSubscriptionAPI
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import get_available_interfaces
from multiaddr import Multiaddr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from gitlawb import __version__
from gitlawb.identity.keys import NodeKey
from gitlawb.p2p.peer_id import (
    did_for_peer_id,
    peer_id_for_did,
    peer_id_for_public_key,
)

__all__ = [
    "IDENTIFY_PROTOCOL_VERSION",
    "ListenFailed",
    "PubsubMessage",
    "SwarmError",
    "SwarmNotRunning",
    "SwarmService",
    "did_for_peer_id",
    "peer_id_for_did",
    "redial_delays",
    "route_library_logging",
]

_T = TypeVar("_T")

# A queued publish: topic, data, and the Deferred that says it has left.
_Publish = tuple[str, bytes, Deferred[None]]

IDENTIFY_PROTOCOL_VERSION = "/gitlawb/1.0.0"
IDENTIFY_AGENT_VERSION = f"gitlawb-node/{__version__}"

# GossipSub parameters: the usual mesh degrees, and a heartbeat every second
# so a mesh that lost a peer is repaired quickly.
GOSSIP_DEGREE = 6
GOSSIP_DEGREE_LOW = 5
GOSSIP_DEGREE_HIGH = 12
GOSSIP_HEARTBEAT_SECS = 1

# py-libp2p's per-peer outbound queue holds 32 RPCs and drops the rest
# silently: a back-to-back burst of 50 publishes delivered 16, 2 ms apart all
# arrived. Publishes leave at least this far apart.
PUBLISH_SPACING_SECS = 0.005

DIAL_TIMEOUT_SECS = 10.0
REDIAL_INITIAL_SECS = 1.0
REDIAL_MAX_SECS = 60.0
CLOSE_TIMEOUT_SECS = 5.0

# Identify usually completes within a few ms of a connection; Kademlia only
# takes peers whose protocols it has seen.
_ROUTING_TABLE_DELAY_SECS = 1.0

# How often a bootstrap peer's connection is looked at besides the swarm's
# disconnect notices.
_BOOTSTRAP_RECHECK_SECS = 5.0

# Loggers of py-libp2p and of the QUIC library it uses.
_LIBRARY_LOGGERS = ("libp2p", "quic", "multiaddr")


class SwarmError(Exception):
    """Something the libp2p host was asked to do could not be done."""


class SwarmNotRunning(SwarmError):
    """The swarm is not running: not started yet, stopping or stopped."""


class ListenFailed(SwarmError):
    """The host could not listen on one of its addresses (port in use ...)."""


@dataclass(frozen=True)
class PubsubMessage:
    """
    A pubsub message another peer published.

    @ivar from_peer_id: the base58 peer id of the message's signer. Messages
        are verified strictly, so this is the key that signed it, not merely
        the peer that forwarded it.
    """

    topic: str
    data: bytes
    from_peer_id: str
    seqno: bytes


def redial_delays(
    initial: float = REDIAL_INITIAL_SECS, maximum: float = REDIAL_MAX_SECS
) -> Iterator[float]:
    """
    Yield the waits between dials of a lost peer: C{initial}, doubling up to
    C{maximum}, then C{maximum} for ever.
    """
    delay = initial
    while True:
        yield delay
        delay = min(delay * 2, maximum)


class _TwistedLogHandler(logging.Handler):
    """
    Hands stdlib log records to twisted.logger, in the reactor thread, as
    warnings (critical records as errors).
    """

    def __init__(self, reactor: Any, log: Logger) -> None:
        super().__init__(logging.WARNING)
        self.reactor = reactor
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:
            message = str(record.msg)
        # py-libp2p logs routine network events (a peer that went away, a
        # dial that failed) as errors; the service reports its own failures.
        level = LogLevel.error if record.levelno >= logging.CRITICAL else LogLevel.warn
        self.reactor.callFromThread(
            self._log.emit,
            level,
            "{library}: {text}",
            library=record.name,
            text=message,
        )


_library_log = Logger(namespace="gitlawb.p2p.libp2p")
_routing_lock = threading.Lock()


def route_library_logging(reactor: Any) -> None:
    """
    Send py-libp2p's stdlib log records at WARNING and above to twisted.logger
    (through C{reactor}) instead of stderr. Idempotent; the last reactor given
    is the one used.
    """
    with _routing_lock:
        for name in _LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            ours = [h for h in logger.handlers if isinstance(h, _TwistedLogHandler)]
            if ours:
                ours[0].reactor = reactor
                continue
            logger.addHandler(_TwistedLogHandler(reactor, _library_log))
            if logger.level == logging.NOTSET or logger.level < logging.WARNING:
                logger.setLevel(logging.WARNING)
            logger.propagate = False


def _describe(error: BaseException) -> str:
    """
    One line naming what went wrong, looking inside exception groups.
    """
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in error.exceptions)
    return str(error) or type(error).__name__


def _root_error(error: BaseException) -> BaseException:
    """
    The error that ended the run, out of the exception groups trio's nurseries
    wrap it in: a L{ListenFailed} if there is one, else a lone error.
    """
    leaves: list[BaseException] = []

    def collect(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                collect(inner)
        else:
            leaves.append(e)

    collect(error)
    for leaf in leaves:
        if isinstance(leaf, ListenFailed):
            return leaf
    return leaves[0] if len(leaves) == 1 else error


def _quic_last(address: str) -> bool:
    return "/quic" in address


def _fire(d: Deferred[_T], result: _T) -> None:
    if not d.called:
        d.callback(result)


def _fire_error(d: Deferred[Any], error: BaseException) -> None:
    if not d.called:
        d.errback(Failure(error))


class SwarmService(Service):
    """
    The libp2p host, run in its own thread.

    Start-up is asynchronous: L{startService} starts the thread and returns;
    L{when_running} says when the host listens. A start-up failure (a port in
    use ...) is logged, fails L{when_running} and calls C{on_fatal}.

    @ivar peer_id: the host's base58 peer id (known before start).
    @ivar did: the node DID the peer id belongs to.
    @ivar cut_off: 1 when the last stop was cut off at its deadline.
    """

    log = Logger()
    name = "p2p"

    def __init__(
        self,
        reactor: Any,
        key: NodeKey,
        port: int,
        host: str = "0.0.0.0",
        bootstrap: Sequence[str] = (),
        *,
        quic: bool = True,
        on_fatal: Callable[[str], None] | None = None,
        redial_initial: float = REDIAL_INITIAL_SECS,
        redial_max: float = REDIAL_MAX_SECS,
        dial_timeout: float = DIAL_TIMEOUT_SECS,
        close_timeout: float = CLOSE_TIMEOUT_SECS,
        publish_spacing: float = PUBLISH_SPACING_SECS,
    ) -> None:
        self._reactor = reactor
        self._seed = key.seed
        self.did = key.did
        self.peer_id = peer_id_for_public_key(key.public_key)
        self._port = port
        self._host = host
        self._bootstrap = tuple(bootstrap)
        self._quic = quic
        self._on_fatal = on_fatal
        self._redial_initial = redial_initial
        self._redial_max = redial_max
        self._dial_timeout = dial_timeout
        self._close_timeout = close_timeout
        self._publish_spacing = publish_spacing
        self._handlers: dict[str, Callable[[PubsubMessage], None]] = {}
        self.cut_off = 0
        self._reset()

    def _reset(self) -> None:
        # Shared between the threads, under the lock: the token and whether a
        # stop was asked for before the token existed.
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop_requested = False

        # Reactor thread only.
        self._thread: threading.Thread | None = None
        self._listen_addrs: list[str] = []
        self._started_ok = False
        self._start_error: BaseException | None = None
        self._running_waiters: list[Deferred[None]] = []
        self._stopped_waiters: list[Deferred[None]] = []
        self._stop_guard: Any = None
        self._shutdown_trigger: Any = None
        self._thread_ended = False

        # Read from the reactor thread (atomic reads of library state).
        self._network: INetwork | None = None
        self._pubsub: Pubsub | None = None
        self._gossipsub: GossipSub | None = None
        self._dht: KadDHT | None = None

        # trio thread only.
        self._libp2p_host: IHost | None = None
        self._nursery: trio.Nursery | None = None
        self._serving = False
        self._run_scope = trio.CancelScope()
        self._stop_event: trio.Event | None = None
        self._publish_send: trio.MemorySendChannel[_Publish] | None = None
        self._disconnect_events: dict[str, list[trio.Event]] = {}

    # -- the Twisted side -------------------------------------------------

    def subscribe(self, topic: str, handler: Callable[[PubsubMessage], None]) -> None:
        """
        Subscribe to C{topic} when the host starts; C{handler} is called in the
        reactor thread with each L{PubsubMessage} another peer publishes there
        (our own publishes are left out).

        @raise RuntimeError: when the service has been started already.
        """
        if self._thread is not None:
            raise RuntimeError("subscribe to topics before the swarm starts")
        self._handlers[topic] = handler

    def startService(self) -> None:
        """
        Start the thread that runs the host; L{when_running} tells when it
        listens.
        """
        super().startService()
        route_library_logging(self._reactor)
        self._reset()
        self.cut_off = 0
        self._thread = threading.Thread(
            target=self._thread_main,
            name=f"gitlawb-p2p-{self.peer_id[-8:]}",
            daemon=False,
        )
        self._thread.start()

        # The thread is not a daemon: should the reactor shut down without
        # stopping this service, the thread must still be told to end or the
        # process could not exit.
        if hasattr(self._reactor, "addSystemEventTrigger"):
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "after", "shutdown", self._request_stop
            )

    def when_running(self) -> Deferred[None]:
        """
        @return: a Deferred that fires with C{None} once the host listens on
            all its addresses, or fails with L{ListenFailed} (or whatever
            else stopped the start) or L{SwarmNotRunning} (stopped first).
        """
        if self._started_ok and not self._thread_ended:
            return succeed(None)
        if self._thread_ended or self._thread is None:
            error = self._start_error or SwarmNotRunning("the swarm is not running")
            d: Deferred[None] = Deferred()
            d.errback(Failure(error))
            return d
        d = Deferred()
        self._running_waiters.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        """
        Close every connection (concurrently, bounded by the close timeout),
        close the host and end the thread.

        A stop asked for before the thread has got going is honoured as soon
        as it does.

        @return: a Deferred that fires with C{None} when the thread has
            ended, or at the latest twice the close timeout plus a second
            later (then C{cut_off} is 1 and the thread is left to finish).
        """
        super().stopService()
        if self._thread is None or self._thread_ended:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stopped_waiters.append(d)
        if self._stop_guard is None:
            self._stop_guard = self._reactor.callLater(
                2 * self._close_timeout + 1.0, self._stop_overdue
            )
        self._request_stop()
        return d

    def _request_stop(self) -> None:
        """
        Ask the trio side to stop, now or as soon as its token exists.
        """
        with self._lock:
            self._stop_requested = True
            token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._guarded, self._stop_in_trio)

    def publish(self, topic: str, data: bytes) -> Deferred[None]:
        """
        Publish C{data} on C{topic}.

        Publishes leave in order, at least C{publish_spacing} apart.

        @return: a Deferred that fires with C{None} once the message has been
            handed to the peers' queues, or fails with L{SwarmNotRunning}.
        """
        d: Deferred[None] = Deferred()

        def enqueue() -> None:
            if self._publish_send is None:
                raise SwarmNotRunning("the swarm is stopping")
            self._publish_send.send_nowait((topic, data, d))

        self._run_soon(enqueue, d)
        return d

    def dial(self, address: str) -> Deferred[str]:
        """
        Connect to the peer at C{address}, a multiaddr ending in
        C{/p2p/<peer id>}.

        @return: a Deferred that fires with the peer id once connected, or
            fails with the dial's error (L{SwarmNotRunning} when not running).
        """
        return self.call(self._dial, address)

    def listen_addrs(self) -> list[str]:
        """
        The addresses the host listens on, each ending in C{/p2p/<peer id>}
        (a wildcard host is shown as each local interface address).
        """
        return list(self._listen_addrs)

    def connected_peer_count(self) -> int:
        """
        The number of peers with at least one open connection (a peer may
        hold a TCP and a QUIC connection at once; it counts once).
        """
        network = self._network
        if network is None or self._thread_ended:
            return 0
        return sum(1 for conns in list(network.connections.values()) if conns)

    def kademlia_peer_count(self) -> int:
        """
        The number of peers in the Kademlia routing table.
        """
        dht = self._dht
        if dht is None or self._thread_ended:
            return 0
        return sum(len(bucket.peers) for bucket in list(dht.routing_table.buckets))

    def info(self) -> dict[str, Any]:
        """
        The body of C{GET /api/v1/p2p/info}.
        """
        pubsub, gossipsub = self._pubsub, self._gossipsub
        running = not self._thread_ended and self._started_ok
        topics: list[str] = []
        mesh_peers: set[Any] = set()
        all_peers = 0
        if running and pubsub is not None and gossipsub is not None:
            # list() copies in C without running Python code, so the trio
            # thread cannot change a dict or set while it is being read.
            topics = sorted(list(pubsub.topic_ids))
            for members in list(gossipsub.mesh.values()):
                mesh_peers.update(list(members))
            all_peers = len(gossipsub.peer_protocol)
        return {
            "enabled": True,
            "peer_id": self.peer_id,
            "topics": topics,
            "connected_peers": self.connected_peer_count(),
            "gossipsub_mesh_peers": len(mesh_peers),
            "gossipsub_all_peers": all_peers,
            "listen_addrs": self.listen_addrs() if running else [],
        }

    def _run_soon(self, step: Callable[[], None], d: Deferred[Any]) -> None:
        """
        Run C{step} in the trio thread; if it raises, C{d} fails with that.
        """
        with self._lock:
            token = None if self._stop_requested else self._token
        if token is None:
            _fire_error(d, SwarmNotRunning("the swarm is not running"))
            return
        try:
            token.run_sync_soon(self._guarded, step, d)
        except trio.RunFinishedError:
            _fire_error(d, SwarmNotRunning("the swarm has stopped"))

    def call(self, function: Callable[..., Awaitable[_T]], *args: Any) -> Deferred[_T]:
        """
        Run C{function(host, *args)} as a task in the swarm's trio thread,
        where C{host} is the running libp2p host: the way to use any other
        part of py-libp2p.

        @return: a Deferred that fires with what the coroutine returns or fails
            with its error (L{SwarmNotRunning} when the swarm is not running or
            its stop cut the task off).
        """
        d: Deferred[_T] = Deferred()

        async def task() -> None:
            try:
                if self._libp2p_host is None:
                    raise SwarmNotRunning("the swarm is not running")
                result = await function(self._libp2p_host, *args)
            except Exception as e:
                self._to_reactor(_fire_error, d, e)
            except BaseException:
                self._to_reactor(
                    _fire_error, d, SwarmNotRunning("cut off by the swarm's stop")
                )
                raise
            else:
                self._to_reactor(_fire, d, result)

        def start() -> None:
            if self._nursery is None or not self._serving:
                raise SwarmNotRunning("the swarm is not running")
            self._nursery.start_soon(task)

        self._run_soon(start, d)
        return d

    def _on_started(self, listen_addrs: list[str]) -> None:
        self._listen_addrs = listen_addrs
        self._started_ok = True
        self.log.info(
            "p2p: listening peer_id={peer_id} addrs={addrs}",
            peer_id=self.peer_id,
            addrs=" ".join(listen_addrs),
        )
        waiters, self._running_waiters = self._running_waiters, []
        for d in waiters:
            _fire(d, None)

    def _on_thread_ended(self, error: BaseException | None) -> None:
        if self._thread_ended:
            return
        self._thread_ended = True
        if self._thread is not None:
            # Its last act was to call us: the join is immediate.
            self._thread.join(timeout=1.0)
        if self._stop_guard is not None and self._stop_guard.active():
            self._stop_guard.cancel()
        self._stop_guard = None
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        stopping = self._stop_requested

        if error is not None:
            self._start_error = error
            what = "could not start" if not self._started_ok else "crashed"
            message = f"p2p swarm {what}: {_describe(error)}"
            self.log.failure(
                "p2p: swarm {what}",
                Failure(error),
                what=what,
                log_level=LogLevel.critical,
            )
            if self._on_fatal is not None and not stopping:
                self._on_fatal(message)
        elif not stopping:
            self.log.critical("p2p: swarm thread ended unexpectedly")
            if self._on_fatal is not None:
                self._on_fatal("p2p swarm thread ended unexpectedly")
        else:
            self.log.info("p2p: swarm stopped")

        waiters, self._running_waiters = self._running_waiters, []
        for d in waiters:
            _fire_error(d, error or SwarmNotRunning("stopped before it started"))
        stopped, self._stopped_waiters = self._stopped_waiters, []
        for d in stopped:
            _fire(d, None)

    def _stop_overdue(self) -> None:
        self._stop_guard = None
        self.cut_off = 1
        self.log.warn(
            "p2p: the swarm thread has not ended {secs}s after the stop; "
            "going on without it",
            secs=2 * self._close_timeout + 1.0,
        )
        stopped, self._stopped_waiters = self._stopped_waiters, []
        for d in stopped:
            _fire(d, None)

    # -- the trio side ----------------------------------------------------

    def _to_reactor(self, function: Callable[..., object], *args: Any) -> None:
        self._reactor.callFromThread(function, *args)

    def _log_soon(self, level: LogLevel, text: str, **fields: object) -> None:
        self._reactor.callFromThread(self.log.emit, level, text, **fields)

    def _guarded(
        self, step: Callable[[], None], d: Deferred[Any] | None = None
    ) -> None:
        """
        Run a C{run_sync_soon} step: an exception escaping it would end
        C{trio.run}, so it goes to C{d} (or the log) instead.
        """
        try:
            step()
        except BaseException as e:
            if d is not None:
                self._to_reactor(_fire_error, d, e)
            else:
                self._log_soon(
                    LogLevel.error, "p2p: bridge step failed: {error}", error=repr(e)
                )

    def _stop_in_trio(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        if not self._serving:
            # Still starting: nothing to close gracefully.
            self._run_scope.cancel()

    def _thread_main(self) -> None:
        error: BaseException | None = None
        try:
            trio.run(self._main)
        except BaseException as e:
            error = _root_error(e)
        finally:
            self._to_reactor(self._on_thread_ended, error)

    async def _main(self) -> None:
        # Publishes asked for while the host starts wait in this queue.
        publish_send, publish_receive = trio.open_memory_channel[_Publish](math.inf)
        self._publish_send = publish_send
        self._stop_event = trio.Event()
        with self._lock:
            self._token = trio.lowlevel.current_trio_token()
            stop_early = self._stop_requested

        try:
            if not stop_early:
                with self._run_scope:
                    await self._run(publish_receive)
        finally:
            self._serving = False
            self._nursery = None
            self._publish_send = None
            self._fail_queued(publish_receive)
            if self._pubsub is not None:
                # Each Pubsub starts a seen-message sweeper thread that
                # nothing else stops; the join takes at most a moment.
                self._pubsub.seen_messages.stop()

    async def _run(self, publish_queue: trio.MemoryReceiveChannel[_Publish]) -> None:
        host, pubsub, gossipsub, dht, addrs = self._build()
        self._libp2p_host = host
        self._pubsub = pubsub
        network = host.get_network()
        async with contextlib.AsyncExitStack() as stack:
            # The network first, then Pubsub and GossipSub, and only then
            # listen: a Pubsub built but not running makes dials hang, and an
            # inbound pubsub stream arriving before it runs can crash the
            # swarm. (This is host.run() with the services slotted in; the
            # extras it starts, mDNS, UPnP and its bootstrap, are all off.)
            await stack.enter_async_context(background_trio_service(network))
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(gossipsub))
            await stack.enter_async_context(background_trio_service(dht))
            await pubsub.wait_until_ready()
            self._dht = dht
            self._gossipsub = gossipsub
            subscriptions = [
                (topic, await pubsub.subscribe(topic)) for topic in self._handlers
            ]

            # A QUIC listen failure raises; a TCP one is only logged, so every
            # requested listener is checked.
            try:
                await network.listen(*addrs)
            except Exception as e:
                raise ListenFailed(
                    f"cannot listen on {' '.join(str(a) for a in addrs)}: "
                    f"{_describe(e)}"
                ) from e
            missing = [str(a) for a in addrs if str(a) not in network.listeners]
            if missing:
                raise ListenFailed(
                    f"cannot listen on {' '.join(missing)} "
                    "(address in use or not permitted; see the libp2p error)"
                )
            self._network = network

            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._serving = True
                for topic, subscription in subscriptions:
                    nursery.start_soon(self._drain, host, topic, subscription)
                nursery.start_soon(self._publisher, pubsub, publish_queue)
                network.register_notifee(_PeerWatch(self, dht))
                for address in self._bootstrap:
                    nursery.start_soon(self._keep_connected, host, address)
                self._to_reactor(self._on_started, self._shown_addrs(host))

                assert self._stop_event is not None
                await self._stop_event.wait()
                self._serving = False
                self._publish_send = None

                # Bound the rest of the stop, unwinding included.
                self._run_scope.deadline = trio.current_time() + 2 * self._close_timeout
                with trio.move_on_after(self._close_timeout) as closing:
                    await self._close_connections(network)
                    await host.close()
                if closing.cancelled_caught:
                    self._log_soon(
                        LogLevel.warn,
                        "p2p: connections not closed within {secs}s",
                        secs=self._close_timeout,
                    )
                nursery.cancel_scope.cancel()

    def _build(
        self,
    ) -> tuple[IHost, Pubsub, GossipSub, KadDHT, list[Multiaddr]]:
        """
        Build the host, Pubsub, GossipSub and Kademlia (in the trio thread).
        """
        # Identify answers with module-level constants: process-wide, and every
        # host in this process is a gitlawb node.
        identify.PROTOCOL_VERSION = IDENTIFY_PROTOCOL_VERSION
        identify.AGENT_VERSION = IDENTIFY_AGENT_VERSION

        key_pair = create_new_key_pair(self._seed)
        addrs = [Multiaddr(f"/{self._ip_protocol()}/{self._host}/tcp/{self._port}")]
        if self._quic:
            addrs.append(
                Multiaddr(
                    f"/{self._ip_protocol()}/{self._host}/udp/{self._port}/quic-v1"
                )
            )

        # Only Noise on TCP: the default options also accept plaintext and
        # secio. QUIC brings its own TLS 1.3 with the libp2p certificate.
        security = {
            TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
                key_pair, noise_privkey=new_x25519_key_pair().private_key
            )
        }
        host = new_host(
            key_pair=key_pair,
            sec_opt=security,
            listen_addrs=addrs,
            enable_quic=self._quic,
        )

        # Spam protection rate-limits every forwarder, our own publishes
        # included, to 10 messages/s per topic and drops the rest silently.
        # Incoming messages reach our subscription before that check, so it
        # only limits relaying; our publishes are paced instead.
        gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=GOSSIP_DEGREE,
            degree_low=GOSSIP_DEGREE_LOW,
            degree_high=GOSSIP_DEGREE_HIGH,
            heartbeat_interval=GOSSIP_HEARTBEAT_SECS,
            spam_protection_enabled=False,
        )
        pubsub = Pubsub(
            host,
            gossipsub,
            strict_signing=True,
            allowed_topics=frozenset(self._handlers) or None,
        )
        dht = KadDHT(host, DHTMode.SERVER)
        return host, pubsub, gossipsub, dht, addrs

    def _ip_protocol(self) -> str:
        return "ip6" if ":" in self._host else "ip4"

    def _shown_addrs(self, host: IHost) -> list[str]:
        """
        The listening addresses as peers can dial them: a wildcard host is
        replaced by each local interface address, TCP first.
        """
        family = self._ip_protocol()
        if self._host in ("0.0.0.0", "::"):
            interfaces = get_available_interfaces(0)
            ips = [str(a.value_for_protocol(family)) for a in interfaces if family in a]
        else:
            ips = [self._host]
        wildcard = f"/{family}/{self._host}/"
        shown: list[str] = []
        for addr in sorted(map(str, host.get_transport_addrs()), key=_quic_last):
            for ip in ips:
                concrete = addr.replace(wildcard, f"/{family}/{ip}/", 1)
                text = f"{concrete}/p2p/{self.peer_id}"
                if text not in shown:
                    shown.append(text)
        return shown

    async def _drain(
        self, host: IHost, topic: str, subscription: TrioSubscriptionAPI
    ) -> None:
        """
        Hand each message of a subscription to the reactor at once: the
        subscription buffers only 32 messages.
        """
        own = host.get_id().to_bytes()
        while True:
            message = await subscription.get()
            # A node receives its own publishes on its subscription.
            if message.from_id == own:
                continue
            item = PubsubMessage(
                topic=topic,
                data=bytes(message.data),
                from_peer_id=base58.b58encode(message.from_id).decode("ascii"),
                seqno=bytes(message.seqno),
            )
            self._to_reactor(self._deliver, item)

    def _deliver(self, message: PubsubMessage) -> None:
        handler = self._handlers.get(message.topic)
        if handler is None:
            return
        try:
            handler(message)
        except Exception:
            self.log.failure(
                "p2p: handler for topic {topic} failed", topic=message.topic
            )

    async def _publisher(
        self,
        pubsub: Pubsub,
        queue: trio.MemoryReceiveChannel[_Publish],
    ) -> None:
        """
        Publish queued messages in order, C{publish_spacing} apart.
        """
        last = -math.inf
        async for topic, data, d in queue:
            try:
                await trio.sleep_until(last + self._publish_spacing)
                await pubsub.publish(topic, data)
            except Exception as e:
                self._to_reactor(_fire_error, d, e)
            except BaseException:
                self._to_reactor(
                    _fire_error, d, SwarmNotRunning("cut off by the swarm's stop")
                )
                raise
            else:
                self._to_reactor(_fire, d, None)
            last = trio.current_time()

    def _fail_queued(self, queue: trio.MemoryReceiveChannel[_Publish]) -> None:
        while True:
            try:
                _, _, d = queue.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            self._to_reactor(_fire_error, d, SwarmNotRunning("the swarm stopped"))

    async def _dial(self, host: IHost, address: str) -> str:
        info = info_from_p2p_addr(Multiaddr(address))
        with trio.fail_after(self._dial_timeout):
            await host.connect(info)
        return str(info.peer_id)

    async def _keep_connected(self, host: IHost, address: str) -> None:
        """
        Stay connected to a bootstrap peer: dial it, redial with backoff when
        the dial fails, and dial again when the connection is lost.
        """
        try:
            info = info_from_p2p_addr(Multiaddr(address))
        except Exception as e:
            self._log_soon(
                LogLevel.error,
                "p2p: bootstrap address {address} is not usable "
                "(it must end in /p2p/<peer id>): {error}",
                address=address,
                error=_describe(e),
            )
            return
        peer = str(info.peer_id)
        network = host.get_network()
        delays = redial_delays(self._redial_initial, self._redial_max)
        while True:
            if not network.connections.get(info.peer_id):
                # The swarm refuses for a minute to dial a peer whose dial
                # failed; a bootstrap peer keeps to our backoff instead.
                unblock = getattr(network, "unblock_peer", None)
                if unblock is not None:
                    unblock(info.peer_id)
                try:
                    with trio.fail_after(self._dial_timeout):
                        await host.connect(info)
                except Exception as e:
                    delay = next(delays)
                    self._log_soon(
                        LogLevel.warn,
                        "p2p: bootstrap peer {address} not reached ({error}); "
                        "next dial in {delay}s",
                        address=address,
                        error=_describe(e),
                        delay=delay,
                    )
                    await trio.sleep(delay)
                    continue
                delays = redial_delays(self._redial_initial, self._redial_max)
                self._log_soon(
                    LogLevel.info, "p2p: connected to bootstrap peer {peer}", peer=peer
                )

            # Wait until a connection to the peer closes, and look again now
            # and then in case the swarm still listed it at that moment.
            lost = trio.Event()
            waiting = self._disconnect_events.setdefault(peer, [])
            waiting.append(lost)
            if network.connections.get(info.peer_id):
                with trio.move_on_after(_BOOTSTRAP_RECHECK_SECS):
                    await lost.wait()
            with contextlib.suppress(ValueError):
                waiting.remove(lost)
            if not self._serving:
                return
            if not network.connections.get(info.peer_id):
                self._log_soon(
                    LogLevel.info,
                    "p2p: lost bootstrap peer {peer}; dialling again",
                    peer=peer,
                )

    async def _close_connections(self, network: INetwork) -> None:
        """
        Close every connection at once; the swarm closes them one by one,
        about 0.2 s each on TCP.
        """

        async def close(conn: INetConn) -> None:
            with contextlib.suppress(Exception):
                await conn.close()

        async with trio.open_nursery() as nursery:
            for conns in list(network.connections.values()):
                for conn in list(conns):
                    nursery.start_soon(close, conn)

    def _peer_connected(self, peer_id: ID, dht: KadDHT) -> None:
        if self._nursery is not None and self._serving:
            self._nursery.start_soon(self._add_to_routing_table, peer_id, dht)

    def _peer_disconnected(self, peer_id: ID) -> None:
        for event in self._disconnect_events.get(str(peer_id), []):
            event.set()

    async def _add_to_routing_table(self, peer_id: ID, dht: KadDHT) -> None:
        await trio.sleep(_ROUTING_TABLE_DELAY_SECS)
        with contextlib.suppress(Exception):
            await dht.add_peer(peer_id)


class _PeerWatch(INotifee):
    """
    Tells the service when peers connect (for Kademlia) and go (for the
    bootstrap redial).
    """

    def __init__(self, service: SwarmService, dht: KadDHT) -> None:
        self._service = service
        self._dht = dht

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._service._peer_connected(conn.muxed_conn.peer_id, self._dht)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._service._peer_disconnected(conn.muxed_conn.peer_id)

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass
