"""Unit tests for gitlawb.sync and gitlawb.workloop, on a Clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from gitlawb import metrics
from gitlawb.identity.keys import NodeKey
from gitlawb.peers import PeerClient
from gitlawb.sync import (
    InvalidRefUpdate,
    LocalRepo,
    MirrorPlan,
    MirrorResult,
    SyncFailed,
    SyncJob,
    SyncWorker,
    parse_ref_update,
)
from gitlawb.workloop import WorkLoop

NODE = NodeKey.from_seed(bytes(range(32)))
ORIGIN = NodeKey.from_seed(bytes(range(1, 33))).did
OWNER = NodeKey.from_seed(bytes(range(2, 34)))
SHA = "a" * 40


# -- parsing ref updates -----------------------------------------------------


def update(**changes: Any) -> dict[str, Any]:
    base = {
        "repo": f"{OWNER.short}/demo",
        "ref_name": "refs/heads/main",
        "new_sha": SHA,
        "node_did": ORIGIN,
    }
    base.update(changes)
    return base


def test_ref_update_is_made_canonical() -> None:
    """Short DIDs become full ones, the owner comes from the slug, .git is dropped."""
    parsed = parse_ref_update(
        update(repo=f"{OWNER.did}/demo.git", node_did=ORIGIN.rsplit(":", 1)[1])
    )

    assert parsed["repo"] == f"{OWNER.short}/demo"
    assert parsed["owner_did"] == OWNER.did
    assert parsed["node_did"] == ORIGIN
    assert parsed["old_sha"] is None


@pytest.mark.parametrize(
    "changes",
    [
        {"repo": "demo"},
        {"repo": f"{OWNER.short}/../x"},
        {"repo": f"{OWNER.short}/a/b"},
        {"repo": "z6Mknotakey/demo"},
        {"ref_name": "main"},
        {"ref_name": "refs/heads/a..b"},
        {"new_sha": "A" * 40},
        {"new_sha": "abc"},
        {"old_sha": "xyz"},
        {"node_did": "did:web:example.com"},
        {"owner_did": NODE.did},
        {"cert_id": "x" * 500},
    ],
)
def test_malformed_ref_updates_are_refused(changes: dict[str, Any]) -> None:
    """Bad slugs, refs, object ids, DIDs or oversized members are refused."""
    with pytest.raises(InvalidRefUpdate):
        parse_ref_update(update(**changes))


# -- the worker ------------------------------------------------------------------


class MemorySyncQueue:
    """
    The worker's queue in memory: each outcome is recorded.
    """

    def __init__(self, jobs: list[SyncJob], local: LocalRepo | None = None) -> None:
        self.jobs = list(jobs)
        self.local = local
        self.outcomes: list[tuple[Any, ...]] = []
        self.requeued = 0

    async def claim(self, worker: str, lease: float) -> SyncJob | None:
        return self.jobs.pop(0) if self.jobs else None

    async def local_repo(self, owner_did: str, name: str) -> LocalRepo | None:
        return self.local

    async def register_mirror(self, plan: MirrorPlan, result: MirrorResult) -> bool:
        self.outcomes.append(("register", plan.slug, result.description))
        return True

    async def complete(self, worker: str, job: SyncJob) -> bool:
        self.outcomes.append(("done", job.id))
        return True

    async def retry(self, worker: str, job: SyncJob, delay: float, error: str) -> None:
        self.outcomes.append(("retry", job.id, delay, error))

    async def finish(self, worker: str, job: SyncJob, status: str, error: str) -> None:
        self.outcomes.append((status, job.id, error))

    async def release(self, worker: str, job: SyncJob) -> None:
        self.outcomes.append(("release", job.id))

    async def requeue_mirrors(self) -> int:
        self.requeued += 1
        return 0


class FakeMirrorer:
    """
    Stands in for git: each call takes the next outcome (a result, an
    exception, or a Deferred to wait on).
    """

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.plans: list[MirrorPlan] = []

    def path_for(self, owner_short: str, name: str) -> Path:
        return Path("/repos") / owner_short / f"{name}.git"

    async def mirror(self, plan: MirrorPlan) -> MirrorResult:
        self.plans.append(plan)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome, Deferred):
            return await outcome  # type: ignore[no-any-return]
        assert isinstance(outcome, MirrorResult)
        return outcome


class Origin(Resource):
    """
    The origin node: answers the repo lookup and the replica registration.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def render(self, request: IRequest) -> bytes:
        self.calls.append((request.method.decode(), request.uri.decode()))
        if request.method == b"GET":
            return b'{"description": "from the origin"}'
        return b'{"status": "ok"}'


