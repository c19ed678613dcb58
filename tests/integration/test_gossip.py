"""
Ref-update gossip between real libp2p hosts on loopback, each in its own
thread, driven from the global reactor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from libp2p.abc import IHost
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from gitlawb.identity.keys import NodeKey
from gitlawb.p2p.gossip import GossipService
from gitlawb.p2p.swarm import SwarmService
from tests.support import free_p2p_port as free_port

pytestmark = pytest.mark.integration

REACTOR: Any = reactor


async def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """
    Poll C{condition} on the reactor until it holds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(REACTOR, 0.02)


def p2p_threads() -> list[threading.Thread]:
    """
    Threads a swarm leaves behind if its stop is broken: its own and
    py-libp2p's seen-message sweeper.
    """
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("gitlawb-p2p") or "_background_cleanup" in t.name
    ]


def an_update(node_did: str, repo: str = "z6Mkowner/project") -> dict[str, Any]:
    return {
        "node_did": node_did,
        "pusher_did": node_did,
        "repo": repo,
        "owner_did": node_did,
        "ref_name": "refs/heads/main",
        "old_sha": "0" * 40,
        "new_sha": "b" * 40,
        "timestamp": "2026-12-03T15:26:00.123456+00:00",
        "cert_id": None,
        "cid": None,
    }


async def connection_kinds(host: IHost) -> list[str]:
    """
    The class names of a host's connections (run in its trio thread).
    """
    return [
        type(conn.muxed_conn).__name__
        for conns in host.get_network().connections.values()
        for conn in conns
    ]


class Node:
    """
    A swarm, its gossip service and what it received.
    """

    def __init__(self, bootstrap: list[str] | None = None, **options: Any) -> None:
        self.key = NodeKey.generate()
        self.received: list[tuple[dict[str, Any], str, bool]] = []
        self.swarm = SwarmService(
            REACTOR,
            self.key,
            free_port(),
            "127.0.0.1",
            bootstrap or [],
            redial_initial=0.1,
            redial_max=0.5,
            **options,
        )
        self.gossip = GossipService(
            self.swarm, lambda u, p, v: self.received.append((u, p, v))
        )

    async def start(self) -> Node:
        self.swarm.startService()
        self.gossip.startService()
        await self.swarm.when_running()
        return self

    async def stop(self) -> None:
        if self.gossip.running:
            await self.gossip.stopService()
        if self.swarm.running:
            await self.swarm.stopService()

    def tcp_addr(self) -> str:
        return next(a for a in self.swarm.listen_addrs() if "/tcp/" in a)

    def quic_addr(self) -> str:
        return next(a for a in self.swarm.listen_addrs() if "/quic-v1/" in a)


class GossipTests(TestCase):
    """
    Two and three nodes gossiping on loopback.
    """

    async def started(self, bootstrap: list[str] | None = None) -> Node:
        node = Node(bootstrap)
        self.addCleanup(lambda: Deferred.fromCoroutine(node.stop()))
        return await node.start()

    async def meshed(self, *nodes: Node) -> None:
        for node in nodes:
            await wait_until(
                lambda node=node: node.swarm.info()["gossipsub_mesh_peers"] > 0,  # type: ignore[misc]
                what="a gossipsub mesh",
            )

    async def test_update_reaches_the_peer_verified(self) -> None:
        """A ref update published by A reaches B, verified, signed by A's DID."""
        a = await self.started()
        b = await self.started(bootstrap=[a.tcp_addr()])
        await self.meshed(a, b)

        await a.gossip.publish(an_update(a.key.did))
        await wait_until(lambda: bool(b.received), what="the update at B")

        [(update, signer, verified)] = b.received
        self.assertEqual(update, an_update(a.key.did))
        self.assertEqual((signer, verified), (a.key.did, True))
        self.assertEqual(a.received, [])

    async def test_forged_node_did_is_not_verified(self) -> None:
        """An update A publishes under another node's DID arrives unverified."""
        a = await self.started()
        b = await self.started(bootstrap=[a.tcp_addr()])
        await self.meshed(a, b)
        someone_else = NodeKey.generate().did

        await a.gossip.publish(an_update(someone_else))
        await wait_until(lambda: bool(b.received), what="the update at B")

        [(update, signer, verified)] = b.received
        self.assertEqual(
            (update["node_did"], signer, verified), (someone_else, a.key.did, False)
        )

    async def test_update_is_relayed_with_its_signer(self) -> None:
        """In a line A - B - C, C gets A's update through B, still verified as A's."""
        b = await self.started()
        a = await self.started(bootstrap=[b.tcp_addr()])
        c = await self.started(bootstrap=[b.quic_addr()])
        await wait_until(lambda: b.swarm.connected_peer_count() == 2, what="B's peers")
        await self.meshed(a, b, c)

        await a.gossip.publish(an_update(a.key.did))
        await wait_until(
            lambda: bool(c.received and b.received), what="the update at C"
        )

        self.assertEqual(c.received[0][1:], (a.key.did, True))

    async def test_quic_carries_gossip(self) -> None:
        """Two nodes connected over QUIC only exchange updates."""
        a = await self.started()
        b = await self.started(bootstrap=[a.quic_addr()])
        await self.meshed(a, b)

        await b.gossip.publish(an_update(b.key.did))
        await wait_until(lambda: bool(a.received), what="the update at A")

        self.assertEqual(a.received[0][1:], (b.key.did, True))
        self.assertEqual(await b.swarm.call(connection_kinds), ["QUICConnection"])

    async def test_info_reports_the_peer(self) -> None:
        """info() counts the connected peer once and lists the topic and addresses."""
        a = await self.started()
        b = await self.started(bootstrap=[a.tcp_addr(), a.quic_addr()])
        await self.meshed(a, b)

        info = b.swarm.info()

        self.assertEqual(info["connected_peers"], 1)
        self.assertEqual(info["topics"], ["gitlawb/ref-updates/v1"])
        self.assertEqual(
            (info["gossipsub_mesh_peers"], info["gossipsub_all_peers"]), (1, 1)
        )
        self.assertEqual(info["listen_addrs"], b.swarm.listen_addrs())
        self.assertTrue(
            all(a.endswith(f"/p2p/{b.swarm.peer_id}") for a in info["listen_addrs"])
        )

    async def test_peers_enter_the_routing_table(self) -> None:
        """Connected peers are added to each other's Kademlia routing table."""
        a = await self.started()
        b = await self.started(bootstrap=[a.tcp_addr()])

        await wait_until(
            lambda: a.swarm.kademlia_peer_count() == b.swarm.kademlia_peer_count() == 1,
            what="Kademlia peers",
        )

    async def test_burst_of_publishes_all_arrive(self) -> None:
        """Fifty back-to-back publishes all arrive (paced under the 32-RPC queue)."""
        a = await self.started()
        b = await self.started(bootstrap=[a.tcp_addr()])
        await self.meshed(a, b)

        for i in range(50):
            a.gossip.publish(an_update(a.key.did, repo=f"z6Mkowner/r{i}"))
        await wait_until(lambda: len(b.received) == 50, what="fifty updates at B")

        self.assertEqual(
            [u["repo"] for u, _, _ in b.received],
            [f"z6Mkowner/r{i}" for i in range(50)],
        )
