"""
The sync queue and the outbox relay's claims against a real PostgreSQL: rows
claimed with C{FOR UPDATE SKIP LOCKED} are never worked twice, however many
workers share the database.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from gitlawb.db.pool import Database
from gitlawb.db.service import DatabaseService
from gitlawb.identity.keys import NodeKey
from gitlawb.peers import PeerClient, SqlRelayStore
from gitlawb.sync import (
    MirrorPlan,
    MirrorResult,
    SqlSyncQueue,
    SyncWorker,
    enqueue_sync,
)
from tests.support import fresh_database

pytestmark = pytest.mark.integration

ORIGIN = NodeKey.generate().did


class Nothing(Resource):
    """
    A peer that knows no route.
    """

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        return b"{}"


class RecordingMirrorer:
    """
    Stands in for git: records which worker mirrored what, taking a little
    time so that the workers overlap.
    """

    def __init__(self, root: Path, worker: str, calls: list[tuple[str, str]]) -> None:
        self._root = root
        self._worker = worker
        self.calls = calls

    def path_for(self, owner_short: str, name: str) -> Path:
        return self._root / owner_short / f"{name}.git"

    async def mirror(self, plan: MirrorPlan) -> MirrorResult:
        self.calls.append((self._worker, plan.slug))
        await deferLater(reactor, 0.02)
        return MirrorResult(False, "main")


class QueueTests(TestCase):
    def setUp(self) -> Any:
        manager = fresh_database()
        url = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)
        self.service = DatabaseService(
            reactor, url, None, 6, 0.2, 1.0, on_fatal=lambda message: None
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service.when_ready()

    @property
    def db(self) -> Database:
        return self.service.database

    async def queue_repos(self, count: int) -> list[str]:
        slugs = []
        for index in range(count):
            slug = f"{NodeKey.generate().short}/repo{index}"
            await enqueue_sync(
                self.db,
                origin_did=ORIGIN,
                origin_url="http://127.0.0.1:9",
                repo_slug=slug,
            )
            slugs.append(slug)
        return slugs

    def worker(self, name: str, calls: list[tuple[str, str]]) -> SyncWorker:
        client = PeerClient(
            reactor, NodeKey.generate(), allow_private=True, http=StubTreq(Nothing())
        )
        return SyncWorker(
            reactor,
            SqlSyncQueue(self.service, reactor),
            RecordingMirrorer(Path(self.mktemp()), name, calls),  # type: ignore[arg-type]
            client,
            public_url=lambda: "http://127.0.0.1:1",
            concurrency=3,
            poll_interval=0.05,
            catch_up=False,
            worker_id=name,
        )

    async def test_two_workers_never_take_the_same_row(self) -> None:
        """Two workers on one database mirror every queued repository exactly once."""
        slugs = await self.queue_repos(30)
        calls: list[tuple[str, str]] = []
        first, second = self.worker("one", calls), self.worker("two", calls)

        first.startService()
        second.startService()
        for _ in range(200):
            rows = await self.db.query(
                "SELECT count(*) FROM sync_queue WHERE status = 'done'"
            )
            if rows[0][0] == len(slugs):
                break
            await deferLater(reactor, 0.05)
        await gatherResults([first.stopService(), second.stopService()])

        assert sorted(slug for _, slug in calls) == sorted(slugs)
        assert {worker for worker, _ in calls} == {"one", "two"}
        mirrors = await self.db.query("SELECT count(*) FROM repos")
        assert mirrors[0][0] == len(slugs)

    async def test_concurrent_claims_skip_locked_rows(self) -> None:
        """Claims racing for one due row: one gets it, the others get nothing."""
        await self.queue_repos(1)
        queues = [SqlSyncQueue(self.service, reactor) for _ in range(4)]

        claimed = await gatherResults(
            [Deferred.fromCoroutine(q.claim(f"w{i}", 60)) for i, q in enumerate(queues)]
        )

        assert len([job for job in claimed if job is not None]) == 1

    async def test_update_during_a_run_makes_it_run_again(self) -> None:
        """An update folded into a row being worked on puts it back to pending."""
        slug = (await self.queue_repos(1))[0]
        queue = SqlSyncQueue(self.service, reactor)
        job = await queue.claim("w", 60)
        assert job is not None

        await enqueue_sync(
            self.db, origin_did=ORIGIN, origin_url="http://127.0.0.1:9", repo_slug=slug
        )
        finished = await queue.complete("w", job)

        assert finished is False
        rows = await self.db.query("SELECT status, generation FROM sync_queue")
        assert [tuple(r) for r in rows] == [("pending", 1)]
        again = await queue.claim("w", 60)
        assert again is not None
        assert await queue.complete("w", again) is True

    async def test_notifies_fold_into_one_live_row(self) -> None:
        """Repeated syncs of one repository from one origin keep a single live row."""
        slug = (await self.queue_repos(1))[0]

        for sha in ("a" * 40, "b" * 40):
            await enqueue_sync(
                self.db,
                origin_did=ORIGIN,
                origin_url="http://127.0.0.1:9",
                repo_slug=slug,
                ref_name="refs/heads/main",
                new_sha=sha,
            )

        rows = await self.db.query("SELECT new_sha, generation FROM sync_queue")
        assert [tuple(r) for r in rows] == [("b" * 40, 2)]

    async def test_expired_claim_is_taken_back(self) -> None:
        """A row whose worker vanished is put back once its lease ends."""
        await self.queue_repos(1)
        queue = SqlSyncQueue(self.service, reactor, reap_interval=0)
        assert await queue.claim("gone", 0.01) is not None
        await deferLater(reactor, 0.05)

        job = await queue.claim("alive", 60)

        assert job is not None
        assert job.attempts == 2

    async def test_relay_claims_are_disjoint(self) -> None:
        """Two relays claiming outbox rows at once never share one."""
        for index in range(10):
            await self.db.execute(
                "INSERT INTO outbox (kind, payload) VALUES ('ref_update', %s)",
                (json.dumps({"n": index}),),
            )
        stores = [SqlRelayStore(self.service, ORIGIN) for _ in range(2)]

        first, second = await gatherResults(
            [Deferred.fromCoroutine(s.claim(6, 60)) for s in stores]
        )

        ids = [item.id for item in first] + [item.id for item in second]
        assert len(ids) == len(set(ids)) == 10