def job(attempts: int = 1, **changes: Any) -> SyncJob:
    values: dict[str, Any] = {
        "id": 7,
        "origin_did": ORIGIN,
        "origin_url": "http://origin.test",
        "repo_slug": f"{OWNER.short}/demo",
        "owner_did": OWNER.did,
        "ref_name": "refs/heads/main",
        "new_sha": SHA,
        "attempts": attempts,
        "generation": 0,
    }
    values.update(changes)
    return SyncJob(**values)


class SyncWorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.origin = Origin()
        self.http = StubTreq(self.origin)
        self.recorded: list[str] = []
        self.patch(metrics, "record_sync", self.recorded.append)

    def worker(
        self, queue: MemorySyncQueue, mirrorer: FakeMirrorer, **kwargs: Any
    ) -> SyncWorker:
        client = PeerClient(
            self.clock,
            NODE,
            http=self.http,
            clock=self.clock,
            allow_private=True,
            timeout=kwargs.pop("timeout", 5.0),
        )
        return SyncWorker(
            self.clock,
            queue,
            mirrorer,  # type: ignore[arg-type]
            client,
            public_url=lambda: "http://me.test",
            clock=self.clock,
            catch_up=False,
            **kwargs,
        )

    def run_one(self, worker: SyncWorker) -> bool:
        d = Deferred.fromCoroutine(worker.run_one())
        self.http.flush()
        result: bool = self.successResultOf(d)
        return result

    def test_new_mirror_is_registered_and_announced_to_the_origin(self) -> None:
        """A first sync registers the mirror and tells the origin."""
        queue = MemorySyncQueue([job()])
        mirrorer = FakeMirrorer(MirrorResult(True, "main"))

        assert self.run_one(self.worker(queue, mirrorer)) is True

        assert mirrorer.plans[0].clone_url == (
            f"http://origin.test/{OWNER.short}/demo.git"
        )
        assert queue.outcomes == [
            ("register", f"{OWNER.short}/demo", "from the origin"),
            ("done", 7),
        ]
        assert self.origin.calls == [
            ("GET", f"/api/v1/repos/{OWNER.short}/demo"),
            ("PUT", f"/api/v1/repos/{OWNER.short}/demo/replicas"),
        ]
        assert self.recorded == ["done"]

    def test_replica_is_announced_once_per_mirror(self) -> None:
        """Later syncs of the same mirror do not register the replica again."""
        queue = MemorySyncQueue([job(), job()])
        mirrorer = FakeMirrorer(
            MirrorResult(False, "main"), MirrorResult(False, "main")
        )
        worker = self.worker(queue, mirrorer)

        self.run_one(worker)
        self.run_one(worker)

        assert [m for m, _ in self.origin.calls] == ["PUT"]

    def test_transient_failure_is_retried_with_backoff(self) -> None:
        """A failed attempt is put back with a delay that doubles per attempt."""
        queue = MemorySyncQueue([job(1), job(2), job(3)])
        failure = SyncFailed("git clone failed: origin hung up")
        mirrorer = FakeMirrorer(failure, failure, failure)
        worker = self.worker(queue, mirrorer, backoff_initial=10.0, max_attempts=8)

        for _ in range(3):
            self.run_one(worker)

        assert [o[2] for o in queue.outcomes] == [10.0, 20.0, 40.0]
        assert queue.outcomes[0][3] == "git clone failed: origin hung up"
        assert self.recorded == ["deferred"] * 3

    def test_last_attempt_records_failure_with_reason(self) -> None:
        """At the last allowed attempt the row is recorded failed, with why."""
        queue = MemorySyncQueue([job(3)])
        mirrorer = FakeMirrorer(SyncFailed("git fetch failed: 503"))

        self.run_one(self.worker(queue, mirrorer, max_attempts=3))

        assert queue.outcomes == [("failed", 7, "git fetch failed: 503")]
        assert self.recorded == ["failed"]

    def test_own_repository_is_never_overwritten(self) -> None:
        """A sync of a repository this node owns is rejected before git runs."""
        queue = MemorySyncQueue([job()], local=LocalRepo("id", None))
        mirrorer = FakeMirrorer()

        self.run_one(self.worker(queue, mirrorer))

        assert mirrorer.plans == []
        assert queue.outcomes == [("rejected", 7, "the repository is this node's own")]
        assert self.recorded == ["rejected"]

    def test_mirror_of_another_origin_is_rejected(self) -> None:
        """A repository mirrored from one node is not fetched from another."""
        queue = MemorySyncQueue([job()], local=LocalRepo("id", NODE.did))
        mirrorer = FakeMirrorer()

        self.run_one(self.worker(queue, mirrorer))

        assert mirrorer.plans == []
        assert queue.outcomes[0][0] == "rejected"

    def test_slug_outside_the_repository_root_is_rejected(self) -> None:
        """A slug that is not <owner key>/<name> never reaches git."""
        queue = MemorySyncQueue([job(repo_slug=f"{OWNER.short}/../../etc")])
        mirrorer = FakeMirrorer()

        self.run_one(self.worker(queue, mirrorer))

        assert mirrorer.plans == []
        assert queue.outcomes[0][0] == "rejected"

    def test_stop_cuts_git_at_grace_and_hands_the_row_back(self) -> None:
        """A row whose git outlives the grace period is released, not left claimed."""
        cancelled: list[bool] = []
        running: Deferred[MirrorResult] = Deferred(lambda _: cancelled.append(True))
        queue = MemorySyncQueue([job()])
        worker = self.worker(queue, FakeMirrorer(running), grace=30.0, concurrency=1)
        worker.startService()

        stopped = worker.stopService()
        self.clock.advance(29)
        assert not stopped.called
        self.clock.advance(1)

        self.successResultOf(stopped)
        assert cancelled == [True]
        assert queue.outcomes == [("release", 7)]
        assert worker.cut_off == 1
        assert self.recorded == []
        assert self.clock.getDelayedCalls() == []

    def test_stop_waits_for_work_that_finishes_in_time(self) -> None:
        """A row that finishes within the grace period completes normally."""
        running: Deferred[MirrorResult] = Deferred()
        queue = MemorySyncQueue([job()])
        worker = self.worker(queue, FakeMirrorer(running), grace=30.0, concurrency=1)
        worker.startService()

        stopped = worker.stopService()
        self.clock.advance(5)
        running.callback(MirrorResult(False, "main"))
        self.http.flush()

        self.successResultOf(stopped)
        assert ("done", 7) in queue.outcomes
        assert worker.cut_off == 0

    def test_catch_up_queues_mirrors_once(self) -> None:
        """At start a worker queues a refresh of its mirrors, once."""
        queue = MemorySyncQueue([])
        worker = SyncWorker(
            self.clock,
            queue,
            FakeMirrorer(),  # type: ignore[arg-type]
            PeerClient(self.clock, NODE, http=self.http, clock=self.clock),
            public_url=lambda: "http://me.test",
            clock=self.clock,
            concurrency=2,
        )

        worker.startService()
        self.clock.advance(5)
        self.successResultOf(worker.stopService())

        assert queue.requeued == 1


