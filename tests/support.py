"""
What the integration tests share: a private database on the test PostgreSQL
server, a real node process started with C{twistd -n gitlawb}, and signed HTTP
requests made with the same code the clients' requests are checked with.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from gitlawb.identity.keys import NodeKey
from gitlawb.identity.signatures import sign_request

#: The PostgreSQL server the tests use; CI starts the machine's own cluster.
TEST_SERVER_URL = os.environ.get(
    "GITLAWB_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def server_reachable() -> bool:
    try:
        psycopg2.connect(TEST_SERVER_URL, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


@contextmanager
def fresh_database() -> Iterator[str]:
    """
    Create an empty database on the test server, yield its URL, drop it.
    """
    name = "gitlawb_test_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(TEST_SERVER_URL, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        base = TEST_SERVER_URL.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_p2p_port() -> int:
    """
    A port free on 127.0.0.1 for both TCP and UDP (the swarm listens on both).
    """
    while True:
        tcp = socket.socket()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            udp.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            tcp.close()
            udp.close()


#: The environment the integration tests run git in: the caller's, without
#: its C{GIT_*} settings or any user or system configuration, with a fixed
#: identity and C messages.
GIT_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "LC_ALL": "C",
}


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> Response:
    """
    One HTTP request with the standard library; error statuses are returned,
    not raised.
    """
    req = urllib.request.Request(url, data=body, method=method)
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return Response(answer.status, dict(answer.headers), answer.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, dict(e.headers), e.read())


@dataclass
class Agent:
    """
    A client identity that signs its requests as C{gl} does.
    """

    key: NodeKey = field(default_factory=NodeKey.generate)

    @property
    def did(self) -> str:
        return self.key.did

    def signed_headers(self, method: str, target: str, body: bytes) -> dict[str, str]:
        return sign_request(self.key, method, target, body, int(time.time()))

    def call(
        self,
        node: NodeProcess,
        method: str,
        target: str,
        value: Any = None,
        *,
        raw: bytes | None = None,
    ) -> Response:
        body = (
            raw
            if raw is not None
            else (b"" if value is None else json.dumps(value).encode())
        )
        headers = self.signed_headers(method, target, body)
        if body:
            headers["Content-Type"] = "application/json"
        return request(method, node.url + target, body if body else None, headers)


@dataclass
class NodeProcess:
    """
    A node started as C{twistd -n gitlawb} in a subprocess.
    """

    data_dir: Path
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 30.0) -> NodeProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "gitlawb",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir.parent,
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"node exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if request("GET", self.url + "/ready", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node not ready within {wait}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        """
        SIGTERM the node and wait for it; return its exit status.
        """
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def node_env(
    data_dir: Path, port: int, database_url: str | None, **settings: str
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GITLAWB_") and key != "DATABASE_URL"
    }
    env.update(
        GITLAWB_DATA_DIR=str(data_dir),
        GITLAWB_HOST="127.0.0.1",
        GITLAWB_PORT=str(port),
        GITLAWB_P2P_PORT="0",
        GITLAWB_DB_RETRY_INITIAL_SECS="0.2",
        GITLAWB_DB_RETRY_MAX_SECS="1",
        GITLAWB_SHUTDOWN_GRACE_SECS="10",
        GITLAWB_ALLOW_PRIVATE_PEERS="true",
        GITLAWB_ALLOW_PRIVATE_WEBHOOKS="true",
    )
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(settings)
    return env


@contextmanager
def node_without_rate_limits(tmp: Path) -> Iterator[NodeProcess]:
    """
    Start a node in C{tmp} on a fresh database with the signer and create
    rate limits off; stop it and drop the database on exit.
    """
    with fresh_database() as url:
        data = tmp / "node"
        data.mkdir()
        port = free_port()
        env = node_env(
            data,
            port,
            url,
            GITLAWB_SIGNER_RATE_LIMIT="0",
            GITLAWB_CREATE_RATE_LIMIT="0",
        )
        process = NodeProcess(data, port, env, tmp / "node.log").start()
        try:
            yield process
        finally:
            process.stop()
