"""MigrationRunner against a real PostgreSQL: the test server and the embedded one."""

from __future__ import annotations

import functools
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

import psycopg2
import pytest
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from txpostgres import txpostgres

from gitlawb.db.embedded import EmbeddedPostgres
from gitlawb.db.migrations import (
    MIGRATION_LOCK_KEY,
    Migration,
    MigrationError,
    MigrationRunner,
    load_migrations,
)
from gitlawb.db.pool import open_connection
from tests.support import fresh_database

pytestmark = pytest.mark.integration

ALPHA = Migration(1, "create_alpha", "CREATE TABLE alpha (id integer PRIMARY KEY)")
BETA = Migration(2, "create_beta", "CREATE TABLE beta (id integer PRIMARY KEY)")
GAMMA = Migration(3, "create_gamma", "CREATE TABLE gamma (id integer PRIMARY KEY)")

# Creates its table and writes to it, then fails on a table that does not exist:
# a failure half-way through, after statements that did work.
BETA_FAILING = Migration(
    2,
    "create_beta",
    "CREATE TABLE beta (id integer PRIMARY KEY);"
    " INSERT INTO beta VALUES (1);"
    " INSERT INTO no_such_table VALUES (1)",
)

# Its statements all work, but its schema_migrations row is then refused: the
# migration must go with the row that failed.
BETA_UNRECORDABLE = Migration(
    2,
    "create_beta",
    "CREATE TABLE beta (id integer PRIMARY KEY);"
    " ALTER TABLE schema_migrations ADD CONSTRAINT before_beta CHECK (version < 2)",
)

# Holds the migration lock long enough that a second runner must wait for it.
ALPHA_SLOW = Migration(
    1,
    "create_alpha",
    "SELECT pg_sleep(0.5); CREATE TABLE alpha (id integer PRIMARY KEY)",
)


