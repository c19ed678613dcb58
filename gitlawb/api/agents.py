"""
Agents (PROTOCOL.md section 4): registration, the directory, trust levels and
revocation.

An agent is an Ed25519 did:key.  It needs no registration to sign requests;
registering records its capabilities, starts its trust at 0.05 and earns it a
UCAN from this node.  Trust then grows with every accepted push
(L{record_push_trust}, called by the push code inside its own transaction).

This module also holds what the API's write routes share: reading typed
members of a JSON body with messages that say what is wrong
(L{text_member} and friends), the signer bookkeeping
(L{authenticate_agent}: verify, then note the signer as seen), and
L{run_to_completion} for work a client disconnect must not cut in half.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from gitlawb.api.app import (
    NodeContext,
    authenticate,
    check_rate,
    client_ip,
    iso_timestamp,
    json_body,
)
from gitlawb.api.errors import ApiError, bad_request, forbidden, not_found, write_json
from gitlawb.identity.keys import InvalidDid, full_did
from gitlawb.identity.tokens import issue_ucan

__all__ = [
    "INITIAL_TRUST",
    "SignerActivity",
    "agent_json",
    "authenticate_agent",
    "bool_member",
    "install",
    "record_push_trust",
    "run_to_completion",
    "text_list_member",
    "text_member",
    "trust_after_pushes",
    "trust_level",
]

log = Logger()

T = TypeVar("T")

#: The trust of an agent that has registered but not pushed.
INITIAL_TRUST = 0.05

# Upper bounds of each trust level (PROTOCOL.md section 4); above the last
# one an agent is a maintainer.
_LEVELS = ((0.1, "newcomer"), (0.3, "contributor"), (0.7, "trusted"))

# Bounds on what a registration may store: generous for real clients, small
# enough that the agents table cannot be used as free storage.
MAX_CAPABILITIES = 64
MAX_CAPABILITY_LENGTH = 100
MAX_MODEL_LENGTH = 200

_AGENT_COLUMNS = (
    "did, capabilities, model, trust_score, push_count, status,"
    " registered_at, last_seen"
)


# -- Trust ---------------------------------------------------------------


def trust_after_pushes(pushes: int) -> float:
    """
    The trust of an agent after C{pushes} accepted pushes:
    C{min(1, 0.05 + 0.05 * pushes)}, computed as C{(1 + pushes) / 20} so that
    the result is the double nearest the decimal (0.2, not 0.20000000000000004).
    """
    return min(1.0, (1 + max(0, pushes)) / 20)


def trust_level(score: float) -> str:
    """
    The name of the level a trust score falls in.
    """
    for bound, name in _LEVELS:
        if score < bound:
            return name
    return "maintainer"


async def record_push_trust(cursor: Any, pusher_did: str) -> float:
    """
    Count one accepted push for C{pusher_did} and raise its trust accordingly,
    inside the caller's transaction (so the count moves with the push record).

    An agent that pushes without having registered gets its row here, active,
    with the trust of one push.

    @param cursor: a cursor of the caller's open transaction.
    @param pusher_did: the pusher's DID, full or short.
    @return: the agent's trust after this push.
    """
    did = full_did(pusher_did)
    await cursor.execute(
        "INSERT INTO agents (did, push_count, trust_score, last_seen)"
        " VALUES (%(did)s, 1, %(first)s, now())"
        " ON CONFLICT (did) DO UPDATE SET"
        "  push_count = agents.push_count + 1,"
        "  trust_score = LEAST(1.0, (agents.push_count + 2) / 20.0),"
        "  last_seen = now()"
        " RETURNING trust_score",
        {"did": did, "first": trust_after_pushes(1)},
    )
    row = cursor.fetchone()
    return float(row[0])


# -- Reading JSON bodies ---------------------------------------------------


def _check_storable(value: str, name: str) -> str:
    # PostgreSQL text holds neither NUL nor lone surrogates (which JSON's \u
    # escapes can produce); refuse them here rather than fail in the driver.
    if "\x00" in value:
        raise bad_request(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{name} is not valid Unicode text") from None
    return value


def text_member(
    body: dict[str, Any],
    name: str,
    *,
    required: bool = False,
    default: str | None = None,
    max_length: int = 1000,
) -> str | None:
    """
    A text member of a JSON object body.

    @return: the string; C{default} when the member is absent or null.
    @raise ApiError: 400 C{bad_request} when it is required and missing, not
        a string, longer than C{max_length}, or not storable text.
    """
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"{name} is required")
        return default
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string, not {_json_type(value)}")
    if len(value) > max_length:
        raise bad_request(f"{name} must be at most {max_length} characters")
    return _check_storable(value, name)


def bool_member(body: dict[str, Any], name: str, default: bool) -> bool:
    """
    A boolean member of a JSON object body.

    @return: its value; C{default} when absent or null.
    @raise ApiError: 400 C{bad_request} when it is not C{true} or C{false}.
    """
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, not {_json_type(value)}")
    return value


def text_list_member(
    body: dict[str, Any], name: str, *, max_items: int, max_length: int
) -> list[str] | None:
    """
    A member holding a list of non-empty strings, duplicates dropped (first
    occurrence kept).

    @return: the list, or C{None} when absent or null.
    @raise ApiError: 400 C{bad_request} for any other shape.
    """
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request(f"{name} must be a list of strings, not {_json_type(value)}")
    items: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise bad_request(f"{name} must hold only non-empty strings")
        if len(item) > max_length:
            raise bad_request(f"each of {name} must be at most {max_length} characters")
        _check_storable(item, name)
        if item not in items:
            items.append(item)
    if len(items) > max_items:
        raise bad_request(f"{name} may hold at most {max_items} entries")
    return items


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null"


# -- Signers -------------------------------------------------------------------


class SignerActivity:
    """
    Keeps C{agents.last_seen} roughly current without a write per request.

    A signer's row is touched at most once per C{interval} seconds, by a write
    nobody waits for, and never by more than C{max_pending} writes at once: a
    skipped update only makes C{last_seen} a little older, which is worth
    less than a pool connection under load.

    @param write: updates one agent's C{last_seen}; its failures are logged
        and the write is tried again after the interval.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        write: Callable[[str], Awaitable[None]],
        interval: float = 60.0,
        max_pending: int = 2,
        max_tracked: int = 10_000,
    ) -> None:
        self._clock = clock
        self._write = write
        self.interval = interval
        self.max_pending = max_pending
        self.max_tracked = max_tracked
        self.pending = 0
        self._written: dict[str, float] = {}

    def seen(self, did: str) -> Deferred[None] | None:
        """
        Note that C{did} signed a request now.

        @return: the Deferred of the write started (fires when it is done,
            never with a failure), or C{None} when no write was needed or
            allowed.
        """
        now = self._clock.seconds()
        last = self._written.get(did)
        if last is not None and now - last < self.interval:
            return None
        if self.pending >= self.max_pending:
            return None
        if len(self._written) >= self.max_tracked:
            self._forget_older_than(now - self.interval)
        self._written[did] = now
        self.pending += 1
        done = Deferred.fromCoroutine(self._run(did))
        return done

    async def _run(self, did: str) -> None:
        try:
            await self._write(did)
        except Exception as e:
            # No retry before the interval is up: during a database outage
            # that keeps this to one line per signer per interval.
            self.log.warn(
                "last_seen update failed did={did}: {error}", did=did, error=e
            )
        finally:
            self.pending -= 1

    def _forget_older_than(self, cutoff: float) -> None:
        stale = [did for did, when in self._written.items() if when < cutoff]
        for did in stale:
            del self._written[did]
        if len(self._written) >= self.max_tracked:
            # Every entry is recent: too many signers to track; start over
            # (the cost is one extra write for each of them).
            self._written.clear()


