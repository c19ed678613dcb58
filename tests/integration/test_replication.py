"""
Replication between real node processes on loopback, through gossip and
through HTTP notify (PROTOCOL.md section 9).

Every node is a real C{twistd -n gitlawb} process with its own database;
pushes go through L{SigningProxy}; what a mirror serves is read with plain
git.  The two-node HTTP cases live in C{test_peers_sync}; this module adds
what they leave out: gossip alone, three nodes (gossip relayed by the middle
one; HTTP notify alone), a node that was down during a push, a forged gossip
message, and a peer that hangs while the outbox relay notifies it.

Two sync workers on one database are covered in C{test_sync_queue} (two
L{SyncWorker}s over one database, each row claimed once).

Isolating gossip: the origin A is never told about B over HTTP (B has no
C{GITLAWB_BOOTSTRAP_PEERS}, so it never announces itself, and A refuses B's
replica registration because B is no peer of A's).  A's outbox relay therefore
has no HTTP peer to notify, and the only way B can hear of a push is the
gossip message.  B still needs A's HTTP URL to fetch from: the test announces
A to B, signed with A's own key (read from A's data directory), exactly as A
would announce itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gitlawb.identity.keys import NodeKey, load_or_create_key, write_key
from tests.integration.test_peers_sync import (
    SHA,
    HangingServer,
    StartNode,
    create_repo,
    git,
    node_did,
    peer_dids,
    push_commits,
    query,
    refs,
    wait_for,
)
from tests.support import REPO_ROOT, Agent, NodeProcess, free_p2p_port, request

pytestmark = pytest.mark.integration


# -- helpers -----------------------------------------------------------------


def p2p_settings(bootstrap: NodeProcess | None = None) -> dict[str, str]:
    """
    The settings that turn a node's swarm on, on loopback, dialling
    C{bootstrap}'s QUIC address when given.
    """
    settings = {
        "GITLAWB_P2P_PORT": str(free_p2p_port()),
        "GITLAWB_P2P_HOST": "127.0.0.1",
    }
    if bootstrap is not None:
        settings["GITLAWB_P2P_BOOTSTRAP"] = quic_address(bootstrap)
    return settings


def p2p_info(node: NodeProcess) -> dict[str, Any]:
    answer = request("GET", node.url + "/api/v1/p2p/info")
    assert answer.status == 200, answer.body
    info: dict[str, Any] = answer.json()
    return info


def quic_address(node: NodeProcess) -> str:
    port = node.env["GITLAWB_P2P_PORT"]
    return f"/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{p2p_info(node)['peer_id']}"


def node_key(node: NodeProcess) -> NodeKey:
    return load_or_create_key(node.data_dir / "identity.pem")


def announce(origin: NodeProcess, to: NodeProcess) -> None:
    """
    Make C{origin} a known HTTP peer of C{to}, with an announce signed by
    C{origin}'s own key (as its heartbeat would send it), without C{to}
    becoming a peer of C{origin}.
    """
    key = node_key(origin)
    answer = Agent(key).call(
        to, "POST", "/api/v1/peers/announce", {"did": key.did, "http_url": origin.url}
    )
    assert answer.status == 200, answer.body


def wait_meshed(*nodes: NodeProcess, peers: int = 1) -> None:
    for node in nodes:
        wait_for(
            lambda node=node: p2p_info(node)["gossipsub_mesh_peers"] >= peers,  # type: ignore[misc]
            timeout=20,
            what=f"{node.data_dir.name} to join the gossip mesh",
        )


def events(node: NodeProcess) -> list[dict[str, Any]]:
    answer = request("GET", node.url + "/api/v1/events/ref-updates?limit=200")
    listed: list[dict[str, Any]] = answer.json()["events"]
    return listed


def short_of(agent: Agent) -> str:
    return agent.did.rsplit(":", 1)[1]


def assert_clone_matches(
    node: NodeProcess, slug: str, expected: dict[str, str], work: Path
) -> None:
    """
    A plain clone from C{node} checks out the commit C{expected} names.
    """
    git("clone", "-q", f"{node.url}/{slug}.git", str(work))
    assert git("rev-parse", "HEAD", cwd=work).strip() == expected["refs/heads/main"]


# py-libp2p's gossipsub advertises (IHAVE) the messages of its last three
# heartbeats, a second each, to peers that join, and serves them for five.
GOSSIP_MEMORY_SECS = 5.0


def wait_out_gossip_memory(node: NodeProcess) -> None:
    """
    Wait until C{node} has published every ref update of its outbox and its
    gossip no longer offers them, so that a peer starting now cannot hear of
    them by gossip.
    """
    wait_for(
        lambda: (
            query(node, "SELECT count(*) FROM outbox WHERE done_at IS NULL") == [(0,)]
        ),
        what="the outbox to be relayed",
    )
    time.sleep(GOSSIP_MEMORY_SECS)


def gossip_pair(start_node: StartNode) -> tuple[NodeProcess, NodeProcess]:
    """
    A and B joined by the swarm only: B dials A's QUIC address and knows A's
    HTTP URL from a signed announce; A knows nothing of B over HTTP.
    """
    a = start_node(name="a", **p2p_settings())
    b = start_node(name="b", **p2p_settings(bootstrap=a))
    announce(a, b)
    wait_meshed(a, b)
    return a, b


# -- through gossip ------------------------------------------------------------


def test_push_reaches_peer_through_gossip_alone(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A push to A is mirrored by B when gossip is the only way B can hear of it."""
    a, b = gossip_pair(start_node)
    owner = Agent()
    slug = f"{short_of(owner)}/demo"
    create_repo(a, owner, "demo")

    served_by_a = push_commits(a, owner, "demo", tmp_path / "work")
    wait_for(
        lambda: refs(f"{b.url}/{slug}.git") == served_by_a,
        timeout=30,
        what="B to mirror the push",
    )

    assert_clone_matches(b, slug, served_by_a, tmp_path / "clone")
    # A had nobody to notify over HTTP: the update came by gossip, signed by A.
    assert peer_dids(a) == set()
    received = [e for e in events(b) if e["repo"] == slug]
    assert received
    assert {(e["node_did"], e["from_peer"], e["verified"]) for e in received} == {
        (node_did(a), node_did(a), True)
    }
    assert "gossip: ref update repo=" + slug in b.log()
    assert "/api/v1/sync/notify" not in a.log()


