"""
Graceful shutdown of a real node (C{twistd -n gitlawb}): what SIGTERM and
SIGINT do to a clone, a push, new and idle connections, and to webhook
deliveries, peer notifies and syncs that hang, and how long the node then
takes to exit.

Every figure is measured from the signal to the exit of the process.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_git_http import (
    Repo,
    add_commits,
    create_repo,
    git,
    git_popen,
    query,
    wait_for,
    work_repo,
)
from tests.integration.test_webhooks import HANG, Receiver
from tests.signing_proxy import SigningProxy
from tests.support import Agent, NodeProcess

pytestmark = pytest.mark.integration

StartNode = Callable[..., NodeProcess]
RecordProperty = Callable[[str, object], None]


# -- helpers -------------------------------------------------------------------


class ThrottledProxy:
    """
    A loopback TCP proxy to C{127.0.0.1:<port>} that passes what the client
    sends at once and what the server answers at C{rate} bytes a second: a
    client that reads slowly.
    """

    def __init__(self, port: int, rate: float) -> None:
        self.upstream = port
        self.rate = rate
        self.down = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            self.sockets += [client, server]
            threading.Thread(
                target=self._pump, args=(client, server, False), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, True), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            except OSError:
                break
            if slow:
                # No credit for time spent waiting: the pace holds from the
                # first byte of the pack to the last.
                self.down += len(data)
                time.sleep(len(data) / self.rate)
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class SilentServer:
    """
    A loopback HTTP server that reads each request's head and never answers;
    C{heads} holds the request lines received.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.heads: list[str] = []
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        received = b""
        while b"\r\n" not in received:
            try:
                data = connection.recv(4096)
            except OSError:
                return
            if not data:
                return
            received += data
        self.heads.append(received.split(b"\r\n", 1)[0].decode("latin-1"))

    def received(self, fragment: str) -> bool:
        return any(fragment in head for head in self.heads)

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def receivers() -> Iterator[Callable[[list[int]], Receiver]]:
    made: list[Receiver] = []

    def make(answers: list[int]) -> Receiver:
        receiver = Receiver(answers)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


def signal_and_time(
    node: NodeProcess, signum: int = signal.SIGTERM, timeout: float = 60.0
) -> tuple[int, float]:
    """
    Send C{signum} to the node and wait for it to exit.

    @return: its exit status and the seconds from the signal to the exit.
    """
    assert node.process is not None
    started = time.monotonic()
    node.signal(signum)
    status = node.process.wait(timeout)
    return status, time.monotonic() - started


def assert_stopped_cleanly(node: NodeProcess, status: int) -> None:
    """
    The node exited through SIGTERM (twistd re-raises it), said it stopped
    cleanly and logged no traceback.
    """
    log = node.log()
    assert status == -signal.SIGTERM, log
    assert "stopped cleanly in" in log, log
    assert "Traceback" not in log, log


def gated_hook(repo: Repo, gate: Path) -> Path:
    """
    Install a pre-receive hook that waits while C{gate} exists.

    @return: the file the hook creates when it starts.
    """
    started = gate.with_name(gate.name + ".started")
    hook = repo.path / "hooks" / "pre-receive"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text(
        "#!/bin/sh\ncat >/dev/null\n"
        f'[ -e "{gate}" ] || exit 0\n'
        f'touch "{started}"\n'
        f'while [ -e "{gate}" ]; do sleep 0.05; done\n'
    )
    hook.chmod(0o755)
    return started


def connection_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def announce_peer(node: NodeProcess, url: str) -> Agent:
    """
    Register a peer at C{url} on the node with a signed announce.
    """
    peer = Agent()
    answer = peer.call(
        node, "POST", "/api/v1/peers/announce", {"did": peer.did, "http_url": url}
    )
    assert answer.status == 200, answer
    return peer


def create_hook(repo: Repo, url: str) -> None:
    target = f"/api/v1/repos/{repo.short}/{repo.name}/hooks"
    answer = repo.owner.call(repo.node, "POST", target, {"url": url})
    assert answer.status == 201, answer


def push(repo: Repo, work: Path) -> None:
    with SigningProxy(repo.node.url, repo.owner.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)