def signer_activity(context: NodeContext) -> SignerActivity:
    """
    The node's L{SignerActivity}, made on first use.
    """
    activity = context.services.get("signer_activity")
    if activity is None:

        async def touch(did: str) -> None:
            try:
                database = context.db
            except ApiError:
                # Not ready yet: nothing to update, and nothing worth a log line.
                return
            await database.execute(
                "UPDATE agents SET last_seen = now() WHERE did = %s", (did,)
            )

        activity = SignerActivity(context.reactor, touch)
        context.services["signer_activity"] = activity
    assert isinstance(activity, SignerActivity)
    return activity


def authenticate_agent(
    request: IRequest, context: NodeContext, route: str, *, required: bool
) -> str | None:
    """
    L{authenticate} the request, then note a signer as seen.

    @return: the signer's full DID, or C{None} for an anonymous request.
    @raise ApiError: as L{authenticate} does.
    """
    signer = authenticate(request, context, route, required=required)
    if signer is not None:
        signer_activity(context).seen(signer)
    return signer


def run_to_completion(work: Coroutine[Any, Any, T]) -> Deferred[T]:
    """
    Start C{work} so that cancelling the returned Deferred (Klein does when
    the client goes away) stops the wait but not the work: a write is either
    done in full or not at all, never abandoned between its steps.

    @return: a Deferred that fires with the work's result.  Once cancelled it
        has failed with C{CancelledError}; the work's own outcome is then
        only logged when it is a failure.
    """
    inner = Deferred.fromCoroutine(work)
    outer: Deferred[T] = Deferred(lambda _: None)

    def settle(result: T | Failure) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)
        elif isinstance(result, Failure) and not result.check(ApiError):
            log.failure("write failed after its client left", result)

    inner.addBoth(settle)
    return outer