# -- the loop -----------------------------------------------------------------------


class WorkLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls = 0
        self.found: list[bool] = []

    async def step(self) -> bool:
        self.calls += 1
        return self.found.pop(0) if self.found else False

    def test_idle_loop_polls_at_its_interval(self) -> None:
        """With no work the step runs once per poll interval."""
        loop = WorkLoop(self.clock, self.step, name="t", poll_interval=2.0)
        loop.start()

        self.clock.advance(1.9)
        assert self.calls == 1
        self.clock.advance(0.1)

        assert self.calls == 2
        self.successResultOf(loop.stop())
        assert self.clock.getDelayedCalls() == []

    def test_work_found_means_no_sleep(self) -> None:
        """While the step finds work it runs again at once."""
        self.found = [True, True, False]
        loop = WorkLoop(self.clock, self.step, name="t", poll_interval=2.0)

        loop.start()

        assert self.calls == 3
        self.successResultOf(loop.stop())

    def test_wake_ends_the_sleep(self) -> None:
        """Waking an idle loop runs the step without waiting for the poll."""
        loop = WorkLoop(self.clock, self.step, name="t", poll_interval=60.0)
        loop.start()

        loop.wake()

        assert self.calls == 2
        self.successResultOf(loop.stop())

    def test_failing_step_backs_off(self) -> None:
        """A step that raises is retried after a delay that doubles."""
        times: list[float] = []

        async def failing() -> bool:
            times.append(self.clock.seconds())
            raise RuntimeError("boom")

        loop = WorkLoop(
            self.clock, failing, name="t", poll_interval=1.0, max_error_delay=4.0
        )
        loop.start()
        for _ in range(12):
            self.clock.advance(1)
        self.successResultOf(loop.stop())
        self.flushLoggedErrors(RuntimeError)

        assert times == [0, 1, 3, 7, 11]
