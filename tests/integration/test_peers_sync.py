"""
Peers and replication (PROTOCOL.md section 9) between real nodes on loopback.

Each test starts its nodes as real processes (C{twistd -n gitlawb}) with their
own databases; pushes go through L{SigningProxy}; what a mirror holds is read
with plain C{git ls-remote}.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.signing_proxy import SigningProxy
from tests.support import GIT_ENV, Agent, NodeProcess, request

pytestmark = pytest.mark.integration

StartNode = Callable[..., NodeProcess]

SHA = "1" * 40


# -- helpers -----------------------------------------------------------------


def git(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def refs(url: str) -> dict[str, str]:
    """
    The refs a node serves for a repository, as C{git ls-remote} sees them.
    """
    result = subprocess.run(
        ["git", "ls-remote", url], env=GIT_ENV, capture_output=True, timeout=60
    )
    if result.returncode != 0:
        return {}
    pairs = (line.split("\t") for line in result.stdout.decode().splitlines())
    return {name: sha for sha, name in pairs}


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.2)


def create_repo(node: NodeProcess, owner: Agent, name: str) -> None:
    answer = owner.call(node, "POST", "/api/v1/repos", {"name": name})
    assert answer.status == 201, answer.body


def push_commits(
    node: NodeProcess, owner: Agent, name: str, work: Path, count: int = 2
) -> dict[str, str]:
    """
    Commit C{count} files in C{work} and push main and a tag to the node.

    @return: the refs the node then serves.
    """
    if not work.exists():
        git("init", "-q", "-b", "main", str(work))
    for i in range(count):
        (work / f"file-{time.monotonic_ns()}-{i}").write_text(f"content {i}\n")
        git("add", ".", cwd=work)
        git("commit", "-q", "-m", f"commit {i}", cwd=work)
    git("tag", "-f", f"v{time.monotonic_ns()}", cwd=work)
    short = owner.did.rsplit(":", 1)[1]
    with SigningProxy(node.url, owner.key) as proxy:
        git("push", "-q", f"{proxy.url}/{short}/{name}.git", "main", "--tags", cwd=work)
    return refs(f"{node.url}/{short}/{name}.git")


def peer_dids(node: NodeProcess) -> set[str]:
    answer = request("GET", node.url + "/api/v1/peers")
    return {peer["did"] for peer in answer.json()["peers"]}


def node_did(node: NodeProcess) -> str:
    return str(request("GET", node.url + "/").json()["did"])


def query(node: NodeProcess, sql: str, params: Any = None) -> list[Any]:
    connection = psycopg2.connect(node.env["DATABASE_URL"])
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
    finally:
        connection.close()


def start_pair(
    start_node: StartNode, **b_settings: str
) -> tuple[NodeProcess, NodeProcess]:
    """
    Start A, then B with A as its bootstrap peer, and wait until each knows
    the other.
    """
    a = start_node(name="a")
    b = start_node(name="b", GITLAWB_BOOTSTRAP_PEERS=a.url, **b_settings)
    a_did, b_did = node_did(a), node_did(b)
    wait_for(lambda: b_did in peer_dids(a), what="A to know B")
    wait_for(lambda: a_did in peer_dids(b), what="B to know A")
    return a, b


class HangingServer:
    """
    A loopback TCP server that accepts connections and never answers.
    """

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def __enter__(self) -> HangingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def hanging() -> Iterator[HangingServer]:
    with HangingServer() as server:
        yield server


# -- tests ---------------------------------------------------------------------


def test_bootstrap_makes_mutual_peers(start_node: StartNode) -> None:
    """A node announces itself to its bootstrap peer and each records the other."""
    a, b = start_pair(start_node)

    listed = request("GET", a.url + "/api/v1/peers").json()

    assert listed["count"] == 1
    assert listed["peers"][0]["http_url"] == b.url
    assert listed["peers"][0]["reachable"] is True
    ping = request("GET", f"{a.url}/api/v1/peers/{node_did(b)}/ping").json()
    assert ping == {"did": node_did(b), "http_url": b.url, "reachable": True}


def test_push_is_mirrored_through_notify(start_node: StartNode, tmp_path: Path) -> None:
    """A push to A reaches B by notify; B serves the same refs, as A's replica."""
    a, b = start_pair(start_node)
    owner = Agent()
    short = owner.did.rsplit(":", 1)[1]
    create_repo(a, owner, "demo")

    served_by_a = push_commits(a, owner, "demo", tmp_path / "work")
    mirrored = wait_for(
        lambda: refs(f"{b.url}/{short}/demo.git") == served_by_a,
        timeout=30,
        what="B to mirror the push",
    )
    second = push_commits(a, owner, "demo", tmp_path / "work", count=1)
    wait_for(
        lambda: refs(f"{b.url}/{short}/demo.git") == second,
        timeout=30,
        what="B to fetch the second push",
    )

    assert mirrored
    clone = tmp_path / "clone"
    git("clone", "-q", f"{b.url}/{short}/demo.git", str(clone))
    assert git("rev-parse", "HEAD", cwd=clone).strip() == second["refs/heads/main"]
    repo = request("GET", f"{b.url}/api/v1/repos/{short}/demo").json()
    assert repo["owner_did"] == owner.did
    replicas = wait_for(
        lambda: request("GET", f"{a.url}/api/v1/repos/{short}/demo/replicas").json()[
            "replicas"
        ],
        what="B to register as a replica",
    )
    assert replicas[0]["replica_url"] == b.url
    assert replicas[0]["replica_did"] == node_did(b)
    events = request("GET", b.url + "/api/v1/events/ref-updates?limit=10").json()
    assert {e["repo"] for e in events["events"]} == {f"{short}/demo"}
    assert all(e["verified"] and e["node_did"] == node_did(a) for e in events["events"])


