"""The C{gitlawb migrations} console script on real databases."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psycopg2
import pytest

from gitlawb.db.migrations import load_migrations
from tests.support import NodeProcess, free_port, node_env, request

pytestmark = pytest.mark.integration

#: The console script installed beside the interpreter running the tests.
SCRIPT = Path(sys.executable).parent / "gitlawb"


def run_cli(
    *args: str, cwd: str = "/", **settings: str
) -> subprocess.CompletedProcess[str]:
    """Run the console script with only the given GITLAWB_*/DATABASE_URL set."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GITLAWB_") and key != "DATABASE_URL"
    }
    env.update(settings)
    return subprocess.run(
        [str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def listing(output: str) -> list[tuple[int, str, str]]:
    """The version, name and state of each row after the header line."""
    lines = output.splitlines()
    assert lines[0].split() == ["version", "name", "applied"]
    rows = []
    for line in lines[1:]:
        version, name, state = line.split(None, 2)
        rows.append((int(version), name, state))
    return rows


def execute(url: str, sql: str, params: object = None) -> None:
    """Run one statement on the database at C{url}, committed at once."""
    connection = psycopg2.connect(url, connect_timeout=10)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
    connection.close()


@pytest.fixture
def data_root() -> Iterator[Path]:
    """
    A directory for embedded clusters outside pytest's own temporary root: as
    root the cluster runs as another user, who must be able to reach it, and
    every new pytest session takes that access back from pytest's root.
    """
    root = Path(tempfile.mkdtemp(prefix="gitlawb-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def embedded_node(data_root: Path, tmp_path: Path) -> Iterator[NodeProcess]:
    """A node on its embedded cluster, not started yet; stopped at the end."""
    data_dir = data_root / "node"
    data_dir.mkdir()
    port = free_port()
    node = NodeProcess(
        data_dir, port, node_env(data_dir, port, None), tmp_path / "node.log"
    )
    yield node
    if node.process is not None and node.process.poll() is None:
        node.stop()


def migrate_with_node(
    start_node: Callable[..., NodeProcess], **options: object
) -> NodeProcess:
    """Start a node (which migrates its database) and stop it again."""
    node = start_node(**options)
    node.stop()
    return node


def test_script_installed() -> None:
    """The gitlawb console script is installed beside the interpreter."""
    assert SCRIPT.exists()


def test_fresh_server_database_all_pending(database_url: str) -> None:
    """On a new server database every migration is listed as pending."""
    result = run_cli("migrations", DATABASE_URL=database_url)

    assert result.returncode == 0, result.stderr
    assert listing(result.stdout) == [
        (m.version, m.name, "pending") for m in load_migrations()
    ]


def test_server_database_after_node(
    database_url: str, start_node: Callable[..., NodeProcess]
) -> None:
    """After a node has migrated the database, each migration shows when it was."""
    migrate_with_node(start_node, database_url=database_url)

    result = run_cli("migrations", DATABASE_URL=database_url)

    assert result.returncode == 0, result.stderr
    rows = listing(result.stdout)
    assert [(v, n) for v, n, _ in rows] == [
        (m.version, m.name) for m in load_migrations()
    ]
    for _, _, state in rows:
        assert datetime.fromisoformat(state).tzinfo is not None


def test_newer_version_listed(
    database_url: str, start_node: Callable[..., NodeProcess]
) -> None:
    """A version the code does not know is listed and marked as such."""
    migrate_with_node(start_node, database_url=database_url)
    future = load_migrations()[-1].version + 1
    execute(
        database_url,
        "INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_later')",
        (future,),
    )

    result = run_cli("migrations", DATABASE_URL=database_url)

    assert result.returncode == 0, result.stderr
    version, name, state = listing(result.stdout)[-1]
    assert (version, name) == (future, "from_later")
    assert state.endswith("(unknown to this code)")


def test_name_mismatch_listed(
    database_url: str, start_node: Callable[..., NodeProcess]
) -> None:
    """A migration recorded under another name is listed with both names."""
    migrate_with_node(start_node, database_url=database_url)
    first = load_migrations()[0]
    execute(
        database_url,
        "UPDATE schema_migrations SET name = 'renamed' WHERE version = %s",
        (first.version,),
    )

    result = run_cli("migrations", DATABASE_URL=database_url)

    assert result.returncode == 0, result.stderr
    assert "(recorded as 'renamed': mismatch)" in listing(result.stdout)[0][2]


def test_unreachable_database() -> None:
    """A database that cannot be reached gives exit status 1 and says so."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/gitlawb"

    result = run_cli("migrations", DATABASE_URL=url)

    assert result.returncode == 1
    assert result.stderr.startswith("gitlawb: cannot reach the database:")
    assert result.stdout == ""


def test_bad_setting() -> None:
    """A setting the node cannot use gives exit status 2 and one line naming it."""
    result = run_cli("migrations", DATABASE_URL="mysql://db/gitlawb")

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "gitlawb: DATABASE_URL='<hidden>' is not valid: a postgresql://user@host:port"
        "/dbname URL, or empty for the embedded database"
    ]


def test_no_command() -> None:
    """Without a command the script prints its usage and exits 2."""
    result = run_cli()

    assert result.returncode == 2
    assert "migrations" in result.stderr


def test_embedded_fresh(data_root: Path) -> None:
    """Without DATABASE_URL a new embedded cluster lists every migration pending."""
    data_dir = data_root / "data"

    result = run_cli("migrations", GITLAWB_DATA_DIR=str(data_dir))

    assert result.returncode == 0, result.stderr
    assert listing(result.stdout) == [
        (m.version, m.name, "pending") for m in load_migrations()
    ]


def test_embedded_relative_data_dir(data_root: Path) -> None:
    """A relative GITLAWB_DATA_DIR (README's default is one) works from its cwd."""
    result = run_cli("migrations", cwd=str(data_root), GITLAWB_DATA_DIR="data")

    assert result.returncode == 0, result.stderr
    assert (data_root / "data" / "postgres" / "PG_VERSION").is_file()


def test_embedded_stopped_afterwards(data_root: Path) -> None:
    """The embedded cluster the script started is stopped when it is done."""
    data_dir = data_root / "data"

    run_cli("migrations", GITLAWB_DATA_DIR=str(data_dir))

    assert not (data_dir / "postgres" / "postmaster.pid").exists()


def test_embedded_after_node(embedded_node: NodeProcess) -> None:
    """After a node ran on its embedded cluster, each migration shows its time."""
    embedded_node.start()
    embedded_node.stop()

    result = run_cli("migrations", GITLAWB_DATA_DIR=str(embedded_node.data_dir))

    assert result.returncode == 0, result.stderr
    rows = listing(result.stdout)
    assert [(v, n) for v, n, _ in rows] == [
        (m.version, m.name) for m in load_migrations()
    ]
    assert all(datetime.fromisoformat(state) for _, _, state in rows)
    assert not (embedded_node.data_dir / "postgres" / "postmaster.pid").exists()


def test_embedded_while_node_runs(embedded_node: NodeProcess) -> None:
    """Run beside a live node, the script leaves the node's cluster running."""
    embedded_node.start()

    result = run_cli("migrations", GITLAWB_DATA_DIR=str(embedded_node.data_dir))

    assert result.returncode == 0, result.stderr
    assert "pending" not in result.stdout
    assert request("GET", embedded_node.url + "/ready").status == 200
