"""
SwarmService's life with real sockets and threads: start, stop, failures,
transports and redials.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.identity.identify.identify import ID as IDENTIFY
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.network.exceptions import SwarmDialAllFailedError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.utils import read_length_prefixed_protobuf
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gitlawb.identity.keys import NodeKey
from gitlawb.p2p.swarm import (
    IDENTIFY_PROTOCOL_VERSION,
    ListenFailed,
    SwarmNotRunning,
    SwarmService,
)
from tests.integration.test_gossip import (
    REACTOR,
    Node,
    free_port,
    p2p_threads,
    wait_until,
)

pytestmark = pytest.mark.integration


class LifecycleTests(TestCase):
    """
    Starting and stopping a swarm.
    """

    def setUp(self) -> None:
        self.fatal: list[str] = []

    def swarm(self, port: int | None = None, **options: Any) -> SwarmService:
        swarm = SwarmService(
            REACTOR,
            NodeKey.generate(),
            free_port() if port is None else port,
            "127.0.0.1",
            on_fatal=self.fatal.append,
            **options,
        )
        self.addCleanup(swarm.stopService)
        return swarm

    async def test_stop_leaves_no_thread(self) -> None:
        """After the stop Deferred fires no swarm or sweeper thread is left."""
        swarm = self.swarm()
        swarm.startService()
        await swarm.when_running()
        self.assertTrue(p2p_threads())

        await swarm.stopService()

        self.assertEqual(p2p_threads(), [])
        self.assertEqual(self.fatal, [])

    async def test_stop_with_a_peer_is_quick(self) -> None:
        """Stopping a swarm with a connected peer closes it well within a second."""
        a = await Node().start()
        b = await Node(bootstrap=[a.tcp_addr()]).start()
        self.addCleanup(lambda: Deferred.fromCoroutine(a.stop()))
        await wait_until(lambda: b.swarm.connected_peer_count() == 1, what="a peer")

        started = time.monotonic()
        await b.stop()

        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(b.swarm.cut_off, 0)

    async def test_stop_before_start_up_finished(self) -> None:
        """A stop asked for in the same turn as the start ends the thread cleanly."""
        swarm = self.swarm()
        swarm.startService()
        running = swarm.when_running()

        await swarm.stopService()

        self.assertEqual(p2p_threads(), [])
        self.failureResultOf(running, SwarmNotRunning)
        self.assertEqual(self.fatal, [])

    async def test_stop_during_start_up(self) -> None:
        """A stop that arrives once the trio run has begun ends the thread cleanly."""
        swarm = self.swarm()
        swarm.startService()
        await wait_until(lambda: swarm._token is not None, what="the trio token")

        await swarm.stopService()

        self.assertEqual(p2p_threads(), [])
        self.assertEqual(self.fatal, [])

    async def test_tcp_port_in_use_fails_the_service(self) -> None:
        """A TCP port already taken fails when_running() and calls on_fatal."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        swarm = self.swarm(port=taken.getsockname()[1])

        swarm.startService()

        with self.assertRaises(ListenFailed):
            await swarm.when_running()
        self.assertEqual(len(self.fatal), 1)
        self.assertIn("tcp", self.fatal[0])
        self.flushLoggedErrors(ListenFailed)
        await wait_until(lambda: not p2p_threads(), what="the thread to end")

    async def test_udp_port_in_use_fails_the_service(self) -> None:
        """A UDP port already taken (QUIC) fails when_running() and calls on_fatal."""
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind(("127.0.0.1", 0))
        self.addCleanup(taken.close)
        swarm = self.swarm(port=taken.getsockname()[1])

        swarm.startService()

        with self.assertRaises(ListenFailed):
            await swarm.when_running()
        self.assertIn("Address already in use", self.fatal[0])
        self.flushLoggedErrors(ListenFailed)
        await wait_until(lambda: not p2p_threads(), what="the thread to end")

    async def test_publish_after_stop_fails(self) -> None:
        """A publish once the swarm has stopped fails with SwarmNotRunning."""
        swarm = self.swarm()
        swarm.startService()
        await swarm.when_running()
        await swarm.stopService()

        with self.assertRaises(SwarmNotRunning):
            await swarm.publish("gitlawb/ref-updates/v1", b"{}")

    async def test_subscribe_after_start_is_refused(self) -> None:
        """Topics are fixed once the swarm has started."""
        swarm = self.swarm()
        swarm.startService()

        with self.assertRaises(RuntimeError):
            swarm.subscribe("late", lambda message: None)