def test_three_nodes_gossip_relayed_through_the_middle(
    start_node: StartNode, tmp_path: Path
) -> None:
    """In a line A - B - C, C mirrors A's push from A's gossip relayed by B."""
    a = start_node(name="a", **p2p_settings())
    b = start_node(name="b", **p2p_settings(bootstrap=a))
    c = start_node(name="c", **p2p_settings(bootstrap=b))
    announce(a, b)
    announce(a, c)
    wait_meshed(b, peers=2)
    wait_meshed(a, c)
    owner = Agent()
    slug = f"{short_of(owner)}/line"
    create_repo(a, owner, "line")

    served_by_a = push_commits(a, owner, "line", tmp_path / "work")
    for node in (b, c):
        wait_for(
            lambda node=node: refs(f"{node.url}/{slug}.git") == served_by_a,  # type: ignore[misc]
            timeout=30,
            what=f"{node.data_dir.name} to mirror the push",
        )

    assert_clone_matches(c, slug, served_by_a, tmp_path / "clone")
    assert peer_dids(a) == set()
    # C has no connection to A: the message reached it through B, still
    # signed by A.
    assert p2p_info(c)["connected_peers"] == 1
    assert {(e["from_peer"], e["verified"]) for e in events(c)} == {(node_did(a), True)}


# -- through HTTP notify alone --------------------------------------------------


def test_three_nodes_through_http_notify_alone(
    start_node: StartNode, tmp_path: Path
) -> None:
    """With no swarm anywhere, B and C both mirror A's push from A's notifies."""
    a = start_node(name="a")
    b = start_node(name="b", GITLAWB_BOOTSTRAP_PEERS=a.url)
    c = start_node(name="c", GITLAWB_BOOTSTRAP_PEERS=a.url)
    wait_for(lambda: peer_dids(a) == {node_did(b), node_did(c)}, what="A's peers")
    owner = Agent()
    slug = f"{short_of(owner)}/fan"
    create_repo(a, owner, "fan")

    served_by_a = push_commits(a, owner, "fan", tmp_path / "work")
    for node in (b, c):
        wait_for(
            lambda node=node: refs(f"{node.url}/{slug}.git") == served_by_a,  # type: ignore[misc]
            timeout=30,
            what=f"{node.data_dir.name} to mirror the push",
        )

    assert_clone_matches(c, slug, served_by_a, tmp_path / "clone")
    assert all(p2p_info(n) == {"enabled": False} for n in (a, b, c))
    for node in (b, c):
        assert {(e["from_peer"], e["verified"]) for e in events(node)} == {
            (node_did(a), True)
        }
    assert "gossip:" not in b.log() + c.log()


# -- a node that was down ------------------------------------------------------


