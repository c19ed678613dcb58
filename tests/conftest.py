"""
Fixtures for the whole suite.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import (
    NodeProcess,
    free_port,
    fresh_database,
    node_env,
    server_reachable,
)

# The embedded PostgreSQL wheel asks platformdirs for a runtime directory.
os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def pg_server() -> None:
    """
    The test PostgreSQL server must answer: the integration tests are real.
    """
    if not server_reachable():
        pytest.fail(
            "the test PostgreSQL server is not reachable "
            "(set GITLAWB_TEST_DATABASE_URL, or start the local cluster)"
        )


@pytest.fixture
def database_url(pg_server: None) -> Iterator[str]:
    """
    The URL of a new, empty database on the test server, dropped afterwards.
    """
    with fresh_database() as url:
        yield url


@pytest.fixture
def start_node(tmp_path: Path, pg_server: None) -> Iterator[Callable[..., NodeProcess]]:
    """
    Start real nodes (C{twistd -n gitlawb}); each is stopped at the end.

    Call it as C{start_node(name="a", database_url=..., **GITLAWB_settings)};
    without a C{database_url} each node gets a fresh database on the test
    server.  Pass C{embedded=True} to use the embedded PostgreSQL instead.
    """
    started: list[NodeProcess] = []
    databases = []

    def start(
        name: str = "node",
        database_url: str | None = None,
        embedded: bool = False,
        wait: float = 30.0,
        **settings: str,
    ) -> NodeProcess:
        if database_url is None and not embedded:
            manager = fresh_database()
            database_url = manager.__enter__()
            databases.append(manager)
        data_dir = tmp_path / name
        data_dir.mkdir(exist_ok=True)
        port = int(settings.pop("GITLAWB_PORT", free_port()))
        env = node_env(data_dir, port, database_url, **settings)
        node = NodeProcess(data_dir, port, env, tmp_path / f"{name}.log")
        started.append(node)
        return node.start(wait=wait)

    yield start

    for node in started:
        if node.process is not None and node.process.poll() is None:
            node.stop()
    for manager in databases:
        manager.__exit__(None, None, None)
