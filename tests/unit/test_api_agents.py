"""
The agent routes' pure parts: trust arithmetic, body members, the last-seen
throttle, writes that survive a client leaving, and the routes' answers that
need no database (through StubTreq on the Klein app).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gitlawb.api.agents import (
    SignerActivity,
    bool_member,
    run_to_completion,
    text_list_member,
    text_member,
    trust_after_pushes,
    trust_level,
)
from gitlawb.api.app import NodeContext, RateLimits, build_app
from gitlawb.api.errors import ApiError
from gitlawb.config import Settings
from gitlawb.db.service import DatabaseUnavailable
from gitlawb.identity.keys import NodeKey
from gitlawb.identity.signatures import ReplayGuard, sign_request

# -- Trust -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pushes", "trust"),
    [(0, 0.05), (1, 0.1), (2, 0.15), (3, 0.2), (7, 0.4), (19, 1.0), (500, 1.0)],
)
def test_trust_after_pushes(pushes: int, trust: float) -> None:
    """Trust is min(1, 0.05 + 0.05 * pushes), exactly the decimal value."""
    assert trust_after_pushes(pushes) == trust


@pytest.mark.parametrize(
    ("score", "level"),
    [
        (0.0, "newcomer"),
        (0.0999, "newcomer"),
        (0.1, "contributor"),
        (0.2999, "contributor"),
        (0.3, "trusted"),
        (0.6999, "trusted"),
        (0.7, "maintainer"),
        (1.0, "maintainer"),
    ],
)
def test_trust_level_thresholds(score: float, level: str) -> None:
    """The levels change at 0.1, 0.3 and 0.7."""
    assert trust_level(score) == level


# -- Body members ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "name is required"),
        ({"name": 1}, "name must be a string, not a number"),
        ({"name": True}, "name must be a string, not a boolean"),
        ({"name": {}}, "name must be a string, not an object"),
        ({"name": "x" * 11}, "name must be at most 10 characters"),
        ({"name": "a\x00"}, "name must not contain NUL characters"),
        ({"name": "\ud800"}, "name is not valid Unicode text"),
    ],
)
def test_text_member_refusals(body: dict[str, Any], message: str) -> None:
    """Each wrong text member is a 400 with a message that says what is wrong."""
    with pytest.raises(ApiError) as raised:
        text_member(body, "name", required=True, max_length=10)

    assert raised.value.status == 400
    assert raised.value.code == "bad_request"
    assert raised.value.message == message


def test_text_member_default_for_null() -> None:
    """A null or missing optional member is the default."""
    assert text_member({"x": None}, "x", default="main") == "main"
    assert text_member({}, "x") is None


@pytest.mark.parametrize("value", ["true", 1, 0, [], "false"])
def test_bool_member_refuses_non_booleans(value: object) -> None:
    """Only JSON true and false are booleans."""
    with pytest.raises(ApiError) as raised:
        bool_member({"flag": value}, "flag", True)

    assert "flag must be true or false" in raised.value.message


def test_bool_member_default() -> None:
    """A missing or null boolean is the default."""
    assert bool_member({}, "flag", True) is True
    assert bool_member({"flag": None}, "flag", False) is False
    assert bool_member({"flag": False}, "flag", True) is False


def test_text_list_member_drops_duplicates() -> None:
    """Duplicates go, first occurrence kept, order kept."""
    body = {"caps": ["b", "a", "b", "c", "a"]}

    assert text_list_member(body, "caps", max_items=5, max_length=5) == ["b", "a", "c"]


@pytest.mark.parametrize(
    "value", ["a", [1], [""], ["toolong"], ["a", "b", "c"], {"a": 1}]
)
def test_text_list_member_refusals(value: object) -> None:
    """Not a list, non-strings, empty or long strings and too many items are 400."""
    with pytest.raises(ApiError) as raised:
        text_list_member({"caps": value}, "caps", max_items=2, max_length=5)

    assert raised.value.status == 400


# -- SignerActivity --------------------------------------------------------------------


class Writes:
    """
    A write function whose calls stay pending until fired by the test.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[None]]] = []

    def __call__(self, did: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append((did, d))
        return d

    @property
    def dids(self) -> list[str]:
        return [did for did, _ in self.calls]


class SignerActivityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.writes = Writes()
        self.activity = SignerActivity(
            self.clock, self.writes, interval=60.0, max_pending=2, max_tracked=3
        )

    def finish_all(self) -> None:
        for _, d in self.writes.calls:
            if not d.called:
                d.callback(None)

    def test_first_sight_writes(self) -> None:
        """The first request of a signer starts a write."""
        self.activity.seen("did:a")

        self.assertEqual(self.writes.dids, ["did:a"])

    def test_repeat_within_interval_does_not_write(self) -> None:
        """A second request inside the interval writes nothing."""
        self.activity.seen("did:a")
        self.finish_all()
        self.clock.advance(59)

        self.activity.seen("did:a")

        self.assertEqual(self.writes.dids, ["did:a"])

    def test_repeat_after_interval_writes_again(self) -> None:
        """After the interval the signer's row is touched again."""
        self.activity.seen("did:a")
        self.finish_all()
        self.clock.advance(60)

        self.activity.seen("did:a")

        self.assertEqual(self.writes.dids, ["did:a", "did:a"])

    def test_pending_writes_are_bounded(self) -> None:
        """While max_pending writes are in flight further signers are skipped."""
        for did in ("did:a", "did:b", "did:c"):
            self.activity.seen(did)

        self.assertEqual(self.writes.dids, ["did:a", "did:b"])
        self.assertEqual(self.activity.pending, 2)

    def test_finished_writes_free_their_slot(self) -> None:
        """Once a write finishes another signer may be written."""
        self.activity.seen("did:a")
        self.activity.seen("did:b")
        self.finish_all()

        self.activity.seen("did:c")

        self.assertEqual(self.writes.dids, ["did:a", "did:b", "did:c"])
        self.assertEqual(self.activity.pending, 1)

    def test_failed_write_is_retried_after_the_interval(self) -> None:
        """A failed write is not retried at once, but after the interval."""
        self.activity.seen("did:a")
        self.writes.calls[0][1].errback(RuntimeError("database gone"))

        self.activity.seen("did:a")
        self.clock.advance(60)
        self.activity.seen("did:a")

        self.assertEqual(self.writes.dids, ["did:a", "did:a"])
        self.assertEqual(self.activity.pending, 1)

    def test_tracking_is_bounded(self) -> None:
        """Past max_tracked signers the table is emptied rather than grown."""
        for number in range(5):
            self.activity.seen(f"did:{number}")
            self.finish_all()

        self.assertLessEqual(len(self.activity._written), 3)


# -- run_to_completion -----------------------------------------------------------------


class RunToCompletionTests(SynchronousTestCase):
    def test_result_passes_through(self) -> None:
        """Uncancelled, the Deferred fires with the work's result."""
        inner: Deferred[int] = Deferred()

        async def work() -> int:
            return await inner

        outer = run_to_completion(work())
        inner.callback(7)

        self.assertEqual(self.successResultOf(outer), 7)

    def test_cancel_stops_the_wait_not_the_work(self) -> None:
        """Cancelling fails the Deferred at once; the work still runs to its end."""
        inner: Deferred[int] = Deferred()
        steps: list[str] = []

        async def work() -> int:
            steps.append("started")
            value = await inner
            steps.append("finished")
            return value

        outer = run_to_completion(work())
        outer.cancel()
        inner.callback(1)

        self.failureResultOf(outer, CancelledError)
        self.assertEqual(steps, ["started", "finished"])

    def test_failure_after_cancel_is_logged(self) -> None:
        """A failure the cancelled caller can no longer see is logged."""
        inner: Deferred[int] = Deferred()

        async def work() -> int:
            return await inner

        outer = run_to_completion(work())
        outer.cancel()
        inner.errback(RuntimeError("late"))

        self.failureResultOf(outer, CancelledError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


# -- Routes without a database ---------------------------------------------------------


class NoDatabase:
    """
    A database service that is never ready.
    """

    @property
    def database(self) -> Any:
        raise DatabaseUnavailable()


def make_app(clock: Clock, **environ: str) -> tuple[StubTreq, NodeContext]:
    settings = Settings.load(
        environ={"GITLAWB_DATA_DIR": "/nonexistent/gitlawb", **environ}
    )
    context = NodeContext(
        settings=settings,
        key=NodeKey.generate(),
        database_service=NoDatabase(),  # type: ignore[arg-type]
        reactor=clock,
        replay=ReplayGuard(clock),
        limits=RateLimits.from_settings(settings, clock),
        public_url=lambda: "http://node.example:7545",
    )
    from gitlawb.api import agents

    context.services["route_installers"] = [agents.install]
    return StubTreq(build_app(context).resource()), context


def signed_post(
    client: StubTreq, key: NodeKey, target: str, value: Any, now: float
) -> Any:
    body = json.dumps(value).encode()
    headers = sign_request(key, "POST", target, body, int(now))
    headers["Content-Type"] = "application/json"
    return client.post("http://node.example:7545" + target, data=body, headers=headers)


class RouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.client, self.context = make_app(self.clock)
        self.agent = NodeKey.generate()

    def answer(self, d: Deferred[Any]) -> tuple[int, Any]:
        self.client.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response.code, json.loads(body)

    def test_register_mismatch_is_refused_without_the_database(self) -> None:
        """A register for another DID is 403 before any database access."""
        other = NodeKey.generate()

        status, body = self.answer(
            signed_post(
                self.client,
                self.agent,
                "/api/register",
                {"did": other.did},
                self.clock.seconds(),
            )
        )

        self.assertEqual((status, body["error"]), (403, "forbidden"))

    def test_register_while_the_database_is_down_is_503(self) -> None:
        """A valid register while the database is unavailable is 503 db_unavailable."""
        status, body = self.answer(
            signed_post(
                self.client,
                self.agent,
                "/api/register",
                {"did": self.agent.did},
                self.clock.seconds(),
            )
        )

        self.assertEqual((status, body["error"]), (503, "db_unavailable"))

    def test_unsigned_revoke_is_not_an_agent(self) -> None:
        """DELETE without a signature is 401 not_an_agent with the hint."""
        d = self.client.delete(
            f"http://node.example:7545/api/v1/agents/{self.agent.did}"
        )

        status, body = self.answer(d)

        self.assertEqual((status, body["error"]), (401, "not_an_agent"))
        self.assertIn("hint", body)

    def test_revoke_of_another_agent_is_forbidden(self) -> None:
        """A signed DELETE of someone else's DID is 403 without the database."""
        other = NodeKey.generate()
        target = f"/api/v1/agents/{other.short}"
        headers = sign_request(
            self.agent, "DELETE", target, b"{}", int(self.clock.seconds())
        )

        d = self.client.delete(
            "http://node.example:7545" + target, data=b"{}", headers=headers
        )
        status, body = self.answer(d)

        self.assertEqual((status, body["error"]), (403, "forbidden"))

    def test_register_rate_limit_is_per_signer(self) -> None:
        """Past the per-signer limit a valid register is 429 with Retry-After."""
        client, _ = make_app(self.clock, GITLAWB_SIGNER_RATE_LIMIT="1")
        first = signed_post(
            client,
            self.agent,
            "/api/register?n=1",
            {"did": self.agent.did},
            self.clock.seconds(),
        )
        client.flush()
        second = signed_post(
            client,
            self.agent,
            "/api/register?n=2",
            {"did": self.agent.did},
            self.clock.seconds(),
        )
        client.flush()

        first_response = self.successResultOf(first)
        second_response = self.successResultOf(second)

        self.assertEqual(first_response.code, 503)
        self.assertEqual(second_response.code, 429)
        self.assertTrue(second_response.headers.getRawHeaders("retry-after"))