def test_mirror_catches_up_after_missing_gossip_while_down(
    start_node: StartNode, tmp_path: Path
) -> None:
    """B, down during a push it could only hear of by gossip, fetches it on restart."""
    a, b = gossip_pair(start_node)
    owner = Agent()
    slug = f"{short_of(owner)}/late"
    create_repo(a, owner, "late")
    first = push_commits(a, owner, "late", tmp_path / "work")
    wait_for(lambda: refs(f"{b.url}/{slug}.git") == first, what="the first mirror")
    b.stop()

    second = push_commits(a, owner, "late", tmp_path / "work", count=1)
    wait_out_gossip_memory(a)
    b.start()

    wait_for(
        lambda: refs(f"{b.url}/{slug}.git") == second,
        timeout=30,
        what="B to catch up at start",
    )
    # Usually nothing tells B of the second push and it refreshes its mirror by
    # itself at start; gossipsub may still re-offer the message when B's
    # heartbeats lag (a loaded machine), which is a fine way to catch up too,
    # so which path did it is not asserted.


def test_new_repository_missed_while_down_comes_with_a_sync_trigger(
    start_node: StartNode, tmp_path: Path
) -> None:
    """B, down when A's repository was first pushed, mirrors it after a sync trigger."""
    a, b = gossip_pair(start_node)
    owner = Agent()
    slug = f"{short_of(owner)}/missed"
    create_repo(a, owner, "missed")
    b.stop()

    served_by_a = push_commits(a, owner, "missed", tmp_path / "work")
    wait_out_gossip_memory(a)
    b.start()
    answer = Agent().call(b, "POST", "/api/v1/sync/trigger", {})

    assert answer.status == 200, answer.body
    assert (answer.json()["peers_reached"], answer.json()["repos_enqueued"]) == (1, 1)
    wait_for(
        lambda: refs(f"{b.url}/{slug}.git") == served_by_a,
        timeout=30,
        what="B to mirror after the trigger",
    )


# -- a forged gossip message ---------------------------------------------------


def publish_main() -> None:
    """
    Join a swarm and publish ref updates, then leave: run as
    C{python -c "...; publish_main()" '<json>'} with C{key} (a key file),
    C{port}, C{bootstrap} (a multiaddr) and C{updates} (a list of messages,
    published in order, whatever C{node_did} they name).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import deferLater

    from gitlawb.p2p.gossip import GossipService
    from gitlawb.p2p.swarm import SwarmService

    args = json.loads(sys.argv[1])
    clock: Any = reactor
    swarm = SwarmService(
        clock,
        load_or_create_key(Path(args["key"])),
        int(args["port"]),
        "127.0.0.1",
        [args["bootstrap"]],
    )
    gossip = GossipService(swarm, lambda update, signer, verified: None)
    failed: list[str] = []

    async def run() -> None:
        swarm.startService()
        gossip.startService()
        try:
            await swarm.when_running()
            deadline = time.monotonic() + 20
            while not swarm.info()["gossipsub_mesh_peers"]:
                if time.monotonic() > deadline:
                    raise TimeoutError("no gossip mesh")
                await deferLater(clock, 0.05)
            for update in args["updates"]:
                await gossip.publish(update)
            # Let the messages leave before the connection closes.
            await deferLater(clock, 1.0)
        except Exception as e:
            failed.append(repr(e))
        finally:
            await gossip.stopService()
            await swarm.stopService()

    ensureDeferred(run()).addBoth(lambda _: clock.stop())
    clock.run()
    if failed:
        raise SystemExit(f"publish failed: {failed[0]}")


def publish_from_another_process(
    key_path: Path, bootstrap: str, updates: list[dict[str, Any]]
) -> None:
    arguments = {
        "key": str(key_path),
        "port": free_p2p_port(),
        "bootstrap": bootstrap,
        "updates": updates,
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.integration.test_replication import publish_main;"
            " publish_main()",
            json.dumps(arguments),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]


def ref_update(node: str, pusher: Agent, repo: str, new_sha: str) -> dict[str, Any]:
    return {
        "node_did": node,
        "pusher_did": pusher.did,
        "repo": f"{short_of(pusher)}/{repo}",
        "owner_did": pusher.did,
        "ref_name": "refs/heads/main",
        "old_sha": "0" * 40,
        "new_sha": new_sha,
        "timestamp": "2026-12-03T15:26:00.000000+00:00",
        "cert_id": None,
        "cid": None,
    }


def test_forged_gossip_is_stored_but_never_synced(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A gossip update naming A but signed by another key is kept, never acted on."""
    # A holds the real repository and is a known peer of B: a sync from A
    # would succeed, so only the signature check stands in the way.
    a = start_node(name="a")
    owner = Agent()
    create_repo(a, owner, "target")
    served_by_a = push_commits(a, owner, "target", tmp_path / "work")
    b = start_node(name="b", **p2p_settings())
    announce(a, b)
    # The forger is a known peer too, so its own (honest) update is queued:
    # that shows the messages arrived and verified ones are acted on.
    forger = NodeKey.generate()
    write_key(tmp_path / "forger.pem", forger)
    honest = Agent(forger).call(
        b,
        "POST",
        "/api/v1/peers/announce",
        {"did": forger.did, "http_url": "http://127.0.0.1:9"},
    )
    assert honest.status == 200, honest.body
    forged = ref_update(node_did(a), owner, "target", served_by_a["refs/heads/main"])
    control = ref_update(forger.did, owner, "control", SHA)

    publish_from_another_process(
        tmp_path / "forger.pem", quic_address(b), [forged, control]
    )

    wait_for(
        lambda: query(
            b, "SELECT 1 FROM sync_queue WHERE origin_did = %s", (forger.did,)
        ),
        what="the forger's own update to be queued",
    )
    stored = wait_for(
        lambda: [e for e in events(b) if e["node_did"] == node_did(a)],
        what="the forged update to be stored",
    )
    assert [(e["from_peer"], e["verified"]) for e in stored] == [(forger.did, False)]
    assert query(
        b, "SELECT count(*) FROM sync_queue WHERE origin_did = %s", (node_did(a),)
    ) == [(0,)]
    time.sleep(1)
    assert refs(f"{b.url}/{short_of(owner)}/target.git") == {}
    assert not (b.data_dir / "repos" / short_of(owner) / "target.git").exists()


