"""
The real C{gl} 0.7.1 command line against real nodes (C{twistd -n gitlawb}).

Every command runs as the client ships, in the closed environment of
L{gl_env}: C{HOME} and C{GITLAWB_NODE} point at the test's own user and node,
every other host goes to a dead loopback proxy.  Each test asserts that the
command exits 0 and prints this node's own data (DIDs, names, ids, version),
not just that it ran.  Pushes go through the real C{git-remote-gitlawb}.
"""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.interop.glclient import NPM_MISSING_REASON, GlUser, gl_binaries
from tests.support import NodeProcess, free_port, request

pytestmark = pytest.mark.interop

StartNode = Callable[..., NodeProcess]

#: No client command may take longer: a hang fails the test.
TIMEOUT = 120


# -- helpers -----------------------------------------------------------------


def node_info(node: NodeProcess) -> dict[str, Any]:
    """
    The node's C{GET /} document.
    """
    info: dict[str, Any] = request("GET", node.url + "/").json()
    return info


def api(node: NodeProcess, path: str) -> Any:
    """
    An unsigned API read, which must answer 200.
    """
    answer = request("GET", node.url + path)
    assert answer.status == 200, answer.body
    return answer.json()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def new_user(tmp_path: Path, node: NodeProcess, name: str = "alice") -> GlUser:
    """
    A user with a fresh identity (C{gl identity new}), not yet registered.
    """
    user = GlUser(tmp_path / f"home-{name}", node)
    user.home.mkdir()
    output = user.gl("identity", "new")
    match = re.search(r"DID:\s+(did:key:z6Mk\w+)", output)
    assert match, output
    user.did = match.group(1)
    return user


def push_commits(user: GlUser, repo: str, work: Path, subjects: list[str]) -> str:
    """
    Commit one file per subject in C{work}, tag the last commit C{v1}, and
    push branch C{main} and the tag with C{git-remote-gitlawb}.

    @return: the commit C{main} then points at.
    """
    if not work.exists():
        user.run("git", "init", "-q", "-b", "main", str(work))
    for number, subject in enumerate(subjects):
        (work / f"file-{number}.txt").write_text(f"{subject}\n")
        user.run("git", "add", ".", cwd=work)
        user.run("git", "commit", "-q", "-m", subject, cwd=work)
    user.run("git", "tag", "-f", "v1", cwd=work)
    remote = f"gitlawb://{user.did}/{repo}"
    user.run("git", "push", "-q", remote, "main", "--tags", cwd=work)
    return user.run("git", "rev-parse", "HEAD", cwd=work).stdout.strip()


# -- fixtures ----------------------------------------------------------------


@pytest.fixture
def binaries() -> tuple[Path, Path]:
    """
    The real client binaries; the test skips when they cannot be had.
    """
    found = gl_binaries()
    if found is None:
        pytest.skip(NPM_MISSING_REASON)
    return found


@pytest.fixture
def node(start_node: StartNode, binaries: tuple[Path, Path]) -> NodeProcess:
    return start_node(name="a")


@pytest.fixture
def user(tmp_path: Path, node: NodeProcess) -> GlUser:
    """
    A user registered on the node with C{gl register}.
    """
    alice = new_user(tmp_path, node)
    alice.gl("register")
    return alice


@pytest.fixture
def repo(user: GlUser) -> dict[str, Any]:
    """
    The repository C{demo}, created with C{gl repo create}; the node's view of
    it.
    """
    user.gl("repo", "create", "demo", "-d", "interop demo")
    found: dict[str, Any] = api(user.node, f"/api/v1/repos/{user.short}/demo")
    return found


@dataclass
class Pair:
    a: NodeProcess
    b: NodeProcess
    a_did: str
    b_did: str


@pytest.fixture
def pair(start_node: StartNode, binaries: tuple[Path, Path]) -> Pair:
    """
    Node A, and node B with A as its bootstrap peer, each knowing the other.
    """
    a = start_node(name="a")
    b = start_node(name="b", GITLAWB_BOOTSTRAP_PEERS=a.url)
    a_did, b_did = node_info(a)["did"], node_info(b)["did"]

    def peers(node: NodeProcess) -> set[str]:
        return {p["did"] for p in api(node, "/api/v1/peers")["peers"]}

    wait_for(lambda: b_did in peers(a), "A to know B")
    wait_for(lambda: a_did in peers(b), "B to know A")
    return Pair(a, b, a_did, b_did)