def large_repository(node: NodeProcess, tmp_path: Path, megabytes: int) -> Repo:
    """
    A hosted repository holding C{megabytes} MB of random (incompressible)
    blobs, written straight into the bare repository on disk.
    """
    repo = create_repo(node, Agent(), "large")
    work = work_repo(tmp_path / "large-work")
    blob = 2 * 1024 * 1024
    stream = [b"commit refs/heads/main\n", b"committer T <t@e> 1700000000 +0000\n"]
    stream.append(b"data 6\nlarge\n")
    for index in range(megabytes // 2):
        stream.append(f"M 644 inline blob-{index}.bin\n".encode())
        stream.append(b"data %d\n" % blob + os.urandom(blob) + b"\n")
    git("fast-import", "--quiet", cwd=work, input=b"".join(stream))
    git("push", "-q", str(repo.path), "main", cwd=work)
    return repo


# -- nothing in flight ------------------------------------------------------


def test_idle_node_exits_within_a_second(
    start_node: StartNode, record_property: RecordProperty
) -> None:
    """With nothing in flight the node exits within 1 s of SIGTERM."""
    node = start_node()

    status, elapsed = signal_and_time(node)

    record_property("idle_exit_secs", round(elapsed, 3))
    print(f"idle exit: {elapsed:.3f}s")
    assert_stopped_cleanly(node, status)
    assert elapsed < 1.0


def test_idle_keep_alive_connection_does_not_delay_exit(
    start_node: StartNode, record_property: RecordProperty
) -> None:
    """A kept-alive connection with no request in progress is closed at once
    and does not delay the exit."""
    node = start_node()
    client = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    client.sendall(b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n")
    answer = b""
    while b'"ok"}' not in answer:
        answer += client.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")

    status, elapsed = signal_and_time(node)

    record_property("keep_alive_exit_secs", round(elapsed, 3))
    print(f"exit with an idle keep-alive connection: {elapsed:.3f}s")
    assert_stopped_cleanly(node, status)
    assert elapsed < 1.0
    assert client.recv(4096) == b""
    client.close()


# -- a clone and a push in flight ------------------------------------------------


def test_clone_of_a_large_repository_completes(
    start_node: StartNode, tmp_path: Path, record_property: RecordProperty
) -> None:
    """SIGTERM while a slow client clones 64 MB: the clone completes whole and
    the node exits once it is done, within the grace."""
    grace = 15.0
    node = start_node(GITLAWB_SHUTDOWN_GRACE_SECS=str(grace))
    repo = large_repository(node, tmp_path, 64)
    tip = repo.refs()["refs/heads/main"]
    proxy = ThrottledProxy(node.port, rate=12 * 1024 * 1024)
    target = tmp_path / "clone"
    try:
        cloning = git_popen(
            "clone", "-q", f"http://127.0.0.1:{proxy.port}{repo.route}", str(target)
        )
        wait_for(lambda: proxy.down > 4 * 1024 * 1024, what="the pack to flow")
        signalled = time.monotonic()
        node.signal(signal.SIGTERM)
        _, stderr = cloning.communicate(timeout=60)
        cloned = time.monotonic()
        assert node.process is not None
        status = node.process.wait(60)
        exited = time.monotonic()
    finally:
        proxy.close()

    record_property("clone_after_signal_secs", round(cloned - signalled, 3))
    record_property("clone_exit_secs", round(exited - signalled, 3))
    print(f"clone done {cloned - signalled:.2f}s, exit {exited - signalled:.2f}s")
    assert cloning.returncode == 0, stderr
    assert cloned - signalled > 1.0, "the clone was not in flight at the signal"
    assert git("rev-parse", "HEAD", cwd=target).stdout.strip() == tip
    git("fsck", "--no-progress", cwd=target)
    assert exited - signalled < grace
    assert_stopped_cleanly(node, status)


def test_push_in_flight_completes(start_node: StartNode, tmp_path: Path) -> None:
    """SIGTERM while git runs a push: the push completes, is recorded, and the
    repository passes git fsck."""
    node = start_node(GITLAWB_SHUTDOWN_GRACE_SECS="15")
    agent = Agent()
    repo = create_repo(node, agent, "pushed")
    gate = tmp_path / "gate"
    gate.touch()
    started = gated_hook(repo, gate)
    work = work_repo(tmp_path / "work")
    (work / "random.bin").write_bytes(os.urandom(2_000_000))
    git("add", "random.bin", cwd=work)
    git("commit", "-q", "-m", "random", cwd=work)
    tip = git("rev-parse", "HEAD", cwd=work).stdout.strip()

    with SigningProxy(node.url, agent.key) as proxy:
        pushing = git_popen("push", repo.via(proxy), "main", cwd=work)
        wait_for(started.exists, what="the hook to start")
        node.signal(signal.SIGTERM)
        wait_for(lambda: "shutdown started" in node.log(), what="the shutdown")
        gate.unlink()
        _, stderr = pushing.communicate(timeout=60)
    assert node.process is not None
    status = node.process.wait(60)

    assert pushing.returncode == 0, stderr
    assert repo.refs() == {"refs/heads/main": tip}
    git("fsck", "--no-progress", cwd=repo.path)
    assert query(node, "SELECT ref_name, new_sha FROM push_events") == [
        ("refs/heads/main", tip)
    ]
    assert_stopped_cleanly(node, status)


def test_push_cut_at_a_tiny_grace_leaves_the_repository_unchanged(
    start_node: StartNode, tmp_path: Path, record_property: RecordProperty
) -> None:
    """With a 0.5 s grace, a push whose pre-receive hook is still running at
    the deadline is cut: the push fails and the refs stay as they were."""
    node = start_node(GITLAWB_SHUTDOWN_GRACE_SECS="0.5")
    agent = Agent()
    repo = create_repo(node, agent, "cut")
    work = work_repo(tmp_path / "work")
    add_commits(work, 2, "before")
    push(repo, work)
    before = repo.refs()
    gate = tmp_path / "gate"
    gate.touch()
    started = gated_hook(repo, gate)
    add_commits(work, 2, "after", size=100_000)

    with SigningProxy(node.url, agent.key) as proxy:
        pushing = git_popen("push", repo.via(proxy), "main", cwd=work)
        wait_for(started.exists, what="the hook to start")
        status, elapsed = signal_and_time(node)
        pushing.communicate(timeout=60)

    record_property("tiny_grace_exit_secs", round(elapsed, 3))
    print(f"exit with a push cut at 0.5 s grace: {elapsed:.2f}s")
    log = node.log()
    assert pushing.returncode != 0
    assert repo.refs() == before
    git("fsck", "--no-progress", cwd=repo.path)
    assert len(query(node, "SELECT id FROM push_events")) == 1
    assert query(node, "SELECT state FROM push_intents WHERE state = 'running'") == []
    assert status == -signal.SIGTERM, log
    assert "cut off" in log, log
    assert "Traceback" not in log, log
    assert elapsed < 0.5 + 2.0


# -- connections and signals during the drain ----------------------------------


def test_new_connection_during_the_drain_is_refused(
    start_node: StartNode, tmp_path: Path, silent: SilentServer
) -> None:
    """From the signal on, the public port refuses connections, even while the
    node still waits for a webhook delivery in flight."""
    node = start_node(
        GITLAWB_SHUTDOWN_GRACE_SECS="4", GITLAWB_WEBHOOK_TIMEOUT_SECS="60"
    )
    agent = Agent()
    repo = create_repo(node, agent, "drain")
    create_hook(repo, silent.url + "/hook")
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "a")
    push(repo, work)
    wait_for(lambda: silent.received("POST /hook"), what="the delivery to start")

    node.signal(signal.SIGTERM)
    wait_for(lambda: "shutdown started" in node.log(), what="the shutdown")
    refused = wait_for(
        lambda: connection_refused(node.port), timeout=0.5, what="a refused connect"
    )
    assert node.process is not None
    still_running = node.process.poll() is None
    node.process.wait(30)

    assert refused
    assert still_running, "the node exited before the drain could be observed"


def test_second_sigint_is_acknowledged(start_node: StartNode, tmp_path: Path) -> None:
    """A second SIGINT during the drain logs that the shutdown is already under
    way, and nothing else happens: no traceback, one clean stop."""
    node = start_node(GITLAWB_SHUTDOWN_GRACE_SECS="15")
    agent = Agent()
    repo = create_repo(node, agent, "twice")
    gate = tmp_path / "gate"
    gate.touch()
    started = gated_hook(repo, gate)
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "a")

    with SigningProxy(node.url, agent.key) as proxy:
        pushing = git_popen("push", repo.via(proxy), "main", cwd=work)
        wait_for(started.exists, what="the hook to start")
        node.signal(signal.SIGINT)
        wait_for(lambda: "shutdown started" in node.log(), what="the shutdown")
        node.signal(signal.SIGINT)
        wait_for(
            lambda: "shutdown already under way" in node.log(),
            what="the second signal to be acknowledged",
        )
        gate.unlink()
        pushing.communicate(timeout=60)
    assert node.process is not None
    status = node.process.wait(60)

    log = node.log()
    assert pushing.returncode == 0
    assert status == -signal.SIGINT, log
    assert log.count("shutdown started") == 1, log
    assert "stopped cleanly in" in log, log
    assert "Traceback" not in log, log


