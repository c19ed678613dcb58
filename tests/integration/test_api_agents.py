"""
The agent routes (PROTOCOL.md section 4) on a real node process and database.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from nacl.signing import VerifyKey
from twisted.internet.defer import Deferred, succeed

from gitlawb.api.agents import record_push_trust
from gitlawb.identity.keys import public_key_from_did
from tests.support import (
    Agent,
    NodeProcess,
    node_without_rate_limits,
    request,
)

pytestmark = pytest.mark.integration

CAPABILITIES = ["git:push", "git:fetch", "issue:create", "pr:open"]


@pytest.fixture(scope="module")
def node(
    pg_server: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    """
    One node for the tests that need no settings of their own, rate limits
    off (each test uses fresh agents, so they do not see each other).
    """
    tmp = tmp_path_factory.mktemp("agents")
    with node_without_rate_limits(tmp) as process:
        yield process


def register(node: NodeProcess, agent: Agent, **body: Any) -> Any:
    value = {"did": agent.did, "capabilities": CAPABILITIES, **body}
    return agent.call(node, "POST", "/api/register", value)


def sql(node: NodeProcess, statement: str, params: Any = None) -> list[Any]:
    """
    Run one statement on the node's database and return its rows.
    """
    connection = psycopg2.connect(node.env["DATABASE_URL"])
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- Register ------------------------------------------------------------------


def test_register_answers_201_with_a_ucan_signed_by_the_node(node: NodeProcess) -> None:
    """Registering answers 201 with the protocol's fields and a UCAN the node signed."""
    agent = Agent()
    node_did = request("GET", node.url + "/").json()["did"]

    answer = register(node, agent)

    assert answer.status == 201
    body = answer.json()
    assert body["status"] == "accepted"
    assert body["did"] == agent.did
    assert body["trust_score"] == 0.05
    assert body["capabilities"] == CAPABILITIES
    assert body["node"] == f"127.0.0.1:{node.port}"
    assert body["message"]
    token = json.loads(body["ucan"])
    payload = token["payload"]
    assert list(payload) == ["ucan", "iss", "aud", "att", "exp", "prf"]
    assert payload["iss"] == node_did
    assert payload["aud"] == agent.did
    assert payload["att"] == [{"with": "gitlawb://alpha", "can": "network/join"}]
    assert abs(payload["exp"] - (time.time() + 30 * 24 * 3600)) < 120
    signed = json.dumps(payload, separators=(",", ":")).encode()
    VerifyKey(public_key_from_did(node_did)).verify(signed, b64url(token["s"]))
    assert body["expires"].endswith("+00:00")


def test_register_accepts_the_short_form_of_the_signer(node: NodeProcess) -> None:
    """The did may be the signer's short key."""
    agent = Agent()

    answer = agent.call(
        node, "POST", "/api/register", {"did": agent.key.short, "capabilities": []}
    )

    assert answer.status == 201
    assert answer.json()["did"] == agent.did


def test_register_someone_else_is_forbidden(node: NodeProcess) -> None:
    """A did other than the signer's is refused with 403 forbidden."""
    agent, other = Agent(), Agent()

    answer = agent.call(node, "POST", "/api/register", {"did": other.did})

    assert answer.status == 403
    assert answer.json()["error"] == "forbidden"


def test_register_with_a_did_that_is_no_did_key_is_bad_request(
    node: NodeProcess,
) -> None:
    """A did that is not a did:key is a 400 bad_request."""
    agent = Agent()

    answer = agent.call(node, "POST", "/api/register", {"did": "did:web:example.com"})

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"did": 12},
        {"capabilities": "git:push"},
        {"capabilities": [1, 2]},
        {"capabilities": [""]},
        {"model": ["x"]},
        {"model": "a\u0000b"},
        {"capabilities": ["\ud800"]},
    ],
)
def test_register_with_wrong_types_is_bad_request(
    node: NodeProcess, body: dict[str, Any]
) -> None:
    """Missing or mistyped members are a 400 bad_request naming the member."""
    agent = Agent()
    value = {"did": agent.did, **body} if body else body

    answer = agent.call(node, "POST", "/api/register", value)

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"
    assert answer.json()["message"]


def test_register_with_a_body_that_is_no_json_is_bad_request(node: NodeProcess) -> None:
    """A body that is not JSON is a 400 in the protocol's error shape."""
    agent = Agent()

    answer = agent.call(node, "POST", "/api/register", raw=b'{"did": ')

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"


def test_register_again_updates_capabilities_and_keeps_registered_at(
    node: NodeProcess,
) -> None:
    """A second registration replaces the capabilities and keeps registered_at."""
    agent = Agent()
    register(node, agent)
    first = request("GET", f"{node.url}/api/v1/agents/{agent.did}").json()

    again = register(node, agent, capabilities=["git:fetch"], model="m-1")
    second = request("GET", f"{node.url}/api/v1/agents/{agent.did}").json()

    assert again.status == 201
    assert again.json()["capabilities"] == ["git:fetch"]
    assert second["capabilities"] == ["git:fetch"]
    assert second["model"] == "m-1"
    assert second["registered_at"] == first["registered_at"]


