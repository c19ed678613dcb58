"""
The repository routes' parts that need no PostgreSQL: the Repo object, the
visibility rule, query parameters, and the create-both-or-neither protocol
against a scripted database (its crash windows cannot be produced on demand
with a real one).
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg2
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from gitlawb.api.errors import ApiError
from gitlawb.api.repos import (
    RepoRow,
    _query_int,
    create_with_repository,
    find_repo,
    repo_json,
)
from gitlawb.git.store import RepositoryExists
from gitlawb.identity.keys import NodeKey

OWNER = NodeKey.from_seed(bytes(range(32)))
WHEN = datetime(2026, 12, 3, 15, 26, 0, 123456, tzinfo=UTC)


def row(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": "0d5b8a1e-6f7c-4a51-9a0b-3f0c2f1a9e11",
        "owner_did": OWNER.did,
        "name": "demo",
        "description": None,
        "is_public": True,
        "default_branch": "main",
        "star_count": 0,
        "forked_from": None,
        "origin_did": None,
        "origin_url": None,
        "created_at": WHEN,
        "updated_at": WHEN,
    }
    values.update(overrides)
    return values


def test_repo_json_is_the_protocol_object() -> None:
    """repo_json has exactly the protocol's members, clone_url from the public URL."""
    context = SimpleNamespace(public_url=lambda: "https://node.example/")

    body = repo_json(context, RepoRow.from_row(row()))  # type: ignore[arg-type]

    assert body == {
        "id": "0d5b8a1e-6f7c-4a51-9a0b-3f0c2f1a9e11",
        "name": "demo",
        "owner_did": OWNER.did,
        "description": None,
        "is_public": True,
        "default_branch": "main",
        "clone_url": f"https://node.example/{OWNER.short}/demo.git",
        "star_count": 0,
        "created_at": "2026-12-03T15:26:00.123456+00:00",
        "updated_at": "2026-12-03T15:26:00.123456+00:00",
        "forked_from": None,
    }


def test_private_repo_visible_to_its_owner_only() -> None:
    """A private row is visible to its owner, not to others or anonymous callers."""
    private = RepoRow.from_row(row(is_public=False))

    assert private.visible_to(OWNER.did)
    assert not private.visible_to(NodeKey.generate().did)
    assert not private.visible_to(None)
    assert RepoRow.from_row(row()).visible_to(None)


class Untouchable:
    """
    A context whose database must not be reached.
    """

    @property
    def db(self) -> Any:
        raise AssertionError("the database was queried")


@pytest.mark.parametrize(
    ("owner", "name"),
    [("nope", "demo"), ("did:web:x", "demo"), (OWNER.short, ".."), (OWNER.did, "a b")],
)
def test_find_repo_refuses_impossible_names_without_a_query(
    owner: str, name: str
) -> None:
    """An owner or name that cannot exist is repo_not_found without a query."""
    d = Deferred.fromCoroutine(find_repo(Untouchable(), owner, name, None))  # type: ignore[arg-type]

    failure = []
    d.addErrback(failure.append)

    assert failure and isinstance(failure[0].value, ApiError)
    assert failure[0].value.code == "repo_not_found"


@pytest.mark.parametrize(
    ("query", "expected"),
    [(b"5", 5), (b" 7 ", 7), (b"+3", 3), (None, None)],
)
def test_query_int_accepts_whole_numbers(
    query: bytes | None, expected: int | None
) -> None:
    """Whole numbers (with spaces or a sign) are read; a missing one is None."""
    request = DummyRequest([b""])
    if query is not None:
        request.args[b"limit"] = [query]

    assert _query_int(request, "limit", 1, 200) == expected


@pytest.mark.parametrize("query", [b"", b"x", b"1.5", b"0", b"201", b"9" * 40, b"\xff"])
def test_query_int_refusals(query: bytes) -> None:
    """Non-numbers, out-of-range and absurdly long values are 400."""
    request = DummyRequest([b""])
    request.args[b"limit"] = [query]

    with pytest.raises(ApiError) as raised:
        _query_int(request, "limit", 1, 200)

    assert raised.value.status == 400


# -- Both or neither -------------------------------------------------------------------


class FakeCursor:
    """
    Understands the two statements the create protocol sends: the insert
    (taking the name unless a committed row has it) and the lookup by id.
    """

    def __init__(self, database: FakeDatabase) -> None:
        self.database = database
        self.result: dict[str, Any] | None = None

    def execute(self, statement: str, params: Any = None) -> Deferred[None]:
        if statement.startswith("INSERT"):
            key = (params["owner_did"], params["name"])
            if key in self.database.committed:
                self.result = None
            else:
                self.result = row(id=params["id"], name=params["name"])
                self.database.pending[key] = self.result
        else:
            wanted = params[0]
            found = [r for r in self.database.committed.values() if r["id"] == wanted]
            self.result = found[0] if found else None
        return succeed(None)

    def fetchone(self) -> dict[str, Any] | None:
        return self.result