# -- a peer that hangs --------------------------------------------------------


@pytest.fixture
def hanging() -> Iterator[HangingServer]:
    with HangingServer() as server:
        yield server


def test_hanging_peer_holds_the_relay_one_timeout_at_most(
    start_node: StartNode, tmp_path: Path, hanging: HangingServer
) -> None:
    """A peer that never answers delays A's notifies to B by one timeout at most."""
    timeout = 2.0
    a = start_node(name="a", GITLAWB_PEER_TIMEOUT_SECS=str(timeout))
    b = start_node(name="b", GITLAWB_BOOTSTRAP_PEERS=a.url)
    stuck, owner = Agent(), Agent()
    announced = stuck.call(
        a, "POST", "/api/v1/peers/announce", {"did": stuck.did, "http_url": hanging.url}
    )
    assert announced.status == 200, announced.body
    wait_for(lambda: peer_dids(a) == {node_did(b), stuck.did}, what="A's peers")
    create_repo(a, owner, "busy")
    create_repo(a, owner, "other")
    # A push of seven refs to one repository makes seven outbox rows, each
    # waiting on the hanging peer; a push to another repository comes right
    # behind them, and only its own rows can tell B about it.
    busy = tmp_path / "busy"
    git("init", "-q", "-b", "main", str(busy))
    (busy / "one").write_text("one\n")
    git("add", ".", cwd=busy)
    git("commit", "-q", "-m", "one", cwd=busy)
    for n in range(5):
        git("tag", f"t{n}", cwd=busy)
    push_commits(a, owner, "busy", busy, count=0)

    pushed = time.monotonic()
    served_by_a = push_commits(a, owner, "other", tmp_path / "other", count=1)
    wait_for(
        lambda: refs(f"{b.url}/{short_of(owner)}/other.git") == served_by_a,
        timeout=60,
        what="B to mirror the second repository",
    )
    took = time.monotonic() - pushed

    # Sent one row after another, the second push would wait 7 x 2 s behind
    # the first; sent together, one timeout at most (plus the push and sync).
    assert took < timeout + 2, took
    errors = query(a, "SELECT last_error FROM outbox WHERE last_error IS NOT NULL")
    assert errors
    # Each row's error lists one reason per peer that failed it; the hanging
    # peer's must say it timed out.  (On a loaded machine B may also fail a
    # row for a reason of its own, which is not what this test is about.)
    stuck_reasons = [
        reason
        for (error,) in errors
        for reason in error.split("; ")
        if reason.startswith(stuck.did)
    ]
    assert stuck_reasons, errors
    # It never answered: each reason is the call's bound, or (when the hanging
    # server's accept queue overflows on a loaded machine) a failed connect;
    # never an answer.
    timed_out = [r for r in stuck_reasons if f"took longer than {timeout:g}s" in r]
    assert timed_out, errors
    assert all(r in timed_out or " failed: " in r for r in stuck_reasons), errors