def test_register_without_a_signature_is_not_an_agent(node: NodeProcess) -> None:
    """An unsigned register gets 401 not_an_agent with the upgrade hint headers."""
    body = json.dumps({"did": Agent().did}).encode()

    answer = request(
        "POST",
        node.url + "/api/register",
        body,
        {"Content-Type": "application/json"},
    )

    assert answer.status == 401
    assert answer.json()["error"] == "not_an_agent"
    assert answer.json()["hint"] == "gl identity new && gl register"
    assert answer.headers["X-Gitlawb-Error"] == "human_detected"
    assert answer.headers["WWW-Authenticate"].startswith(
        'Signature realm="gitlawb-alpha"'
    )


def test_register_replayed_is_refused(node: NodeProcess) -> None:
    """The same signed register sent twice is refused the second time."""
    agent = Agent()
    body = json.dumps({"did": agent.did}).encode()
    headers = agent.signed_headers("POST", "/api/register", body)
    headers["Content-Type"] = "application/json"

    first = request("POST", node.url + "/api/register", body, headers)
    second = request("POST", node.url + "/api/register", body, headers)

    assert first.status == 201
    assert second.status == 401
    assert second.json()["error"] == "replayed_signature"


def test_register_is_rate_limited_per_signer(
    start_node: Callable[..., NodeProcess],
) -> None:
    """Past GITLAWB_SIGNER_RATE_LIMIT registrations an hour, 429 with Retry-After."""
    node = start_node(GITLAWB_SIGNER_RATE_LIMIT="2")
    agent = Agent()

    # Distinct bodies: the same body signed in the same second is a replay.
    statuses = [register(node, agent, model=f"m{i}").status for i in range(2)]
    third = register(node, agent, model="m3")

    assert statuses == [201, 201]
    assert third.status == 429
    assert third.json()["error"] == "rate_limited"
    assert int(third.headers["Retry-After"]) > 0


# -- Directory -----------------------------------------------------------------


def test_agent_by_full_did_and_short_key(node: NodeProcess) -> None:
    """An agent is found by its full DID and by its short key alike."""
    agent = Agent()
    register(node, agent)

    full = request("GET", f"{node.url}/api/v1/agents/{agent.did}")
    short = request("GET", f"{node.url}/api/v1/agents/{agent.key.short}")

    assert full.status == short.status == 200
    assert full.json() == short.json()
    body = full.json()
    assert set(body) == {
        "did",
        "trust_score",
        "capabilities",
        "model",
        "registered_at",
        "last_seen",
        "status",
    }
    assert body["status"] == "active"
    assert body["capabilities"] == CAPABILITIES


@pytest.mark.parametrize("did", ["unknown", "did:key:z6MkNOPE", None])
def test_unknown_agent_is_not_found(node: NodeProcess, did: str | None) -> None:
    """An agent that is not registered, or no DID at all, is 404 not_found."""
    wanted = did or Agent().did

    answer = request("GET", f"{node.url}/api/v1/agents/{wanted}")

    assert answer.status == 404
    assert answer.json()["error"] == "not_found"


def test_agents_list_filters_by_capability_and_orders_by_trust(
    node: NodeProcess,
) -> None:
    """The list holds active agents, highest trust first, filtered by capability."""
    low, high = Agent(), Agent()
    capability = f"test:{time.time_ns()}"
    register(node, low, capabilities=[capability])
    register(node, high, capabilities=[capability, "other"])
    sql(node, "UPDATE agents SET trust_score = 0.5 WHERE did = %s", (high.did,))

    listed = request("GET", f"{node.url}/api/v1/agents?capability={capability}")
    everyone = request("GET", f"{node.url}/api/v1/agents")

    assert [a["did"] for a in listed.json()["agents"]] == [high.did, low.did]
    assert {low.did, high.did} <= {a["did"] for a in everyone.json()["agents"]}


def test_last_seen_moves_when_a_registered_agent_signs(node: NodeProcess) -> None:
    """A signed request by a known agent sets its last_seen."""
    agent = Agent()
    sql(node, "INSERT INTO agents (did) VALUES (%s)", (agent.did,))

    answer = agent.call(node, "GET", "/api/v1/repos")

    assert answer.status == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sql(node, "SELECT last_seen FROM agents WHERE did = %s", (agent.did,))[0][0]:
            break
        time.sleep(0.05)
    shown = request("GET", f"{node.url}/api/v1/agents/{agent.did}").json()
    assert shown["last_seen"] is not None