# -- work that never finishes ------------------------------------------------------


def test_hung_webhook_and_peer_do_not_delay_exit_past_grace(
    start_node: StartNode,
    tmp_path: Path,
    silent: SilentServer,
    record_property: RecordProperty,
) -> None:
    """A webhook receiver and a peer that accept and never answer are cut at the
    grace deadline: the node exits within grace + 2 s and says what it cut."""
    grace = 3.0
    node = start_node(
        GITLAWB_SHUTDOWN_GRACE_SECS=str(grace),
        GITLAWB_WEBHOOK_TIMEOUT_SECS="60",
        GITLAWB_WEBHOOK_CONNECT_TIMEOUT_SECS="60",
        GITLAWB_PEER_TIMEOUT_SECS="60",
    )
    announce_peer(node, silent.url)
    agent = Agent()
    repo = create_repo(node, agent, "hung")
    create_hook(repo, silent.url + "/hook")
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "a")
    push(repo, work)
    wait_for(
        lambda: (
            silent.received("POST /hook")
            and silent.received("POST /api/v1/sync/notify")
        ),
        what="the delivery and the notify to hang",
    )

    status, elapsed = signal_and_time(node)

    record_property("hung_webhook_peer_exit_secs", round(elapsed, 3))
    print(f"exit with a hung webhook and peer (grace {grace}s): {elapsed:.2f}s")
    log = node.log()
    assert elapsed < grace + 2.0, log
    assert status == -signal.SIGTERM, log
    assert "stopped in" in log and "cut off at the grace deadline" in log, log
    assert "webhooks: 1" in log, log
    assert "outbox-relay: 1" in log, log
    assert "Traceback" not in log, log


