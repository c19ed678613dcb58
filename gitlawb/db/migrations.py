"""
Versioned schema migrations.

Each migration is a file C{NNNN_name.sql} in C{gitlawb/db/schema/}.  They
are applied in order of version, each one and its C{schema_migrations} row in
one transaction, while a session advisory lock is held on one dedicated
connection, so that two nodes starting together on one empty database apply
each migration exactly once.  Applied migrations are never edited: a change
to the schema is a new file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()

# An arbitrary constant: the advisory lock that serialises migration runs.
MIGRATION_LOCK_KEY = 0x6769746C617762  # "gitlawb"

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """
    The database's schema does not match the code: start-up must stop.  The
    message says what is wrong and what to do.
    """


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class MigrationStatus:
    version: int
    name: str
    applied_at: Any | None


class Cursor(Protocol):
    """
    The part of a txpostgres cursor the runner uses.
    """

    def execute(self, query: str, params: Any = None) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """
    The part of a txpostgres connection the runner uses.
    """

    def runQuery(self, query: str, params: Any = None) -> Any: ...

    def runOperation(self, query: str, params: Any = None) -> Any: ...

    def runInteraction(self, interaction: Any, *args: Any) -> Any: ...


def load_migrations(package: str = "gitlawb.db.schema") -> list[Migration]:
    """
    Read the migration files shipped in C{package}, sorted by version.

    @raise MigrationError: when two files share a version, or a name is not of
        the form C{NNNN_name.sql}.
    """
    found: dict[int, Migration] = {}
    for entry in resources.files(package).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migration files have version {version}")
        found[version] = Migration(version, match.group(2), entry.read_text("utf-8"))
    return [found[v] for v in sorted(found)]


def check_recorded(
    migrations: Sequence[Migration], recorded: Sequence[tuple[int, str]]
) -> list[Migration]:
    """
    Compare what the database records with what the code knows.

    @return: the migrations still to apply, in order.
    @raise MigrationError: when a recorded version has another name than the
        code's, or the database holds versions the code does not know.
    """
    known = {m.version: m for m in migrations}
    newest = max(known, default=0)
    for version, name in recorded:
        migration = known.get(version)
        if migration is None:
            if version > newest:
                raise MigrationError(
                    f"the database is at schema version {version}, newer than "
                    f"this code knows (up to {newest}): run a newer gitlawb "
                    f"node, or restore a backup made for this version"
                )
            raise MigrationError(
                f"the database records migration {version} ({name!r}) that this "
                f"code does not have: it was made by another build of gitlawb"
            )
        if migration.name != name:
            raise MigrationError(
                f"migration {version} is recorded as {name!r} but this code "
                f"calls it {migration.name!r}: the database was migrated by "
                f"another build; use that build, or restore a matching backup"
            )
    done = {version for version, _ in recorded}
    return [m for m in migrations if m.version not in done]


class MigrationRunner:
    """
    Applies pending migrations over one dedicated connection.

    @ivar connection: a connected txpostgres connection used for nothing else
        while the runner works (the advisory lock belongs to its session).
    """

    def __init__(
        self, connection: Connection, migrations: Sequence[Migration] | None = None
    ) -> None:
        self.connection = connection
        self.migrations = list(load_migrations() if migrations is None else migrations)

    async def run(self) -> list[Migration]:
        """
        Take the migration lock, apply what is pending, release the lock.

        @return: the migrations this call applied (empty when another runner
            applied them first, or nothing was pending).
        @raise MigrationError: when the database does not match the code.
        """
        await self.connection.runOperation(
            "SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)
        )
        try:
            await self.connection.runOperation(_CREATE_TABLE)
            recorded = await self._recorded()
            pending = check_recorded(self.migrations, recorded)
            for migration in pending:
                await self.connection.runInteraction(
                    lambda cursor, m=migration: Deferred.fromCoroutine(
                        self._apply(cursor, m)
                    )
                )
                log.info(
                    "migration applied version={version} name={name}",
                    version=migration.version,
                    name=migration.name,
                )
            return pending
        finally:
            await self.connection.runOperation(
                "SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,)
            )

    async def status(self) -> list[MigrationStatus]:
        """
        Each migration the code knows, with the time it was applied or
        C{None} when pending.
        """
        rows = await self.connection.runQuery(
            "SELECT to_regclass('schema_migrations') IS NOT NULL"
        )
        applied: dict[int, Any] = {}
        if rows[0][0]:
            for version, applied_at in await self.connection.runQuery(
                "SELECT version, applied_at FROM schema_migrations"
            ):
                applied[version] = applied_at
        return [
            MigrationStatus(m.version, m.name, applied.get(m.version))
            for m in self.migrations
        ]

    async def _recorded(self) -> list[tuple[int, str]]:
        rows = await self.connection.runQuery(
            "SELECT version, name FROM schema_migrations ORDER BY version"
        )
        return [(int(version), str(name)) for version, name in rows]

    @staticmethod
    async def _apply(cursor: Cursor, migration: Migration) -> None:
        await cursor.execute(migration.sql)
        await cursor.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
