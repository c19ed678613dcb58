"""Measure ref-update gossip between two real libp2p hosts on loopback.

Run: ``python bench/bench_gossip.py [messages] [idle_seconds]`` (20 and 10 by
default). For TCP and then QUIC v1 it starts two nodes in this process, B
bootstrapped to A, and prints:

- how long B takes to connect and to see A in its gossipsub mesh;
- publish -> receive latency over C{messages} updates, one at a time, from
  the publish call on A to B's handler running in the reactor thread (median
  and worst);
- the CPU each swarm thread uses while idle with one peer (from
  /proc/self/task/<tid>/stat over C{idle_seconds});
- how long each stop takes.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from gitlawb.identity.keys import NodeKey
from gitlawb.p2p.gossip import GossipService
from gitlawb.p2p.swarm import SwarmService

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import free_p2p_port as free_port

REACTOR: Any = reactor
TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(swarm: SwarmService) -> float:
    """User + system CPU time of the swarm's thread so far."""
    thread = swarm._thread
    assert thread is not None and thread.native_id is not None
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        # The command name may hold spaces; the fields after it do not.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def wait_until(condition: Any, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError("condition not met")
        await deferLater(REACTOR, 0.002)
    return time.monotonic() - started


def an_update(did: str, n: int) -> dict[str, Any]:
    return {
        "pusher_did": did,
        "repo": f"z6Mkbench/r{n}",
        "ref_name": "refs/heads/main",
        "old_sha": "0" * 40,
        "new_sha": f"{n:040x}",
        "timestamp": "2026-12-03T15:26:00.000000+00:00",
    }


async def run(transport: str, messages: int, idle: float) -> None:
    received: dict[str, float] = {}

    def on_update(update: dict[str, Any], signer: str, verified: bool) -> None:
        received[update["repo"]] = time.perf_counter()

    a = SwarmService(REACTOR, NodeKey.generate(), free_port(), "127.0.0.1")
    gossip_a = GossipService(a, lambda u, s, v: None)
    a.startService()
    gossip_a.startService()
    await a.when_running()
    address = next(x for x in a.listen_addrs() if f"/{transport}/" in x)

    b = SwarmService(REACTOR, NodeKey.generate(), free_port(), "127.0.0.1", [address])
    gossip_b = GossipService(b, on_update)
    started = time.monotonic()
    b.startService()
    gossip_b.startService()
    await b.when_running()
    connected = await wait_until(lambda: b.connected_peer_count() == 1)
    meshed = await wait_until(
        lambda: a.info()["gossipsub_mesh_peers"] and b.info()["gossipsub_mesh_peers"]
    )
    print(
        f"{transport}: start+connect {time.monotonic() - started - meshed:.3f}s "
        f"(connect {connected:.3f}s), mesh after {meshed:.3f}s more"
    )

    latencies = []
    for n in range(messages):
        repo = f"z6Mkbench/r{n}"
        sent = time.perf_counter()
        await gossip_a.publish(an_update(a.did, n))
        await wait_until(lambda repo=repo: repo in received)
        latencies.append((received[repo] - sent) * 1000)
    print(
        f"{transport}: publish -> receive over {messages} messages: "
        f"median {statistics.median(latencies):.1f} ms, "
        f"worst {max(latencies):.1f} ms"
    )

    before = thread_cpu_seconds(a), thread_cpu_seconds(b)
    await deferLater(REACTOR, idle)
    after = thread_cpu_seconds(a), thread_cpu_seconds(b)
    shares = [100 * (x - y) / idle for x, y in zip(after, before, strict=True)]
    print(
        f"{transport}: idle CPU over {idle:.0f}s with one peer: "
        f"A {shares[0]:.1f}%, B {shares[1]:.1f}% of a core"
    )

    for name, gossip, swarm in (("B", gossip_b, b), ("A", gossip_a, a)):
        started = time.monotonic()
        await gossip.stopService()
        await swarm.stopService()
        print(f"{transport}: stop {name} {1000 * (time.monotonic() - started):.0f} ms")


async def main(messages: int, idle: float) -> None:
    for transport in ("tcp", "quic-v1"):
        await run(transport, messages, idle)


def entry() -> None:
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    idle = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    done: Deferred[None] = ensureDeferred(main(messages, idle))
    done.addErrback(lambda f: f.printTraceback())
    done.addBoth(lambda _: REACTOR.stop())
    REACTOR.run()


if __name__ == "__main__":
    entry()