def deferred_test(
    test: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[Any], Deferred[None]]:
    """Run an C{async def} test method as a Deferred-returning trial test."""

    @functools.wraps(test)
    def run(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(test(self))

    return run


class MigrationRunnerTests:
    """
    The runner's behaviour on one kind of PostgreSQL; a subclass says which by
    providing L{new_database}.
    """

    # A run that waits for a lock nobody releases fails instead of hanging.
    timeout = 30

    # Provided by trial's TestCase in the concrete classes.
    addCleanup: Callable[..., None]
    dsn: str

    def new_database(self) -> str:
        """Return the DSN of a new, empty database that is dropped afterwards."""
        raise NotImplementedError

    def setUp(self) -> None:
        self.dsn = self.new_database()

    async def connect(self) -> txpostgres.Connection:
        """Open a txpostgres connection that is closed after the test."""
        connection = await open_connection(reactor, self.dsn)
        self.addCleanup(connection.close)
        return connection

    async def runner(
        self, migrations: list[Migration] | None = None
    ) -> MigrationRunner:
        """A runner on a connection of its own."""
        return MigrationRunner(await self.connect(), migrations)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement on a separate blocking connection, for checks."""
        connection = psycopg2.connect(self.dsn, connect_timeout=10)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def recorded(self) -> list[tuple[int, str]]:
        """The versions and names in schema_migrations, in order."""
        return [
            (version, name)
            for version, name in self.query(
                "SELECT version, name FROM schema_migrations ORDER BY version"
            )
        ]

    def table_exists(self, name: str) -> bool:
        return bool(self.query("SELECT to_regclass(%s) IS NOT NULL", (name,))[0][0])

    def lock_is_free(self) -> bool:
        """Whether another session can take the migration lock at once."""
        rows = self.query(
            "SELECT pg_try_advisory_lock(%s), pg_advisory_unlock(%s)",
            (MIGRATION_LOCK_KEY, MIGRATION_LOCK_KEY),
        )
        return bool(rows[0][0])

    # The tests.

    @deferred_test
    async def test_fresh_database(self) -> None:
        """On an empty database every shipped migration is applied and recorded."""
        shipped = load_migrations()
        runner = await self.runner()

        applied = await runner.run()

        assert applied == shipped
        assert self.recorded() == [(m.version, m.name) for m in shipped]
        assert self.table_exists("agents")
        assert self.table_exists("repos")

    @deferred_test
    async def test_second_run_applies_nothing(self) -> None:
        """A second run on a migrated database applies nothing and changes nothing."""
        await (await self.runner()).run()
        before = self.query("SELECT version, name, applied_at FROM schema_migrations")

        applied = await (await self.runner()).run()

        assert applied == []
        after = self.query("SELECT version, name, applied_at FROM schema_migrations")
        assert after == before

    @deferred_test
    async def test_only_pending_applied(self) -> None:
        """A later build's new migration is applied alone, after the recorded ones."""
        await (await self.runner([ALPHA])).run()

        applied = await (await self.runner([ALPHA, BETA])).run()

        assert applied == [BETA]
        assert self.recorded() == [(1, "create_alpha"), (2, "create_beta")]

    @deferred_test
    async def test_two_runners_together(self) -> None:
        """Two runners started together both succeed, each migration applied once."""
        shipped = load_migrations()
        first, second = await self.runner(), await self.runner()

        results = await gatherResults(
            [
                Deferred.fromCoroutine(first.run()),
                Deferred.fromCoroutine(second.run()),
            ]
        )

        applied = sorted(m.version for result in results for m in result)
        assert applied == [m.version for m in shipped]
        assert self.recorded() == [(m.version, m.name) for m in shipped]

    @deferred_test
    async def test_second_runner_waits_for_the_lock(self) -> None:
        """A runner that starts while another migrates waits, then finds nothing."""
        first, second = await self.runner([ALPHA_SLOW]), await self.runner([ALPHA_SLOW])

        results = await gatherResults(
            [
                Deferred.fromCoroutine(first.run()),
                Deferred.fromCoroutine(second.run()),
            ]
        )

        assert sorted(len(result) for result in results) == [0, 1]
        assert self.recorded() == [(1, "create_alpha")]

    @deferred_test
    async def test_name_mismatch_refused(self) -> None:
        """A recorded version with another name than the code's stops the run."""
        await (await self.runner([ALPHA])).run()
        renamed = Migration(1, "create_first", ALPHA.sql)

        with pytest.raises(MigrationError) as caught:
            await (await self.runner([renamed, BETA])).run()

        message = str(caught.value)
        assert "migration 1 is recorded as 'create_alpha'" in message
        assert "'create_first'" in message
        assert "another build" in message
        assert self.recorded() == [(1, "create_alpha")]
        assert not self.table_exists("beta")

    @deferred_test
    async def test_shipped_name_mismatch_refused(self) -> None:
        """A database whose migration 1 has another name refuses the shipped code."""
        shipped = load_migrations()
        await (await self.runner([Migration(1, "something_else", "SELECT 1")])).run()

        with pytest.raises(MigrationError) as caught:
            await (await self.runner()).run()

        assert f"calls it {shipped[0].name!r}" in str(caught.value)
        assert not self.table_exists("agents")

    @deferred_test
    async def test_newer_database_refused(self) -> None:
        """A database at a version the code does not know yet stops the run."""
        await (await self.runner([ALPHA, BETA])).run()

        with pytest.raises(MigrationError) as caught:
            await (await self.runner([ALPHA])).run()

        message = str(caught.value)
        assert "schema version 2, newer than this code knows (up to 1)" in message
        assert "run a newer gitlawb node" in message
        assert self.recorded() == [(1, "create_alpha"), (2, "create_beta")]

    @deferred_test
    async def test_newer_than_shipped_refused(self) -> None:
        """The shipped migrations refuse a database one version ahead of them."""
        await (await self.runner()).run()
        future = load_migrations()[-1].version + 1
        self.query(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_later')",
            (future,),
        )

        with pytest.raises(MigrationError) as caught:
            await (await self.runner()).run()

        assert f"schema version {future}, newer than" in str(caught.value)

    @deferred_test
    async def test_unknown_older_version_refused(self) -> None:
        """A recorded version below the code's newest that the code lacks is refused."""
        await (await self.runner([ALPHA, BETA])).run()

        with pytest.raises(MigrationError) as caught:
            await (await self.runner([BETA, GAMMA])).run()

        assert "records migration 1 ('create_alpha')" in str(caught.value)
        assert not self.table_exists("gamma")

    @deferred_test
    async def test_failure_half_way_leaves_no_trace(self) -> None:
        """A migration failing half-way leaves nothing of itself; earlier ones stay."""
        runner = await self.runner([ALPHA, BETA_FAILING, GAMMA])

        with pytest.raises(psycopg2.errors.UndefinedTable):
            await runner.run()

        assert self.recorded() == [(1, "create_alpha")]
        assert self.table_exists("alpha")
        assert not self.table_exists("beta")
        assert not self.table_exists("gamma")

    @deferred_test
    async def test_unrecorded_migration_undone(self) -> None:
        """A migration whose own row cannot be recorded is undone with the row."""
        runner = await self.runner([ALPHA, BETA_UNRECORDABLE])

        with pytest.raises(psycopg2.errors.CheckViolation):
            await runner.run()

        assert self.recorded() == [(1, "create_alpha")]
        assert not self.table_exists("beta")
        assert self.query(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'before_beta'"
        ) == [(0,)]

    @deferred_test
    async def test_syntax_error_leaves_no_trace(self) -> None:
        """A migration with a syntax error is not recorded and creates nothing."""
        broken = Migration(2, "create_beta", "CREATE TABLE beta (id integer); SELEC 1")
        runner = await self.runner([ALPHA, broken])

        with pytest.raises(psycopg2.errors.SyntaxError):
            await runner.run()

        assert self.recorded() == [(1, "create_alpha")]
        assert not self.table_exists("beta")

    @deferred_test
    async def test_rerun_after_fix(self) -> None:
        """After a failed migration is fixed, the next run applies it and the rest."""
        with pytest.raises(psycopg2.Error):
            await (await self.runner([ALPHA, BETA_FAILING])).run()

        applied = await (await self.runner([ALPHA, BETA, GAMMA])).run()

        assert applied == [BETA, GAMMA]
        assert self.recorded() == [
            (1, "create_alpha"),
            (2, "create_beta"),
            (3, "create_gamma"),
        ]

    @deferred_test
    async def test_lock_released_after_failure(self) -> None:
        """A failed run releases the migration lock while its session lives on."""
        runner = await self.runner([ALPHA, BETA_FAILING])

        with pytest.raises(psycopg2.Error):
            await runner.run()

        assert self.lock_is_free()

    @deferred_test
    async def test_lock_released_after_refusal(self) -> None:
        """A run refused for a newer database releases the migration lock."""
        await (await self.runner([ALPHA, BETA])).run()
        runner = await self.runner([ALPHA])

        with pytest.raises(MigrationError):
            await runner.run()

        assert self.lock_is_free()

    @deferred_test
    async def test_status(self) -> None:
        """status() lists each migration with its applied time, None when pending."""
        await (await self.runner([ALPHA])).run()
        runner = await self.runner([ALPHA, BETA])

        status = await runner.status()

        assert [(s.version, s.name) for s in status] == [
            (1, "create_alpha"),
            (2, "create_beta"),
        ]
        assert status[0].applied_at is not None
        assert status[1].applied_at is None

    @deferred_test
    async def test_status_of_empty_database(self) -> None:
        """status() on a database never migrated reports every migration pending."""
        runner = await self.runner()

        status = await runner.status()

        assert [s.applied_at for s in status] == [None] * len(load_migrations())
        assert not self.table_exists("schema_migrations")


@pytest.mark.usefixtures("pg_server")
class ServerMigrationTests(MigrationRunnerTests, TestCase):
    """The runner on the test PostgreSQL server at GITLAWB_TEST_DATABASE_URL."""

    def new_database(self) -> str:
        manager = fresh_database()
        url = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)
        return url