@pytest.fixture
def hook_target() -> str:
    """
    A loopback URL where nothing listens, for webhooks that are never meant
    to be delivered.
    """
    return f"http://127.0.0.1:{free_port()}/hook"


# -- identity, registration ---------------------------------------------------


def test_identity_new_writes_a_private_key(tmp_path: Path, node: NodeProcess) -> None:
    """C{gl identity new} prints a did:key and writes the key file, mode 0600."""
    alice = new_user(tmp_path, node)

    key = alice.home / ".gitlawb" / "identity.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert alice.did.startswith("did:key:z6Mk")


def test_register(tmp_path: Path, node: NodeProcess) -> None:
    """C{gl register} registers the DID with this node and saves its UCAN."""
    alice = new_user(tmp_path, node)

    output = alice.gl("register")

    assert f"Registering agent with {node.url}" in output
    assert f"DID:          {alice.did}" in output
    assert "Trust score:  0.05" in output
    assert "Bootstrap UCAN saved" in output
    saved = json.loads((alice.home / ".gitlawb" / "ucan.json").read_text())
    assert saved["did"] == alice.did
    assert saved["node"] == node.url
    token = json.loads(saved["ucan"])
    assert token["payload"]["iss"] == node_info(node)["did"]
    assert token["payload"]["aud"] == alice.did
    assert api(node, f"/api/v1/agents/{alice.did}")["did"] == alice.did


def test_whoami(user: GlUser, repo: dict[str, Any]) -> None:
    """C{gl whoami} shows the DID as registered here, with its repository count."""
    output = user.gl("whoami")

    assert f"DID:        {user.did}" in output
    assert f"Short:      {user.short}" in output
    assert "Registered: yes" in output
    assert "Trust:      0.05" in output
    assert "Repos:      1" in output


def test_agent_list(user: GlUser) -> None:
    """C{gl agent list} lists the registered agent with its trust score."""
    output = user.gl("agent", "list")

    assert f"Agents on {user.node.url} (1 total)" in output
    assert f"{user.short[:16]}…  trust=0.05" in output
    assert "git:push, git:fetch, issue:create, pr:open" in output


# -- repositories -------------------------------------------------------------


def test_repo_create(user: GlUser) -> None:
    """C{gl repo create} creates the repository on this node and prints its URLs."""
    output = user.gl("repo", "create", "demo", "-d", "interop demo")

    assert "✓ Created repository: demo" in output
    assert f"Clone: git clone gitlawb://{user.did}/demo" in output
    assert f"HTTP:  {user.node.url}/{user.short}/demo.git" in output
    assert "Desc:  interop demo" in output
    created = api(user.node, f"/api/v1/repos/{user.short}/demo")
    assert created["owner_did"] == user.did
    assert created["description"] == "interop demo"


def test_repo_list(user: GlUser, repo: dict[str, Any]) -> None:
    """C{gl repo list} shows the user's repository, public, with its date."""
    output = user.gl("repo", "list")

    assert f"Repositories ({user.short}...)" in output
    row = f"{'demo':<26}public    {repo['updated_at'][:10]}  interop demo"
    assert row in output


def test_repo_info(user: GlUser, repo: dict[str, Any]) -> None:
    """C{gl repo info} shows the node's record of the repository."""
    output = user.gl("repo", "info", "demo")

    assert f"Repository: {user.short}/demo" in output
    assert f"ID:         {repo['id']}" in output
    assert f"Owner DID:  {user.did}" in output
    assert "Public:     true" in output
    assert "Branch:     main" in output
    assert f"HTTP URL:   {user.node.url}/{user.short}/demo.git" in output
    assert f"Updated:    {repo['updated_at']}" in output
    assert "Replicas:   0" in output