# -- Trust -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "level"),
    [(0.05, "newcomer"), (0.1, "contributor"), (0.3, "trusted"), (0.7, "maintainer")],
)
def test_trust_levels(node: NodeProcess, score: float, level: str) -> None:
    """The trust route names the level of the agent's score."""
    agent = Agent()
    register(node, agent)
    sql(
        node,
        "UPDATE agents SET trust_score = %s, push_count = 3 WHERE did = %s",
        (score, agent.did),
    )

    answer = request("GET", f"{node.url}/api/v1/agents/{agent.key.short}/trust")

    assert answer.status == 200
    assert answer.json() == {
        "did": agent.did,
        "trust_score": score,
        "push_count": 3,
        "level": level,
    }


def test_trust_of_an_agent_never_seen_is_zero(node: NodeProcess) -> None:
    """An agent the node never saw has trust 0 and is a newcomer."""
    agent = Agent()

    answer = request("GET", f"{node.url}/api/v1/agents/{agent.did}/trust")

    assert answer.json() == {
        "did": agent.did,
        "trust_score": 0.0,
        "push_count": 0,
        "level": "newcomer",
    }


class SyncCursor:
    """
    A psycopg2 cursor behind the Deferred-returning face of txpostgres's.
    """

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, statement: str, params: Any = None) -> Deferred[SyncCursor]:
        self._cursor.execute(statement, params)
        return succeed(self)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()


def push_trust(node: NodeProcess, did: str) -> float:
    connection = psycopg2.connect(node.env["DATABASE_URL"])
    try:
        with connection, connection.cursor() as cursor:
            done = Deferred.fromCoroutine(record_push_trust(SyncCursor(cursor), did))
            results: list[float] = []
            done.addCallback(results.append)
            return results[0]
    finally:
        connection.close()


def test_record_push_trust_grows_by_a_twentieth_per_push(node: NodeProcess) -> None:
    """Each recorded push adds 0.05 to a registered agent's trust."""
    agent = Agent()
    register(node, agent)

    scores = [push_trust(node, agent.did) for _ in range(3)]
    trust = request("GET", f"{node.url}/api/v1/agents/{agent.did}/trust").json()

    assert scores == [0.1, 0.15, 0.2]
    assert trust["push_count"] == 3
    assert trust["trust_score"] == 0.2


def test_record_push_trust_creates_the_agent_and_caps_at_one(
    node: NodeProcess,
) -> None:
    """An unregistered pusher gets a row; trust never passes 1."""
    agent = Agent()

    first = push_trust(node, agent.key.short)
    sql(node, "UPDATE agents SET push_count = 40 WHERE did = %s", (agent.did,))
    capped = push_trust(node, agent.did)

    assert first == 0.1
    assert capped == 1.0
    shown = request("GET", f"{node.url}/api/v1/agents/{agent.did}").json()
    assert shown["status"] == "active"


# -- Revoke ----------------------------------------------------------------------


def test_revoke_self_answers_204_and_hides_the_agent(node: NodeProcess) -> None:
    """An agent revoking itself gets 204; it is then revoked and not listed."""
    agent = Agent()
    register(node, agent)

    answer = agent.call(node, "DELETE", f"/api/v1/agents/{agent.key.short}")

    assert answer.status == 204
    assert answer.body == b""
    shown = request("GET", f"{node.url}/api/v1/agents/{agent.did}").json()
    assert shown["status"] == "revoked"
    listed = request("GET", f"{node.url}/api/v1/agents").json()["agents"]
    assert agent.did not in {a["did"] for a in listed}


def test_revoke_someone_else_is_forbidden(node: NodeProcess) -> None:
    """Revoking another agent is 403 forbidden and changes nothing."""
    agent, victim = Agent(), Agent()
    register(node, victim)

    answer = agent.call(node, "DELETE", f"/api/v1/agents/{victim.did}")

    assert answer.status == 403
    assert answer.json()["error"] == "forbidden"
    shown = request("GET", f"{node.url}/api/v1/agents/{victim.did}").json()
    assert shown["status"] == "active"


def test_revoke_unsigned_is_not_an_agent(node: NodeProcess) -> None:
    """An unsigned DELETE is 401 not_an_agent."""
    agent = Agent()
    register(node, agent)

    answer = request("DELETE", f"{node.url}/api/v1/agents/{agent.did}")

    assert answer.status == 401
    assert answer.json()["error"] == "not_an_agent"


def test_revoke_unregistered_self_is_not_found(node: NodeProcess) -> None:
    """An agent that never registered has nothing to revoke: 404."""
    agent = Agent()

    answer = agent.call(node, "DELETE", f"/api/v1/agents/{agent.did}")

    assert answer.status == 404


def test_register_after_revoking_makes_the_agent_active_again(
    node: NodeProcess,
) -> None:
    """A revoked agent that registers again is active again."""
    agent = Agent()
    register(node, agent)
    agent.call(node, "DELETE", f"/api/v1/agents/{agent.did}")

    answer = register(node, agent, model="again")

    assert answer.status == 201
    shown = request("GET", f"{node.url}/api/v1/agents/{agent.did}").json()
    assert shown["status"] == "active"