def test_node_down_during_push_catches_up(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A push made while B is down reaches B once it is back (the relay retries)."""
    a, b = start_pair(start_node)
    owner = Agent()
    short = owner.did.rsplit(":", 1)[1]
    create_repo(a, owner, "late")
    b.stop()

    served_by_a = push_commits(a, owner, "late", tmp_path / "work")
    time.sleep(1)
    b.start()

    wait_for(
        lambda: refs(f"{b.url}/{short}/late.git") == served_by_a,
        timeout=60,
        what="B to catch up",
    )


def test_sync_trigger_pulls_existing_repositories(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A node that joins after a push mirrors it on a sync trigger."""
    a = start_node(name="a")
    owner = Agent()
    short = owner.did.rsplit(":", 1)[1]
    create_repo(a, owner, "older")
    served_by_a = push_commits(a, owner, "older", tmp_path / "work")
    b = start_node(name="b", GITLAWB_BOOTSTRAP_PEERS=a.url)
    wait_for(lambda: node_did(a) in peer_dids(b), what="B to know A")

    answer = Agent().call(b, "POST", "/api/v1/sync/trigger", {})

    assert answer.status == 200, answer.body
    assert answer.json()["peers_reached"] == 1
    assert answer.json()["repos_enqueued"] == 1
    wait_for(
        lambda: refs(f"{b.url}/{short}/older.git") == served_by_a,
        what="B to mirror after the trigger",
    )


def test_notify_from_unknown_node_is_stored_not_synced(start_node: StartNode) -> None:
    """A notify from a node that is no peer is stored unverified, never queued."""
    b = start_node(name="b")
    stranger, owner = Agent(), Agent()
    short = owner.did.rsplit(":", 1)[1]
    body = {
        "repo": f"{short}/demo",
        "ref_name": "refs/heads/main",
        "new_sha": SHA,
        "node_did": stranger.did,
    }

    answer = stranger.call(b, "POST", "/api/v1/sync/notify", body)

    assert answer.status == 403
    assert answer.json()["error"] == "forbidden"
    events = request("GET", b.url + "/api/v1/events/ref-updates").json()["events"]
    assert [(e["node_did"], e["verified"]) for e in events] == [(stranger.did, False)]
    assert query(b, "SELECT count(*) FROM sync_queue") == [(0,)]


def test_notify_signed_by_another_key_is_stored_not_synced(
    start_node: StartNode,
) -> None:
    """A notify for a known peer signed by another key is never queued."""
    b = start_node(name="b")
    peer, forger, owner = Agent(), Agent(), Agent()
    short = owner.did.rsplit(":", 1)[1]
    announced = peer.call(
        b,
        "POST",
        "/api/v1/peers/announce",
        {"did": peer.did, "http_url": "http://127.0.0.1:9"},
    )
    assert announced.status == 200, announced.body
    body = {
        "repo": f"{short}/demo",
        "ref_name": "refs/heads/main",
        "new_sha": SHA,
        "node_did": peer.did,
    }

    answer = forger.call(b, "POST", "/api/v1/sync/notify", body)

    assert answer.status == 403
    events = request("GET", b.url + "/api/v1/events/ref-updates").json()["events"]
    assert [(e["from_peer"], e["verified"]) for e in events] == [(forger.did, False)]
    assert query(b, "SELECT count(*) FROM sync_queue") == [(0,)]


def test_signed_announce_cannot_be_overridden_unsigned(start_node: StartNode) -> None:
    """An unsigned announce cannot move a peer that announced itself signed."""
    b = start_node(name="b")
    peer = Agent()
    signed = peer.call(
        b,
        "POST",
        "/api/v1/peers/announce",
        {"did": peer.did, "http_url": "http://127.0.0.1:9"},
    )

    hijack = request(
        "POST",
        b.url + "/api/v1/peers/announce",
        json.dumps({"did": peer.did, "http_url": "http://127.0.0.1:10"}).encode(),
        {"Content-Type": "application/json"},
    )

    assert signed.status == 200
    assert hijack.status == 403
    assert request("GET", b.url + "/api/v1/peers").json()["peers"][0]["http_url"] == (
        "http://127.0.0.1:9"
    )


def test_hanging_peer_does_not_stall_the_worker(
    start_node: StartNode, tmp_path: Path, hanging: HangingServer
) -> None:
    """A peer that never answers costs one bounded attempt; others proceed."""
    a, b = start_pair(
        start_node,
        GITLAWB_SYNC_GIT_TIMEOUT_SECS="3",
        GITLAWB_PEER_TIMEOUT_SECS="1",
        GITLAWB_SYNC_CONCURRENCY="1",
    )
    stuck, owner = Agent(), Agent()
    short = owner.did.rsplit(":", 1)[1]
    announced = stuck.call(
        b, "POST", "/api/v1/peers/announce", {"did": stuck.did, "http_url": hanging.url}
    )
    assert announced.status == 200

    # The ping is bounded by the peer timeout.
    started = time.monotonic()
    ping = request("GET", f"{b.url}/api/v1/peers/{stuck.did}/ping").json()
    assert ping["reachable"] is False
    assert time.monotonic() - started < 5

    # A sync from the hanging peer is queued first, then a real push at A.
    notify = {
        "repo": f"{short}/stuck",
        "ref_name": "refs/heads/main",
        "new_sha": SHA,
        "node_did": stuck.did,
    }
    assert stuck.call(b, "POST", "/api/v1/sync/notify", notify).status == 200
    create_repo(a, owner, "fine")
    served_by_a = push_commits(a, owner, "fine", tmp_path / "work")

    wait_for(
        lambda: refs(f"{b.url}/{short}/fine.git") == served_by_a,
        timeout=30,
        what="B to mirror A's push despite the hanging peer",
    )
    rows = wait_for(
        lambda: query(
            b,
            "SELECT status, attempts, last_error FROM sync_queue"
            " WHERE repo_slug = %s AND last_error IS NOT NULL",
            (f"{short}/stuck",),
        ),
        what="the hanging sync to be given up for now",
    )
    assert rows[0][0] == "pending"
    assert "3" in rows[0][2] or "timed out" in rows[0][2].lower()
    assert not (b.data_dir / "repos" / short / "stuck.git").exists()


def test_announce_of_itself_is_refused(start_node: StartNode) -> None:
    """A node refuses an announce of its own DID or its own URL."""
    b = start_node(name="b")
    stranger = Agent()

    own_did = request(
        "POST",
        b.url + "/api/v1/peers/announce",
        json.dumps({"did": node_did(b), "http_url": "http://127.0.0.1:9"}).encode(),
        {"Content-Type": "application/json"},
    )
    own_url = stranger.call(
        b, "POST", "/api/v1/peers/announce", {"did": stranger.did, "http_url": b.url}
    )

    assert own_did.status == 400
    assert own_url.status == 400
    assert request("GET", b.url + "/api/v1/peers").json()["count"] == 0


def test_signed_announce_must_name_its_signer(start_node: StartNode) -> None:
    """A signed announce for another DID is forbidden."""
    b = start_node(name="b")
    signer, other = Agent(), Agent()

    answer = signer.call(
        b,
        "POST",
        "/api/v1/peers/announce",
        {"did": other.did, "http_url": "http://127.0.0.1:9"},
    )

    assert answer.status == 403
    assert answer.json()["error"] == "forbidden"


def test_unsigned_announce_refused_when_signatures_required(
    start_node: StartNode,
) -> None:
    """With GITLAWB_REQUIRE_SIGNED_PEER_WRITES an unsigned announce is a 401."""
    b = start_node(name="b", GITLAWB_REQUIRE_SIGNED_PEER_WRITES="true")

    answer = request(
        "POST",
        b.url + "/api/v1/peers/announce",
        json.dumps({"did": Agent().did, "http_url": "http://127.0.0.1:9"}).encode(),
        {"Content-Type": "application/json"},
    )

    assert answer.status == 401
    assert answer.json()["error"] == "not_an_agent"


def test_replica_registration_needs_a_known_peer(
    start_node: StartNode, tmp_path: Path
) -> None:
    """Only a known peer node may register itself as a replica."""
    a = start_node(name="a")
    owner, stranger = Agent(), Agent()
    short = owner.did.rsplit(":", 1)[1]
    create_repo(a, owner, "demo")
    target = f"/api/v1/repos/{short}/demo/replicas"

    answer = stranger.call(a, "PUT", target, {"url": "http://127.0.0.1:9"})

    assert answer.status == 403
    assert request("GET", a.url + target).json()["replica_count"] == 0