class EmbeddedMigrationTests(MigrationRunnerTests, TestCase):
    """The runner on an embedded cluster, one per class, a database per test."""

    cluster: ClassVar[EmbeddedPostgres]
    cluster_dir: ClassVar[Path]

    @classmethod
    def setUpClass(cls) -> None:
        cls.cluster_dir = Path(tempfile.mkdtemp(prefix="gitlawb-migrations-"))
        cls.cluster = EmbeddedPostgres(cls.cluster_dir / "postgres")
        cls.cluster.ensure_started()

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            cls.cluster.stop()
        finally:
            shutil.rmtree(cls.cluster_dir, ignore_errors=True)

    def new_database(self) -> str:
        name = "migrations_" + uuid.uuid4().hex[:12]
        admin = psycopg2.connect(self.cluster.dsn, connect_timeout=10)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        admin.close()

        def drop() -> None:
            admin = psycopg2.connect(self.cluster.dsn, connect_timeout=10)
            admin.autocommit = True
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()

        self.addCleanup(drop)
        return self.cluster.dsn.replace("dbname=postgres", f"dbname={name}")


class OpenConnectionTests(TestCase):
    """open_connection, which the runner's and the pool's connections come from."""

    timeout = 30

    def silent_server(self) -> socket.socket:
        """A listener that accepts connections and never answers them."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        return listener

    @deferred_test
    async def test_unreachable_server(self) -> None:
        """A port nobody listens on fails the attempt with OperationalError."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

        with pytest.raises(psycopg2.OperationalError):
            await open_connection(reactor, f"postgresql://postgres@127.0.0.1:{port}/x")

    @deferred_test
    async def test_cancel_while_server_silent(self) -> None:
        """Cancelling an attempt the server never answers fails it and hangs up."""
        listener = self.silent_server()
        port = listener.getsockname()[1]
        url = f"postgresql://postgres@127.0.0.1:{port}/x"
        connecting = Deferred.fromCoroutine(open_connection(reactor, url))
        await deferLater(reactor, 0.2, lambda: None)

        connecting.cancel()

        with pytest.raises(CancelledError):
            await connecting
        accepted, _ = listener.accept()
        accepted.settimeout(5)
        with accepted:
            while accepted.recv(1024):
                pass
