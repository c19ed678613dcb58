"""
Webhook management (PROTOCOL.md section 8): creating, listing and deleting a
repository's hooks, and for its owner the record of their deliveries, with
redelivery.

Every route is the repository owner's: anyone else gets 403 C{forbidden}
(404 C{repo_not_found} when the repository is private, as everywhere).  A
hook's secret is write-only: every answer, the create answer included, shows
C{"***"} for a hook that has one and C{null} for one that has not.  The client
that set it already knows it, and an answer is the kind of thing that ends up
in logs and terminal scrollback.

URLs are checked with L{check_public_url} before a hook is stored: public
http(s) only (after DNS), unless the operator allows private targets.  The
dispatcher checks again at every attempt.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from gitlawb.api.agents import run_to_completion, text_list_member, text_member
from gitlawb.api.app import NodeContext, authenticate, iso_timestamp, json_body
from gitlawb.api.errors import ApiError, bad_request, forbidden, not_found, write_json
from gitlawb.git.smart_http import ResolvedRepo, resolve_repo
from gitlawb.webhooks import MAX_URL_LENGTH, WebhookUrlError, check_public_url

__all__ = ["MAX_HOOKS_PER_REPO", "delivery_json", "hook_json", "install"]

#: Hooks one repository may have: every push sends one delivery per hook.
MAX_HOOKS_PER_REPO = 20

MAX_SECRET_LENGTH = 256
MAX_EVENTS = 32
MAX_EVENT_LENGTH = 100
MAX_DELIVERIES_LIMIT = 200

# Event names: "*", "push", "pull_request.opened" ...
_EVENT = re.compile(r"[A-Za-z0-9_.*-]+")

_DELIVERY_STATUSES = ("pending", "delivered", "failed")

_HOOK_COLUMNS = "id, repo_id, url, secret, events, created_by_did, created_at, active"
_DELIVERY_COLUMNS = (
    "id, webhook_id, event, status, attempts, last_status_code, last_error,"
    " next_attempt_at, created_at, delivered_at,"
    " (claimed_until IS NOT NULL AND claimed_until > now()) AS in_flight"
)


def hook_json(row: Any) -> dict[str, Any]:
    """
    A webhooks row as the protocol's hook object, its secret masked.
    """
    return {
        "id": str(row["id"]),
        "repo_id": str(row["repo_id"]),
        "url": row["url"],
        "secret": "***" if row["secret"] else None,
        "events": list(row["events"] or []),
        "created_by_did": row["created_by_did"],
        "created_at": iso_timestamp(row["created_at"]),
        "active": bool(row["active"]),
    }


def delivery_json(row: Any) -> dict[str, Any]:
    """
    A webhook_deliveries row as the owner sees it (the payload is not
    repeated).  C{next_attempt_at} is C{null} once the delivery is settled.
    """
    pending = row["status"] == "pending"
    return {
        "id": str(row["id"]),
        "webhook_id": str(row["webhook_id"]),
        "event": row["event"],
        "status": row["status"],
        "attempts": int(row["attempts"]),
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "next_attempt_at": iso_timestamp(row["next_attempt_at"]) if pending else None,
        "in_flight": bool(row["in_flight"]),
        "created_at": iso_timestamp(row["created_at"]),
        "delivered_at": iso_timestamp(row["delivered_at"]),
    }


def _uuid_or_404(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise not_found(f"no such {what}") from None


def _events(body: dict[str, Any]) -> list[str]:
    events = text_list_member(
        body, "events", max_items=MAX_EVENTS, max_length=MAX_EVENT_LENGTH
    )
    if events is None:
        return ["*"]
    if not events:
        raise bad_request('events must name at least one event ("*" for all)')
    for event in events:
        if not _EVENT.fullmatch(event):
            raise bad_request(f"events: {event!r} is not an event name")
    return events


def install(app: Klein, context: NodeContext) -> None:
    """
    Add the webhook routes to C{app}.
    """
    store = context.services["store"]

    async def owned_repo(
        request: IRequest, route: str, owner: str, repo: str
    ) -> tuple[ResolvedRepo, str]:
        # Signed, visible to the signer, and theirs: in that order, so a
        # private repository stays a 404 for everyone else.
        request.route_template = route  # type: ignore[attr-defined]
        signer = authenticate(request, context, route, required=True)
        assert signer is not None
        found = await resolve_repo(context, store, owner, repo, signer)
        if found.ref.owner_did != signer:
            raise forbidden("only the repository owner can manage its webhooks")
        return found, signer

    async def hook_row(repo_id: str, hook_id: str) -> Any:
        rows = await context.db.query(
            f"SELECT {_HOOK_COLUMNS} FROM webhooks WHERE id = %s AND repo_id = %s",
            (_uuid_or_404(hook_id, "webhook"), repo_id),
        )
        if not rows:
            raise not_found("no such webhook")
        return rows[0]

    @app.route("/api/v1/repos/<owner>/<repo>/hooks", methods=["POST"])
    async def create_hook(request: IRequest, owner: str, repo: str) -> bytes:
        found, signer = await owned_repo(
            request, "/api/v1/repos/{owner}/{repo}/hooks", owner, repo
        )

        body = json_body(request)
        url = text_member(body, "url", required=True, max_length=MAX_URL_LENGTH)
        assert url is not None
        url = url.strip()
        secret = text_member(body, "secret", max_length=MAX_SECRET_LENGTH) or None
        events = _events(body)
        try:
            await check_public_url(
                url,
                context.reactor,
                context.settings.allow_private_webhooks,
                timeout=context.settings.webhook_connect_timeout_secs,
            )
        except WebhookUrlError as e:
            raise bad_request(str(e)) from None

        row = await run_to_completion(
            context.db.transaction(
                _insert_hook, found.ref.id, url, secret, events, signer
            )
        )
        return write_json(request, 201, hook_json(row))

    @app.route("/api/v1/repos/<owner>/<repo>/hooks", methods=["GET"])
    async def list_hooks(request: IRequest, owner: str, repo: str) -> bytes:
        found, _ = await owned_repo(
            request, "/api/v1/repos/{owner}/{repo}/hooks", owner, repo
        )
        rows = await context.db.query(
            f"SELECT {_HOOK_COLUMNS} FROM webhooks WHERE repo_id = %s"
            " ORDER BY created_at, id",
            (found.ref.id,),
        )
        hooks = [hook_json(row) for row in rows]
        return write_json(request, 200, {"webhooks": hooks, "count": len(hooks)})

    @app.route("/api/v1/repos/<owner>/<repo>/hooks/<hook_id>", methods=["DELETE"])
    async def delete_hook(
        request: IRequest, owner: str, repo: str, hook_id: str
    ) -> bytes:
        found, _ = await owned_repo(
            request, "/api/v1/repos/{owner}/{repo}/hooks/{id}", owner, repo
        )
        wanted = _uuid_or_404(hook_id, "webhook")
        # Its deliveries go with it (ON DELETE CASCADE); one in flight ends
        # without a row to record into.
        rows = await run_to_completion(
            context.db.query(
                "DELETE FROM webhooks WHERE id = %s AND repo_id = %s RETURNING id",
                (wanted, found.ref.id),
            )
        )
        if not rows:
            raise not_found("no such webhook")
        return write_json(request, 200, {"deleted": True, "id": wanted})

    @app.route(
        "/api/v1/repos/<owner>/<repo>/hooks/<hook_id>/deliveries", methods=["GET"]
    )
    async def list_deliveries(
        request: IRequest, owner: str, repo: str, hook_id: str
    ) -> bytes:
        found, _ = await owned_repo(
            request, "/api/v1/repos/{owner}/{repo}/hooks/{id}/deliveries", owner, repo
        )
        limit = _limit(request)
        status = _status_filter(request)
        hook = await hook_row(found.ref.id, hook_id)
        rows = await context.db.query(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries"
            " WHERE webhook_id = %s AND (%s::text IS NULL OR status = %s)"
            " ORDER BY created_at DESC, id LIMIT %s",
            (hook["id"], status, status, limit),
        )
        deliveries = [delivery_json(row) for row in rows]
        return write_json(
            request, 200, {"deliveries": deliveries, "count": len(deliveries)}
        )

    @app.route(
        "/api/v1/repos/<owner>/<repo>/hooks/<hook_id>/deliveries/<delivery_id>"
        "/redeliver",
        methods=["POST"],
    )
    async def redeliver(
        request: IRequest, owner: str, repo: str, hook_id: str, delivery_id: str
    ) -> bytes:
        found, _ = await owned_repo(
            request,
            "/api/v1/repos/{owner}/{repo}/hooks/{id}/deliveries/{delivery}/redeliver",
            owner,
            repo,
        )
        hook = await hook_row(found.ref.id, hook_id)
        wanted = _uuid_or_404(delivery_id, "delivery")

        # A fresh start: pending, due now, attempts from zero (the maximum
        # age still counts from the push).  Not while an attempt is under
        # way: that one would be recorded over this reset.
        rows = await run_to_completion(
            context.db.query(
                "UPDATE webhook_deliveries SET status = 'pending', attempts = 0,"
                " next_attempt_at = now(), delivered_at = NULL,"
                " claimed_until = NULL"
                " WHERE id = %s AND webhook_id = %s"
                " AND (claimed_until IS NULL OR claimed_until <= now())"
                f" RETURNING {_DELIVERY_COLUMNS}",
                (wanted, hook["id"]),
            )
        )
        if not rows:
            exists = await context.db.query(
                "SELECT 1 FROM webhook_deliveries WHERE id = %s AND webhook_id = %s",
                (wanted, hook["id"]),
            )
            if not exists:
                raise not_found("no such delivery")
            raise bad_request(
                "the delivery is being sent right now; ask again once the"
                " attempt has ended"
            )
        dispatcher = context.services.get("webhooks")
        if dispatcher is not None:
            dispatcher.wake()
        return write_json(request, 200, delivery_json(rows[0]))


async def _insert_hook(
    cursor: Any,
    repo_id: str,
    url: str,
    secret: str | None,
    events: list[str],
    signer: str,
) -> Any:
    # The repository row is locked so that two creates at once cannot both
    # pass the count.
    await cursor.execute("SELECT id FROM repos WHERE id = %s FOR UPDATE", (repo_id,))
    if cursor.fetchone() is None:
        raise ApiError("repo_not_found", "repository not found")
    await cursor.execute("SELECT count(*) FROM webhooks WHERE repo_id = %s", (repo_id,))
    if cursor.fetchone()[0] >= MAX_HOOKS_PER_REPO:
        raise bad_request(
            f"a repository can have at most {MAX_HOOKS_PER_REPO} webhooks"
        )
    await cursor.execute(
        "INSERT INTO webhooks (id, repo_id, url, secret, events, created_by_did)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        f" RETURNING {_HOOK_COLUMNS}",
        (str(uuid.uuid4()), repo_id, url, secret, json.dumps(events), signer),
    )
    return cursor.fetchone()


def _limit(request: IRequest) -> int:
    raw = request.args.get(b"limit", [b"50"])[0]
    try:
        limit = int(raw)
    except ValueError:
        raise bad_request("limit must be a whole number") from None
    if not 1 <= limit <= MAX_DELIVERIES_LIMIT:
        raise bad_request(f"limit must be between 1 and {MAX_DELIVERIES_LIMIT}")
    return limit


def _status_filter(request: IRequest) -> str | None:
    raw: str = request.args.get(b"status", [b""])[0].decode("utf-8", "replace")
    if not raw:
        return None
    if raw not in _DELIVERY_STATUSES:
        raise bad_request("status must be pending, delivered or failed")
    return raw
