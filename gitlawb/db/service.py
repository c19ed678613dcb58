"""
The database as a child service: the embedded cluster (when no URL is given),
the connection retries, the migrations, and the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from gitlawb.db.embedded import EmbeddedPostgres, EmbeddedPostgresError
from gitlawb.db.migrations import MigrationError, MigrationRunner
from gitlawb.db.pool import Database, open_connection

T = TypeVar("T")


class DatabaseUnavailable(Exception):
    """
    The database is not usable yet (still connecting) or any more (stopping).
    """


def describe_dsn(url: str) -> str:
    """
    A database URL as it may appear in a log: host, port and database, never
    the user's password.
    """
    parsed = psycopg2.extensions.parse_dsn(url)
    host = parsed.get("host", "localhost")
    port = parsed.get("port", "5432")
    return f"PostgreSQL at {host}:{port}/{parsed.get('dbname', '')}"


class DatabaseService(Service):
    """
    Owns the node's database.

    C{startService} returns at once; the connection is made in the background,
    retried with exponential backoff while the server cannot be reached.  Until
    it succeeds L{database} raises L{DatabaseUnavailable} (the API answers
    503 C{db_unavailable}).  Schema errors are fatal: C{on_fatal} is called
    with a message and the node stops.

    @ivar ready: fires with the L{Database} once migrations have run.
    """

    name = "database"
    log = Logger()

    def __init__(
        self,
        reactor: IReactorCore,
        database_url: str | None,
        embedded: EmbeddedPostgres | None,
        pool_size: int,
        retry_initial: float,
        retry_max: float,
        on_fatal: Callable[[str], None],
    ) -> None:
        self._reactor = reactor
        self._url = database_url
        self._embedded = embedded
        self._pool_size = pool_size
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._on_fatal = on_fatal
        self._database: Database | None = None
        self._starting: Deferred[None] | None = None
        self._embedded_started = False
        self._waiters: list[Deferred[Database]] = []
        self._migrating: txpostgres.Connection | None = None
        self._embedded_thread: Deferred[bool] | None = None

    @property
    def description(self) -> str:
        if self._embedded is not None:
            return self._embedded.display
        assert self._url is not None
        return describe_dsn(self._url)

    @property
    def database(self) -> Database:
        """
        The ready pool.

        @raise DatabaseUnavailable: before migrations have run, or once the
            service is stopping.
        """
        if self._database is None or self._database.closed:
            raise DatabaseUnavailable()
        return self._database

    @property
    def is_ready(self) -> bool:
        return self._database is not None and not self._database.closed

    def when_ready(self) -> Deferred[Database]:
        """
        @return: a Deferred that fires with the L{Database} once it is ready
            (at once when it already is).  Cancelling it is harmless.
        """
        if self._database is not None:
            return succeed(self._database)
        waiter: Deferred[Database] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    async def _start(self) -> None:
        # The embedded cluster first: initdb on the first run, then pg_ctl.
        if self._embedded is not None:
            # initdb and pg_ctl cannot be interrupted: a stop waits for this
            # thread (see _stop), so start-up waits on a follower of it that
            # can be cancelled without losing sight of the thread.
            self._embedded_thread = self._in_thread(self._embedded.ensure_started)
            try:
                self._embedded_started = await _follow(self._embedded_thread)
            except EmbeddedPostgresError as e:
                self._on_fatal(f"the embedded PostgreSQL could not start: {e}")
                return
            dsn = self._embedded.dsn
        else:
            assert self._url is not None
            dsn = self._url

        # Connect, migrate and open the pool, retrying while the server is away.
        delay = self._retry_initial
        while True:
            try:
                database = await self._connect_and_migrate(dsn)
                break
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                if not self.running:
                    # The node is stopping: the failure is the closed connection.
                    return
                self.log.warn(
                    "database unavailable ({error}); retrying in {delay:.1f}s",
                    error=str(e).strip().splitlines()[0] if str(e).strip() else e,
                    delay=delay,
                )
                await deferLater(self._clock, delay)
                delay = min(delay * 2, self._retry_max)

        self._database = database
        self.log.info("database ready: {db}", db=self.description)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(database)

    async def _connect_and_migrate(self, dsn: str) -> Database:
        connection = await open_connection(self._reactor, dsn)
        self._migrating = connection
        try:
            applied = await MigrationRunner(connection).run()
        finally:
            self._migrating = None
            connection.close()
        if applied:
            self.log.info("schema migrated, applied={count}", count=len(applied))
        database = Database(self._reactor, dsn, self._pool_size)
        await database.open()
        return database

    def _in_thread(self, work: Callable[[], T]) -> Deferred[T]:
        # The embedded cluster's pg_ctl calls block for up to a second.
        reactor: Any = self._reactor
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    @property
    def _clock(self) -> IReactorTime:
        return self._reactor  # type: ignore[return-value]

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or not self.running:
            # Stopped before the database was ready; txpostgres reports a
            # cancelled query with its own exception, not CancelledError.
            self.log.info("database start-up abandoned: the node is stopping")
            return
        if failure.check(MigrationError):
            self._on_fatal(f"database schema: {failure.value}")
            return
        self.log.failure("database start-up failed", failure)
        self._on_fatal(f"database start-up failed: {failure.value}")

    def stopService(self) -> Deferred[None]:
        """
        Stop retrying, close the pool once its queries are done, and stop the
        embedded cluster.

        @return: a Deferred that fires when all of that is done.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        if self._migrating is not None:
            # Waiting for the migration lock (another node migrating) or in the
            # middle of a migration: closing the session releases the lock and
            # rolls the migration back.
            self._migrating.close()
        for waiter in list(self._waiters):
            waiter.cancel()
        if self._database is not None:
            await self._database.close()
        if self._embedded is not None:
            if self._embedded_thread is not None:
                # Stopping while initdb or pg_ctl start still runs would leave
                # a server behind the node: let it finish, then stop it.
                await self._embedded_thread
            try:
                await self._in_thread(self._embedded.stop)
                self.log.info("embedded PostgreSQL stopped")
            except EmbeddedPostgresError as e:
                self.log.error("embedded PostgreSQL did not stop: {error}", error=e)


def _follow(source: Deferred[T]) -> Deferred[T]:
    """
    A Deferred that fires with C{source}'s result; cancelling it leaves
    C{source} alone, and C{source} then fires with C{None} once it is done.
    """
    follower: Deferred[T] = Deferred()

    def settle(result: T | Failure) -> None:
        if follower.called:
            return
        if isinstance(result, Failure):
            follower.errback(result)
        else:
            follower.callback(result)

    source.addBoth(settle)
    return follower