def test_repo_fork(tmp_path: Path, user: GlUser, repo: dict[str, Any]) -> None:
    """C{gl repo fork} forks another agent's repository into the caller's."""
    bob = new_user(tmp_path, user.node, "bob")
    bob.gl("register")

    output = bob.gl("repo", "fork", f"{user.short}/demo")

    assert f"Forked {user.short}/demo → demo" in output
    assert f"Clone: git clone gitlawb://{bob.did}/demo" in output
    fork = api(user.node, f"/api/v1/repos/{bob.short}/demo")
    assert fork["owner_did"] == bob.did
    assert fork["forked_from"]


def test_repo_commits(tmp_path: Path, user: GlUser, repo: dict[str, Any]) -> None:
    """C{gl repo commits} lists the pushed commits, newest first."""
    head = push_commits(user, "demo", tmp_path / "work", ["first", "second"])

    output = user.gl("repo", "commits", "demo")

    assert f"Commits on main ({user.short}/demo)" in output
    rows = [line.split() for line in output.splitlines() if line.startswith("  ")]
    assert [r[2] for r in rows] == ["second", "first"]
    assert rows[0][0] == head[:10]
    assert all(r[-2:] == ["(gitlawb", "interop)"] for r in rows)


# -- node ----------------------------------------------------------------------


def test_node_status(user: GlUser, repo: dict[str, Any]) -> None:
    """C{gl node status} shows this node's DID, version and repositories."""
    info = node_info(user.node)

    output = user.gl("node", "status")

    assert f"DID:      {info['did']}" in output
    assert f"Node URL: {user.node.url}" in output
    assert f"Version:  {info['version']}" in output
    assert "Network:  alpha" in output
    assert "Peers:    0 known (0 reachable)" in output
    assert "Count:    1 repos" in output
    assert "- demo  (public)" in output


def test_status(tmp_path: Path, user: GlUser, repo: dict[str, Any]) -> None:
    """C{gl status} in a checkout shows the identity, trust, repository and node."""
    push_commits(user, "demo", tmp_path / "work", ["first"])
    clone = tmp_path / "clone"
    user.run("git", "clone", "-q", f"gitlawb://{user.did}/demo", str(clone))

    output = user.run("gl", "status", cwd=clone).stdout

    assert f"identity  {user.did[:40]}" in output
    assert "trust     0.10" in output  # 0.05, plus 0.05 for one push
    assert re.search(rf"repo      {user.short[:26]}\S*/demo\n", output), output
    assert "PRs       no open pull requests" in output
    assert f"node      {user.node.url} (v{node_info(user.node)['version']})" in output


def test_doctor(user: GlUser) -> None:
    """C{gl doctor} passes the identity, registration and node checks offline."""
    info = node_info(user.node)

    output = user.gl("doctor")

    assert f"✓  identity                  {user.did[:40]}" in output
    assert f"✓  registration              registered with {user.node.url}" in output
    assert (
        f"✓  node                      {user.node.url} — v{info['version']}" in output
    )
    assert "✓  git-remote-gitlawb        found in PATH" in output
    # The release check went to the dead proxy, not to GitHub.
    assert "(offline — could not check)" in output
    assert "gl is v0.7.1" not in output  # no "node is newer" warning


# -- certificates and webhooks --------------------------------------------------


def test_cert_show_verifies_a_push_certificate(
    tmp_path: Path, user: GlUser, repo: dict[str, Any]
) -> None:
    """C{gl cert show --verify} with a short ID verifies this node's signature."""
    head = push_commits(user, "demo", tmp_path / "work", ["first"])
    listed = user.gl("cert", "list", "demo")
    short_id = next(
        line.split()[0] for line in listed.splitlines() if "refs/heads/main" in line
    )

    output = user.gl("cert", "show", "demo", short_id, "--verify")

    assert re.search(rf"Ref Certificate: {short_id}[0-9a-f-]{{28}}\n", output)
    assert "Ref:       refs/heads/main" in output
    assert f"New SHA:   {head}" in output
    assert f"Pusher:    {user.did}" in output
    assert f"Node DID:  {node_info(user.node)['did']}" in output
    assert "VALID — Ed25519 signature verified" in output
    assert "Issuing node DID matches the node being queried." in output