class FakeDatabase:
    """
    Committed rows by (owner, name), and transactions whose commit can be
    made to fail: C{commit_failures} are raised by the next commits, in
    order; C{commit_lands} says whether a failed commit stored the rows all
    the same (its answer was lost); C{down} makes every later transaction
    fail to start.
    """

    def __init__(self) -> None:
        self.committed: dict[tuple[str, str], dict[str, Any]] = {}
        self.pending: dict[tuple[str, str], dict[str, Any]] = {}
        self.commit_failures: list[Exception] = []
        self.commit_lands = False
        self.down_after_first = False
        self.transactions = 0
        self.rollbacks = 0
        self.between: Any = None

    async def transaction(self, interaction: Any) -> Any:
        self.transactions += 1
        if self.down_after_first and self.transactions > 1:
            raise psycopg2.OperationalError("server closed the connection")
        self.pending = {}
        try:
            result = await interaction(FakeCursor(self))
        except Exception:
            self.rollbacks += 1
            raise
        if self.commit_failures:
            if self.commit_lands:
                self.committed.update(self.pending)
            error = self.commit_failures.pop(0)
            if self.between is not None:
                self.between()
            raise error
        self.committed.update(self.pending)
        return result


class FakeStore:
    """
    Makes and removes repository directories under a temporary root.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.removed: list[tuple[str, str]] = []

    def path(self, name: str) -> Path:
        return self.root / OWNER.short / f"{name}.git"

    def make(self, name: str) -> Path:
        path = self.path(name)
        if path.exists():
            raise RepositoryExists(str(path))
        path.mkdir(parents=True)
        (path / "HEAD").write_text("ref: refs/heads/main\n")
        return path

    def remove(self, owner_short: str, name: str) -> bool:
        self.removed.append((owner_short, name))
        path = self.path(name)
        if not path.exists():
            return False
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
        return True


VALUES = {
    "id": "0d5b8a1e-6f7c-4a51-9a0b-3f0c2f1a9e11",
    "owner_did": OWNER.did,
    "name": "demo",
    "description": None,
    "is_public": True,
    "default_branch": "main",
    "forked_from": None,
}
LOST = psycopg2.OperationalError("connection lost during COMMIT")


class CreateWithRepositoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="gitlawb-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.store = FakeStore(root)
        self.database = FakeDatabase()

    def run_create(self, make: Any = None) -> Deferred[Any]:
        context = SimpleNamespace(db=self.database)

        async def default_make() -> Path:
            return self.store.make("demo")

        return Deferred.fromCoroutine(
            create_with_repository(
                context,  # type: ignore[arg-type]
                self.store,  # type: ignore[arg-type]
                dict(VALUES),
                make or default_make,
            )
        )

    def test_success_keeps_both(self) -> None:
        """A committed create returns the row and keeps the repository."""
        result = self.successResultOf(self.run_create())

        self.assertEqual(result.id, VALUES["id"])
        self.assertTrue(self.store.path("demo").is_dir())
        self.assertEqual(len(self.database.committed), 1)

    def test_taken_name_is_repo_exists_and_touches_no_disk(self) -> None:
        """When a committed row has the name: 409, and nothing is made."""
        self.database.committed[(OWNER.did, "demo")] = row(id="other")

        failure = self.failureResultOf(self.run_create(), ApiError)

        self.assertEqual(failure.value.code, "repo_exists")
        self.assertFalse(self.store.path("demo").exists())

    def test_disk_failure_rolls_the_row_back(self) -> None:
        """When the repository cannot be made the row is rolled back."""

        async def broken() -> Path:
            raise OSError("disk full")

        self.failureResultOf(self.run_create(broken), OSError)

        self.assertEqual(self.database.rollbacks, 1)
        self.assertEqual(self.database.committed, {})
        self.assertEqual(self.store.removed, [])

    def test_failed_commit_removes_the_repository(self) -> None:
        """When the commit fails, the repository is removed and the error stands."""
        self.database.commit_failures = [LOST]

        failure = self.failureResultOf(self.run_create(), psycopg2.OperationalError)

        self.assertIs(failure.value, LOST)
        self.assertFalse(self.store.path("demo").exists())
        self.assertEqual(self.database.committed, {})

    def test_lost_commit_answer_with_the_row_present_is_success(self) -> None:
        """When the commit went through but its answer was lost, the create stands."""
        self.database.commit_failures = [LOST]
        self.database.commit_lands = True

        result = self.successResultOf(self.run_create())

        self.assertEqual(result.id, VALUES["id"])
        self.assertTrue(self.store.path("demo").is_dir())

    def test_undecidable_commit_leaves_the_directory(self) -> None:
        """When the database is gone after a failed commit, the directory stays."""
        self.database.commit_failures = [LOST]
        self.database.down_after_first = True

        failure = self.failureResultOf(self.run_create(), psycopg2.OperationalError)

        self.assertIs(failure.value, LOST)
        self.assertTrue(self.store.path("demo").is_dir())
        self.assertEqual(len(self.flushLoggedErrors(psycopg2.OperationalError)), 1)

    def test_directory_of_a_later_create_is_not_removed(self) -> None:
        """After a failed commit, a later create's committed repository stays."""
        self.database.commit_failures = [LOST]

        def later_create() -> None:
            # Another create took the name, replaced the directory, committed.
            self.store.remove(OWNER.short, "demo")
            (self.store.make("demo") / "theirs").write_text("x")
            self.database.committed[(OWNER.did, "demo")] = row(id="theirs")

        self.database.between = later_create

        self.failureResultOf(self.run_create(), psycopg2.OperationalError)

        self.assertTrue((self.store.path("demo") / "theirs").exists())

    def test_orphan_directory_is_replaced(self) -> None:
        """A directory without a row under the name being created is replaced."""
        orphan = self.store.make("demo")
        (orphan / "stale").write_text("old")

        self.successResultOf(self.run_create())

        self.assertEqual(self.store.removed, [(OWNER.short, "demo")])
        self.assertFalse((orphan / "stale").exists())
        self.assertTrue((orphan / "HEAD").exists())
