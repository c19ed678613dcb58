"""
The C{gitlawb} console script: operator commands beside C{twistd -n gitlawb}.

    gitlawb migrations    each schema migration: version, name, applied or pending
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gitlawb.config import ConfigError, Settings


def _migrations(settings: Settings) -> int:
    from gitlawb.db.embedded import EmbeddedPostgres, EmbeddedPostgresError

    embedded = None
    started = False
    dsn = settings.database_url
    if dsn is None:
        embedded = EmbeddedPostgres(settings.embedded_database_path)
        try:
            started = embedded.ensure_started()
        except EmbeddedPostgresError as e:
            print(f"gitlawb: {e}", file=sys.stderr)
            return 1
        dsn = embedded.dsn
    try:
        status = _print_migrations(dsn)
    finally:
        if embedded is not None and started:
            try:
                embedded.stop()
            except EmbeddedPostgresError as e:
                print(f"gitlawb: {e}", file=sys.stderr)
                status = 1
    return status


def _print_migrations(dsn: str) -> int:
    """
    Print each migration the code knows and its state in the database at
    C{dsn}, then any version the database has that the code does not.

    @return: the exit status.
    """
    import psycopg2

    from gitlawb.db.migrations import load_migrations

    try:
        connection = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.OperationalError as e:
        print(f"gitlawb: cannot reach the database: {e}".strip(), file=sys.stderr)
        return 1
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        applied: dict[int, tuple[str, object]] = {}
        exists = cursor.fetchone()
        if exists is not None and exists[0]:
            cursor.execute("SELECT version, name, applied_at FROM schema_migrations")
            applied = {v: (n, at) for v, n, at in cursor.fetchall()}
    connection.close()
    known = load_migrations()
    print(f"{'version':<8} {'name':<32} applied")
    for migration in known:
        if migration.version in applied:
            name, at = applied[migration.version]
            state = str(at)
            if name != migration.name:
                state += f"  (recorded as {name!r}: mismatch)"
        else:
            state = "pending"
        print(f"{migration.version:<8} {migration.name:<32} {state}")
    for version in sorted(set(applied) - {m.version for m in known}):
        name, at = applied[version]
        print(f"{version:<8} {name:<32} {at}  (unknown to this code)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gitlawb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrations", help="list schema migrations and their state")
    arguments = parser.parse_args(argv)
    try:
        settings = Settings.load()
    except ConfigError as e:
        print(f"gitlawb: {e}", file=sys.stderr)
        return 2
    if arguments.command == "migrations":
        return _migrations(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