def test_webhook_create_and_list(
    user: GlUser, repo: dict[str, Any], hook_target: str
) -> None:
    """C{gl webhook create} makes a hook that C{gl webhook list} shows."""
    created = user.gl(
        "webhook",
        "create",
        "demo",
        "--url",
        hook_target,
        "--events",
        "push",
        "--secret",
        "s3cret",
    )
    hook_id = re.search(r"ID:\s+([0-9a-f-]{36})", created)

    listed = user.gl("webhook", "list", "demo")

    assert hook_id, created
    assert "Secret: set (HMAC-SHA256 signing enabled)" in created
    assert "Webhooks for demo (1 total)" in listed
    assert f"[active] {hook_id.group(1)}" in listed
    assert f"URL:    {hook_target}" in listed
    assert "Events: push" in listed


def test_webhook_delete(user: GlUser, repo: dict[str, Any], hook_target: str) -> None:
    """C{gl webhook delete} removes the hook from this node."""
    created = user.gl("webhook", "create", "demo", "--url", hook_target)
    match = re.search(r"ID:\s+([0-9a-f-]{36})", created)
    assert match, created

    output = user.gl("webhook", "delete", "demo", match.group(1))

    assert f"✓ Webhook {match.group(1)} deleted" in output
    assert "No webhooks for demo" in user.gl("webhook", "list", "demo")


# -- two nodes: peers, sync, replicas -------------------------------------------


def test_peer_list(tmp_path: Path, pair: Pair) -> None:
    """C{gl peer list} on B shows A, its bootstrap peer, as reachable."""
    alice = new_user(tmp_path, pair.b)

    output = alice.gl("peer", "list")

    assert pair.a.url in output
    assert pair.a_did in output
    assert "✓" in output


def test_peer_ping(tmp_path: Path, pair: Pair) -> None:
    """C{gl peer ping} on B finds A reachable at its URL."""
    alice = new_user(tmp_path, pair.b)

    output = alice.gl("peer", "ping", pair.a_did)

    assert f"Peer: {pair.a_did}" in output
    assert f"URL:    {pair.a.url}" in output
    assert "Status: reachable" in output


def test_sync_status(tmp_path: Path, pair: Pair) -> None:
    """C{gl sync status} on B shows its counts and its one known peer."""
    alice = new_user(tmp_path, pair.b)
    alice.gl("register")

    output = alice.gl("sync", "status")

    assert "agents: 1" in output
    assert "Known peers: 1" in output
    assert pair.a.url in output


def test_sync_trigger(tmp_path: Path, pair: Pair) -> None:
    """C{gl sync trigger} on B queues A's repositories."""
    alice = new_user(tmp_path, pair.a)
    alice.gl("register")
    alice.gl("repo", "create", "demo")
    push_commits(alice, "demo", tmp_path / "work", ["first"])
    carol = new_user(tmp_path, pair.b, "carol")

    output = carol.gl("sync", "trigger")

    assert "✓ sync triggered" in output
    assert "peers reached:   1" in output
    assert "repos enqueued:  1" in output


def test_repo_replicas(tmp_path: Path, pair: Pair) -> None:
    """C{gl repo replicas} on A lists B once B has mirrored a push."""
    alice = new_user(tmp_path, pair.a)
    alice.gl("register")
    alice.gl("repo", "create", "demo")
    push_commits(alice, "demo", tmp_path / "work", ["first"])
    path = f"/api/v1/repos/{alice.short}/demo/replicas"
    wait_for(lambda: api(pair.a, path)["replica_count"], "B to mirror the push")

    output = alice.gl("repo", "replicas", f"{alice.short}/demo")

    assert f"{alice.short}/demo: 1 replicas" in output
    assert f"{pair.b_did}  →  {pair.b.url}" in output


def test_node_status_shows_ref_updates(tmp_path: Path, pair: Pair) -> None:
    """C{gl node status} on B lists the ref-update it received from A."""
    alice = new_user(tmp_path, pair.a)
    alice.gl("register")
    alice.gl("repo", "create", "demo")
    push_commits(alice, "demo", tmp_path / "work", ["first"])
    events = "/api/v1/events/ref-updates?limit=5"
    wait_for(lambda: api(pair.b, events)["count"] >= 2, "B to receive the push")
    watcher = new_user(tmp_path, pair.b, "watcher")

    output = watcher.gl("node", "status")

    assert re.search(rf"{alice.short}/demo\s+refs/heads/main", output), output
    assert "Peers:    1 known (1 reachable)" in output