# -- Routes ------------------------------------------------------------------


def agent_json(row: Any) -> dict[str, Any]:
    """
    An agents row as the protocol's Agent object, plus the C{model} the agent
    registered with (C{gl agent show} prints it).
    """
    return {
        "did": row["did"],
        "trust_score": float(row["trust_score"]),
        "capabilities": list(row["capabilities"] or []),
        "model": row["model"],
        "registered_at": iso_timestamp(row["registered_at"]),
        "last_seen": iso_timestamp(row["last_seen"]),
        "status": row["status"],
    }


def _path_did(value: str) -> str | None:
    try:
        return full_did(value)
    except InvalidDid:
        return None


def install(app: Klein, context: NodeContext) -> None:
    """
    Add the agent routes to C{app}.
    """

    @app.route("/api/register", methods=["POST"])
    async def register(request: IRequest) -> bytes:
        route = "/api/register"
        request.route_template = route  # type: ignore[attr-defined]
        signer = authenticate_agent(request, context, route, required=True)
        assert signer is not None

        # Everything about the body is checked before it costs a rate-limit
        # hit or a database round trip.
        body = json_body(request)
        claimed = text_member(body, "did", required=True, max_length=200)
        assert claimed is not None
        try:
            did = full_did(claimed)
        except InvalidDid:
            raise bad_request("did must be a did:key (full or short form)") from None
        if did != signer:
            raise forbidden("did must be the DID that signed the request")
        capabilities = text_list_member(
            body,
            "capabilities",
            max_items=MAX_CAPABILITIES,
            max_length=MAX_CAPABILITY_LENGTH,
        )
        model_given = body.get("model") is not None
        model = text_member(body, "model", max_length=MAX_MODEL_LENGTH)

        check_rate(context.limits.per_signer, signer)
        check_rate(context.limits.create, client_ip(request, context))

        row = await run_to_completion(
            _register(context, did, capabilities, model, model_given)
        )
        token, expires = issue_ucan(context.key, did, context.now())
        return write_json(
            request,
            201,
            {
                "status": "accepted",
                "did": did,
                "ucan": token,
                "node": urlsplit(context.public_url()).netloc,
                "expires": iso_timestamp(float(expires)),
                "trust_score": float(row["trust_score"]),
                "capabilities": list(row["capabilities"]),
                "message": "welcome to the network, agent.",
            },
        )

    @app.route("/api/v1/agents", methods=["GET"])
    async def list_agents(request: IRequest) -> bytes:
        route = "/api/v1/agents"
        request.route_template = route  # type: ignore[attr-defined]
        authenticate_agent(request, context, route, required=False)
        raw = request.args.get(b"capability", [None])[0]
        if raw is None:
            rows = await context.db.query(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE status = 'active'"
                " ORDER BY trust_score DESC, registered_at, did"
            )
        else:
            try:
                capability = _check_storable(raw.decode("utf-8"), "capability")
            except UnicodeDecodeError:
                raise bad_request("capability is not UTF-8 text") from None
            rows = await context.db.query(
                f"SELECT {_AGENT_COLUMNS} FROM agents"
                " WHERE status = 'active' AND capabilities ? %s"
                " ORDER BY trust_score DESC, registered_at, did",
                (capability,),
            )
        return write_json(request, 200, {"agents": [agent_json(r) for r in rows]})

    @app.route("/api/v1/agents/<did>", methods=["GET"])
    async def show_agent(request: IRequest, did: str) -> bytes:
        route = "/api/v1/agents/{did}"
        request.route_template = route  # type: ignore[attr-defined]
        authenticate_agent(request, context, route, required=False)
        wanted = _path_did(did)
        rows = []
        if wanted is not None:
            rows = await context.db.query(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE did = %s", (wanted,)
            )
        if not rows:
            raise not_found("no such agent")
        return write_json(request, 200, agent_json(rows[0]))

    @app.route("/api/v1/agents/<did>/trust", methods=["GET"])
    async def show_trust(request: IRequest, did: str) -> bytes:
        route = "/api/v1/agents/{did}/trust"
        request.route_template = route  # type: ignore[attr-defined]
        authenticate_agent(request, context, route, required=False)
        wanted = _path_did(did)
        if wanted is None:
            raise not_found("no such agent: not a did:key")
        rows = await context.db.query(
            "SELECT trust_score, push_count FROM agents WHERE did = %s", (wanted,)
        )
        # An agent this node has never seen has no trust yet; that is an
        # answer, not an error (the reference node says the same).
        score, pushes = (float(rows[0][0]), int(rows[0][1])) if rows else (0.0, 0)
        return write_json(
            request,
            200,
            {
                "did": wanted,
                "trust_score": score,
                "push_count": pushes,
                "level": trust_level(score),
            },
        )

    @app.route("/api/v1/agents/<did>", methods=["DELETE"])
    async def revoke_agent(request: IRequest, did: str) -> bytes:
        route = "/api/v1/agents/{did}"
        request.route_template = route  # type: ignore[attr-defined]
        signer = authenticate_agent(request, context, route, required=True)
        wanted = _path_did(did)
        if wanted is None:
            raise not_found("no such agent: not a did:key")
        if wanted != signer:
            raise forbidden("an agent may only revoke itself")
        rows = await run_to_completion(
            context.db.query(
                "UPDATE agents SET status = 'revoked', last_seen = now()"
                " WHERE did = %s RETURNING did",
                (wanted,),
            )
        )
        if not rows:
            raise not_found("no such agent: it never registered here")
        log.info("agent revoked did={did}", did=wanted)
        request.setResponseCode(204)
        return b""


