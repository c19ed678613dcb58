"""
The node's connection pool, over txpostgres connections.

txpostgres gives non-blocking psycopg2 connections driven by the reactor; this
pool adds what a long-running server needs on top: a connection broken by a
database restart is replaced on its next use instead of failing forever, the
number of connections in use is known (for the metrics), and closing waits for
queries in flight.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeAlias, TypeVar

import psycopg2
import psycopg2.extras
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

log = Logger()

P = ParamSpec("P")
T = TypeVar("T")

# A psycopg2 DictRow: readable by position and by column name.
Row: TypeAlias = Any

# Errors that mean the connection (not the statement) is broken.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """
    The keyword arguments every connection of the node is opened with: rows
    readable by name and position, and a bounded connect time.
    """
    return {
        "dsn": dsn,
        "connect_timeout": 10,
        "cursor_factory": psycopg2.extras.DictCursor,
        "application_name": "gitlawb-node",
    }


async def open_connection(reactor: IReactorCore, dsn: str) -> txpostgres.Connection:
    """
    Open one txpostgres connection.

    Cancelling the wait (the node stopping while a server does not answer)
    closes the half-open connection and raises C{CancelledError}.

    @raise psycopg2.OperationalError: when the server cannot be reached.
    """
    connection = txpostgres.Connection(reactor=reactor)
    connecting = connection.connect(**connect_kwargs(dsn))

    # txpostgres cancels by asking psycopg2 to cancel a query, which psycopg2
    # refuses while the connection is still being made; closing it is the way
    # to give up.  The attempt then fails with ConnectionDone, which nobody is
    # waiting for any more.
    def give_up(waiting: Deferred[None]) -> None:
        waiting.errback(CancelledError())
        connection.close()

    def settle(result: object) -> None:
        if waiting.called:
            return
        if isinstance(result, Failure):
            waiting.errback(result)
        else:
            waiting.callback(None)

    waiting: Deferred[None] = Deferred(give_up)
    connecting.addBoth(settle)
    await waiting
    return connection


class Database:
    """
    A fixed-size pool of connections to one PostgreSQL database.

    Every method is a coroutine; a query runs on one connection, a
    L{transaction} runs all of its statements on one connection between
    BEGIN and COMMIT (ROLLBACK when the function raises).
    """

    def __init__(self, reactor: IReactorCore, dsn: str, size: int) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self.size = size
        self._idle: list[txpostgres.Connection] = []
        self._semaphore = DeferredSemaphore(size)
        self.in_use = 0
        self.closed = False

    async def open(self) -> None:
        """
        Open every connection of the pool.

        @raise psycopg2.OperationalError: when the server cannot be reached
            (connections already opened are closed again).
        """
        try:
            for _ in range(self.size):
                self._idle.append(await open_connection(self._reactor, self._dsn))
        except BaseException:
            for connection in self._idle:
                connection.close()
            self._idle.clear()
            raise

    async def query(self, sql: str, params: Any = None) -> list[Row]:
        """
        Run one statement and return its rows.
        """
        rows: list[Row] = await self._with_connection(lambda c: c.runQuery(sql, params))
        return rows

    async def execute(self, sql: str, params: Any = None) -> None:
        """
        Run one statement that returns no rows.
        """
        await self._with_connection(lambda c: c.runOperation(sql, params))

    async def transaction(
        self,
        interaction: Callable[Concatenate[Any, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """
        Run C{interaction(cursor, *args, **kwargs)} inside one transaction.

        @return: what the interaction returned, once the transaction committed.
        @raise Exception: what the interaction raised, after the rollback.
        """

        def run(cursor: Any) -> Deferred[T]:
            return Deferred.fromCoroutine(
                _as_coroutine(interaction(cursor, *args, **kwargs))
            )

        return await self._with_connection(lambda c: c.runInteraction(run))  # type: ignore[no-any-return]

    async def _with_connection(self, use: Callable[[Any], Deferred[Any]]) -> Any:
        if self.closed:
            raise psycopg2.InterfaceError("the database pool is closed")
        await self._semaphore.acquire()
        connection = self._idle.pop()
        self.in_use += 1
        try:
            if not _usable(connection):
                connection = await self._replace(connection)
                if not _usable(connection):
                    raise psycopg2.OperationalError("the database is unreachable")
            try:
                return await use(connection)
            except CONNECTION_ERRORS:
                # Put a fresh connection in its place so the next user does not
                # inherit a dead one; the caller still sees this failure.
                connection = await self._replace(connection)
                raise
        finally:
            self.in_use -= 1
            self._idle.append(connection)
            self._semaphore.release()

    async def _replace(
        self, connection: txpostgres.Connection
    ) -> txpostgres.Connection:
        try:
            if _usable(connection):
                connection.close()
        except Exception:
            pass
        log.warn("database connection lost; reconnecting")
        try:
            return await open_connection(self._reactor, self._dsn)
        except CONNECTION_ERRORS:
            # Keep a closed one in the slot: the next use retries the connect.
            return txpostgres.Connection(reactor=self._reactor)

    async def close(self) -> None:
        """
        Wait for queries in flight, then close every connection.
        """
        self.closed = True
        for _ in range(self.size):
            await self._semaphore.acquire()
        for connection in self._idle:
            if _usable(connection):
                connection.close()
        self._idle.clear()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _usable(connection: txpostgres.Connection) -> bool:
    """
    Whether a pooled connection is connected and open.  A slot whose
    reconnect failed holds a txpostgres connection that never connected: it
    has no psycopg2 connection to ask.
    """
    raw = getattr(connection, "_connection", None)
    return raw is not None and not raw.closed