def test_nothing_left_claimed_and_nothing_lost_across_a_restart(
    start_node: StartNode,
    tmp_path: Path,
    silent: SilentServer,
    receivers: Callable[[list[int]], Receiver],
) -> None:
    """Work cut at the deadline is handed back: no sync, outbox or delivery row
    stays claimed, and the restarted node delivers the cut webhook."""
    settings = {
        "GITLAWB_SHUTDOWN_GRACE_SECS": "1",
        "GITLAWB_WEBHOOK_TIMEOUT_SECS": "60",
        "GITLAWB_PEER_TIMEOUT_SECS": "60",
        "GITLAWB_SYNC_GIT_TIMEOUT_SECS": "60",
    }
    node = start_node(**settings)
    receiver = receivers([HANG, 200])
    stuck = announce_peer(node, silent.url)
    owner = Agent()
    notify = {
        "repo": f"{owner.did.rsplit(':', 1)[1]}/stuck",
        "ref_name": "refs/heads/main",
        "new_sha": "1" * 40,
        "node_did": stuck.did,
    }
    assert stuck.call(node, "POST", "/api/v1/sync/notify", notify).status == 200
    repo = create_repo(node, Agent(), "hooked")
    create_hook(repo, receiver.url)
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "a")
    push(repo, work)
    wait_for(lambda: receiver.received, what="the delivery to hang")
    wait_for(
        lambda: query(node, "SELECT 1 FROM sync_queue WHERE status = 'running'"),
        what="the sync to be claimed",
    )

    status, _ = signal_and_time(node)
    sync_rows = query(
        node, "SELECT status, claimed_by, claimed_until, attempts FROM sync_queue"
    )
    deliveries = query(
        node, "SELECT status, claimed_until, attempts FROM webhook_deliveries"
    )
    outbox = query(node, "SELECT count(*) FROM outbox WHERE claimed_until IS NOT NULL")
    restarted = start_node(database_url=node.env["DATABASE_URL"], **settings)
    delivered = wait_for(
        lambda: query(
            restarted,
            "SELECT id::text, attempts FROM webhook_deliveries"
            " WHERE status = 'delivered'",
        ),
        what="the cut delivery to be sent again",
    )

    assert status == -signal.SIGTERM, node.log()
    assert sync_rows == [("pending", None, None, 0)]
    assert deliveries == [("pending", None, 0)]
    assert outbox == [(0,)]
    ids = [r.headers["x-gitlawb-delivery"] for r in receiver.received]
    assert ids == [delivered[0][0]] * 2
    assert delivered[0][1] == 1


def test_two_signals_at_once_stop_the_node_once(start_node: StartNode) -> None:
    """SIGINT and SIGTERM handled in one turn of the reactor (both pending
    while the process was stopped) stop the node once, with no traceback."""
    node = start_node()
    assert node.process is not None

    node.signal(signal.SIGSTOP)
    time.sleep(0.1)
    node.signal(signal.SIGINT)
    node.signal(signal.SIGTERM)
    node.signal(signal.SIGCONT)
    status = node.process.wait(30)

    log = node.log()
    assert status in (-signal.SIGINT, -signal.SIGTERM), log
    assert "shutdown already under way" in log, log
    assert log.count("shutdown started") == 1, log
    assert "stopped cleanly in" in log, log
    assert "Traceback" not in log, log