async def _register(
    context: NodeContext,
    did: str,
    capabilities: list[str] | None,
    model: str | None,
    model_given: bool,
) -> Any:
    """
    Insert or refresh an agent's row: capabilities and model as given (kept
    when not given), C{registered_at} and trust kept, the agent active again
    if it had revoked itself.

    @return: the row.
    """
    rows = await context.db.query(
        "INSERT INTO agents (did, capabilities, model, trust_score, last_seen)"
        " VALUES (%(did)s, COALESCE(%(caps)s::jsonb, '[]'::jsonb), %(model)s,"
        "         %(trust)s, now())"
        " ON CONFLICT (did) DO UPDATE SET"
        "  capabilities = COALESCE(%(caps)s::jsonb, agents.capabilities),"
        "  model = CASE WHEN %(model_given)s THEN %(model)s ELSE agents.model END,"
        "  status = 'active',"
        "  last_seen = now()"
        f" RETURNING {_AGENT_COLUMNS}, (xmax = 0) AS inserted",
        {
            "did": did,
            "caps": None if capabilities is None else json.dumps(capabilities),
            "model": model,
            "model_given": model_given,
            "trust": INITIAL_TRUST,
        },
    )
    row = rows[0]
    log.info(
        "agent {what} did={did} capabilities={capabilities}",
        what="registered" if row["inserted"] else "re-registered",
        did=did,
        capabilities=list(row["capabilities"]),
    )
    return row