class PeerTests(TestCase):
    """
    What peers see of a swarm.
    """

    async def started(self, bootstrap: list[str] | None = None) -> Node:
        node = Node(bootstrap)
        self.addCleanup(lambda: Deferred.fromCoroutine(node.stop()))
        return await node.start()

    async def test_identify_names_the_gitlawb_protocol(self) -> None:
        """Identify answers with protocol version /gitlawb/1.0.0."""
        a = await self.started()
        b = await self.started()
        await b.swarm.dial(a.tcp_addr())

        async def identify(host: IHost, peer: str) -> str:
            stream = await host.new_stream(ID.from_base58(peer), [IDENTIFY])
            message = Identify()
            message.ParseFromString(
                await read_length_prefixed_protobuf(stream, use_varint_format=True)
            )
            await stream.close()
            return message.protocol_version

        version = await b.swarm.call(identify, a.swarm.peer_id)

        self.assertEqual(version, IDENTIFY_PROTOCOL_VERSION)

    async def test_plaintext_dialer_is_refused(self) -> None:
        """A host offering only plaintext security cannot connect over TCP."""
        a = await self.started()

        error = await deferToThread(trio.run, dial_with_plaintext, a.tcp_addr())

        self.assertIsNotNone(error)
        self.assertEqual(a.swarm.connected_peer_count(), 0)

    async def test_dial_with_the_wrong_peer_id_fails(self) -> None:
        """A QUIC dial that expects another peer id at an address is refused."""
        a = await self.started()
        b = await self.started()
        wrong = a.quic_addr().replace(a.swarm.peer_id, Node().swarm.peer_id)

        with self.assertRaises(SwarmDialAllFailedError):
            await b.swarm.dial(wrong)

        self.assertEqual(b.swarm.connected_peer_count(), 0)

    async def test_lost_bootstrap_peer_is_redialled(self) -> None:
        """When a bootstrap peer comes back after a restart it is dialled again."""
        port = free_port()
        key = NodeKey.generate()
        first = await self.bootstrap_peer(key, port)
        address = next(a for a in first.listen_addrs() if "/tcp/" in a)
        b = await self.started(bootstrap=[address])
        await wait_until(lambda: b.swarm.connected_peer_count() == 1, what="a peer")

        await first.stopService()
        await wait_until(lambda: b.swarm.connected_peer_count() == 0, what="the loss")
        await self.bootstrap_peer(key, port)

        await wait_until(lambda: b.swarm.connected_peer_count() == 1, what="a redial")

    async def bootstrap_peer(self, key: NodeKey, port: int) -> SwarmService:
        swarm = SwarmService(REACTOR, key, port, "127.0.0.1")
        self.addCleanup(swarm.stopService)
        swarm.startService()
        await swarm.when_running()
        return swarm


async def dial_with_plaintext(address: str) -> BaseException | None:
    """
    Dial C{address} from a host that offers only plaintext; the dial's error,
    or None if it connected.
    """
    key_pair = create_new_key_pair()
    listen = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
    host = new_host(
        key_pair=key_pair,
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
        listen_addrs=[listen],
    )
    async with host.run([listen]):
        try:
            with trio.fail_after(5):
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(address)))
        except Exception as e:
            return e
        finally:
            await host.close()
    return None


def test_no_thread_left_by_the_module() -> None:
    """Nothing in this module leaves a p2p thread behind."""
    assert [t for t in p2p_threads() if t is not threading.current_thread()] == []
