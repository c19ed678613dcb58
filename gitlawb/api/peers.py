"""
Peers, sync and replicas (PROTOCOL.md section 9): the routes other nodes
call, and the ones clients use to see the network.

Acting on a ref update is guarded: an HTTP notify leads to a sync only when
its C{node_did} is a known peer and, when the notify is signed, the signer
is that node (with C{GITLAWB_REQUIRE_SIGNED_PEER_WRITES} it must be
signed).  Anything else is stored, for the record, and refused.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.routing import Rule

from gitlawb.api.agents import text_member
from gitlawb.api.app import (
    NodeContext,
    authenticate,
    check_rate,
    client_ip,
    iso_timestamp,
    json_body,
)
from gitlawb.api.errors import bad_request, forbidden, not_found, write_json
from gitlawb.db.pool import Database
from gitlawb.git.smart_http import resolve_repo
from gitlawb.identity.keys import InvalidDid, full_did
from gitlawb.peers import (
    Peer,
    PeerAddressRefused,
    PeerClient,
    PeerError,
    get_peer,
    list_peers,
    normalise_peer_url,
    record_peer,
    record_reachability,
)
from gitlawb.sync import (
    InvalidRefUpdate,
    enqueue_ref_update,
    queue_peer_repositories,
)

__all__ = ["install", "peer_client"]

log = Logger()

#: Ref updates listed at most by C{GET /api/v1/events/ref-updates}.
MAX_EVENTS = 200
DEFAULT_EVENTS = 50


def peer_client(context: NodeContext) -> PeerClient:
    """
    The node's L{PeerClient} (C{context.services["peer_client"]}), made on
    first use from the settings when the node did not provide one.
    """
    client = context.services.get("peer_client")
    if client is None:
        client = PeerClient(
            context.reactor,
            context.key,
            timeout=context.settings.peer_timeout_secs,
            allow_private=context.settings.allow_private_peers,
        )
        context.services["peer_client"] = client
    assert isinstance(client, PeerClient)
    return client


def peer_json(peer: Peer) -> dict[str, Any]:
    return {
        "did": peer.did,
        "http_url": peer.http_url,
        "last_seen": iso_timestamp(peer.last_seen),
        "reachable": peer.reachable,
    }


def event_json(row: Any) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "node_did": row["node_did"],
        "pusher_did": row["pusher_did"],
        "repo": row["repo"],
        "ref_name": row["ref_name"],
        # `gl node status` (0.7.1) reads the ref from "ref", not "ref_name".
        "ref": row["ref_name"],
        "old_sha": row["old_sha"],
        "new_sha": row["new_sha"],
        "timestamp": row["timestamp"],
        "cert_id": row["cert_id"],
        "received_at": iso_timestamp(row["received_at"]),
        "from_peer": row["from_peer"],
        "owner_did": row["owner_did"],
        "verified": bool(row["verified"]),
    }


def _did_member(body: dict[str, Any], name: str) -> str:
    value = text_member(body, name, required=True, max_length=200)
    assert value is not None
    try:
        return full_did(value)
    except (InvalidDid, ValueError):
        raise bad_request(f"{name} must be a did:key (full or short form)") from None


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def _has_route(app: Klein, rule: str, method: str) -> bool:
    """
    Whether another area already routes C{method} on C{rule} (variable names
    aside).
    """

    def shape(text: str) -> str:
        parts = text.split("/")
        return "/".join("<>" if p.startswith("<") else p for p in parts)

    wanted = shape(rule)
    for existing in app.url_map.iter_rules():
        assert isinstance(existing, Rule)
        if shape(existing.rule) == wanted and method in (existing.methods or ()):
            return True
    return False


def install(app: Klein, context: NodeContext) -> None:
    """
    Add the peer, sync, event and replica routes to C{app}.
    """
    settings = context.settings

    @app.route("/api/v1/peers", methods=["GET"])
    async def peers(request: IRequest) -> bytes:
        route = "/api/v1/peers"
        request.route_template = route  # type: ignore[attr-defined]
        authenticate(request, context, route, required=False)
        known = await list_peers(context.db)
        return write_json(
            request,
            200,
            {"peers": [peer_json(p) for p in known], "count": len(known)},
        )

    @app.route("/api/v1/peers/announce", methods=["POST"])
    async def announce(request: IRequest) -> bytes:
        route = "/api/v1/peers/announce"
        request.route_template = route  # type: ignore[attr-defined]
        check_rate(context.limits.peer_writes, client_ip(request, context))
        signer = authenticate(
            request, context, route, required=settings.require_signed_peer_writes
        )
        body = json_body(request)
        did = _did_member(body, "did")
        raw_url = text_member(body, "http_url", required=True, max_length=2048)
        assert raw_url is not None
        repo_count = body.get("repo_count")
        if repo_count is not None and (
            not isinstance(repo_count, int)
            or isinstance(repo_count, bool)
            or not 0 <= repo_count < 2**31
        ):
            raise bad_request("repo_count must be a whole number, 0 or more")
        if signer is not None and signer != did:
            raise forbidden("did must be the DID that signed the announce")
        try:
            http_url = normalise_peer_url(
                raw_url, allow_private=settings.allow_private_peers
            )
        except PeerAddressRefused as e:
            raise bad_request(str(e)) from None
        own_url = context.public_url()
        if did == context.key.did or _same_url(http_url, own_url):
            raise bad_request("a node cannot announce itself to itself")

        recorded = await record_peer(
            context.db, did, http_url, signed=signer is not None, repo_count=repo_count
        )
        if not recorded:
            raise forbidden(
                "this peer's URL was announced with its signature; only a signed"
                " announce may change it"
            )
        rows = await context.db.query("SELECT count(*) FROM peers")
        log.info(
            "peer announced did={did} url={url} signed={signed}",
            did=did,
            url=http_url,
            signed=signer is not None,
        )
        return write_json(
            request,
            200,
            {
                "status": "accepted",
                "node_did": context.key.did,
                "node_url": own_url,
                "peer_count": int(rows[0][0]),
                "message": f"peer {did} registered",
            },
        )

    @app.route("/api/v1/peers/<did>/ping", methods=["GET"])
    async def ping(request: IRequest, did: str) -> bytes:
        route = "/api/v1/peers/{did}/ping"
        request.route_template = route  # type: ignore[attr-defined]
        authenticate(request, context, route, required=False)
        try:
            wanted = full_did(did)
        except (InvalidDid, ValueError):
            raise not_found("no such peer: not a did:key") from None
        peer = await get_peer(context.db, wanted)
        if peer is None:
            raise not_found("no such peer")
        # Each ping costs an outbound call: counted like the other peer writes.
        check_rate(context.limits.peer_writes, client_ip(request, context))
        reachable = await peer_client(context).is_healthy(peer.http_url)
        await record_reachability(context.db, peer.did, reachable)
        return write_json(
            request,
            200,
            {"did": peer.did, "http_url": peer.http_url, "reachable": reachable},
        )

    @app.route("/api/v1/sync/notify", methods=["POST"])
    async def notify(request: IRequest) -> bytes:
        route = "/api/v1/sync/notify"
        request.route_template = route  # type: ignore[attr-defined]
        ip = client_ip(request, context)
        check_rate(context.limits.peer_writes, ip)
        signer = authenticate(
            request, context, route, required=settings.require_signed_peer_writes
        )
        body = json_body(request)
        db = context.db

        # Who may be acted on: a known peer, speaking for itself.
        node_did = _did_member(body, "node_did")
        peer = await get_peer(db, node_did)
        refusal: str | None = None
        if peer is None or node_did == context.key.did:
            refusal = "node_did is not a known peer; announce it first"
        elif signer is not None and signer != node_did:
            refusal = "the notify is not signed by node_did"

        try:
            intake = await enqueue_ref_update(
                db,
                body,
                signer or f"http:{ip}",
                refusal is None,
                auto_sync=settings.auto_sync,
                local_did=context.key.did,
            )
        except InvalidRefUpdate as e:
            raise bad_request(str(e)) from None
        if refusal is not None:
            log.warn(
                "unverified ref update stored, not acted on node={node} repo={repo}"
                " from={source} reason={reason}",
                node=node_did,
                repo=intake.update["repo"],
                source=signer or ip,
                reason=refusal,
            )
            raise forbidden(refusal)
        # A duplicate was acted on when it first came.
        queued = intake.queued or not intake.new
        return write_json(
            request,
            200,
            {"status": "ok", "queued": queued, "repo": intake.update["repo"]}
            | ({} if queued or intake.reason is None else {"reason": intake.reason}),
        )

    @app.route("/api/v1/sync/trigger", methods=["POST"])
    async def trigger(request: IRequest) -> bytes:
        route = "/api/v1/sync/trigger"
        request.route_template = route  # type: ignore[attr-defined]
        check_rate(context.limits.sync_trigger, client_ip(request, context))
        authenticate(request, context, route, required=True)
        db = context.db
        known = [p for p in await list_peers(db) if p.did != context.key.did]
        if not settings.auto_sync:
            return write_json(
                request,
                200,
                {
                    "status": "ok",
                    "peers_reached": 0,
                    "repos_enqueued": 0,
                    "message": "automatic sync is off on this node",
                },
            )
        reached, queued = await _queue_from_peers(db, peer_client(context), known)
        return write_json(
            request,
            200,
            {
                "status": "ok",
                "peers_reached": reached,
                "repos_enqueued": queued,
                "message": (
                    f"queued {queued} repositories from {reached} of {len(known)} peers"
                ),
            },
        )

    @app.route("/api/v1/events/ref-updates", methods=["GET"])
    async def ref_updates(request: IRequest) -> bytes:
        route = "/api/v1/events/ref-updates"
        request.route_template = route  # type: ignore[attr-defined]
        authenticate(request, context, route, required=False)
        limit = _limit(request)
        rows = await context.db.query(
            "SELECT id, node_did, pusher_did, repo, owner_did, ref_name, old_sha,"
            ' new_sha, "timestamp", cert_id, from_peer, verified, received_at'
            " FROM ref_updates_received ORDER BY id DESC LIMIT %s",
            (limit,),
        )
        events = [event_json(row) for row in rows]
        return write_json(request, 200, {"events": events, "count": len(events)})

    @app.route("/api/v1/repos/<owner>/<repo>/replicas", methods=["PUT"])
    async def register_replica(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/replicas"
        request.route_template = route  # type: ignore[attr-defined]
        check_rate(context.limits.peer_writes, client_ip(request, context))
        signer = authenticate(request, context, route, required=True)
        assert signer is not None
        body = json_body(request)
        raw_url = text_member(body, "url", required=True, max_length=2048)
        assert raw_url is not None
        try:
            url = normalise_peer_url(
                raw_url, allow_private=settings.allow_private_peers
            )
        except PeerAddressRefused as e:
            raise bad_request(str(e)) from None
        if await get_peer(context.db, signer) is None:
            raise forbidden("only a known peer node may register a replica")
        resolved = await resolve_repo(
            context, context.services["store"], owner, repo, signer
        )
        added, count = await context.db.transaction(
            _register_replica, resolved.ref.id, url, signer
        )
        if added is None:
            raise forbidden("that URL is registered as another node's replica")
        return write_json(
            request,
            200,
            {
                "status": "ok",
                "added": added,
                "repo": resolved.ref.slug,
                "replica_did": signer,
                "replica_url": url,
                "replica_count": count,
            },
        )

    @app.route("/api/v1/repos/<owner>/<repo>/replicas", methods=["DELETE"])
    async def unregister_replica(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/replicas"
        request.route_template = route  # type: ignore[attr-defined]
        check_rate(context.limits.peer_writes, client_ip(request, context))
        signer = authenticate(request, context, route, required=True)
        resolved = await resolve_repo(
            context, context.services["store"], owner, repo, signer
        )
        rows = await context.db.query(
            "DELETE FROM replicas WHERE repo_id = %s AND node_did = %s RETURNING url",
            (resolved.ref.id, signer),
        )
        count = await context.db.query(
            "SELECT count(*) FROM replicas WHERE repo_id = %s", (resolved.ref.id,)
        )
        return write_json(
            request,
            200,
            {
                "status": "ok",
                "removed": bool(rows),
                "repo": resolved.ref.slug,
                "replica_count": int(count[0][0]),
            },
        )

    if not _has_route(app, "/api/v1/repos/<owner>/<repo>/replicas", "GET"):

        @app.route("/api/v1/repos/<owner>/<repo>/replicas", methods=["GET"])
        async def replicas(request: IRequest, owner: str, repo: str) -> bytes:
            route = "/api/v1/repos/{owner}/{repo}/replicas"
            request.route_template = route  # type: ignore[attr-defined]
            viewer = authenticate(request, context, route, required=False)
            resolved = await resolve_repo(
                context, context.services["store"], owner, repo, viewer
            )
            rows = await context.db.query(
                "SELECT url, node_did, registered_at, updated_at FROM replicas"
                " WHERE repo_id = %s ORDER BY registered_at, url",
                (resolved.ref.id,),
            )
            listed = [
                {
                    "replica_did": row["node_did"],
                    "replica_url": row["url"],
                    "registered_at": iso_timestamp(row["registered_at"]),
                    "updated_at": iso_timestamp(row["updated_at"]),
                }
                for row in rows
            ]
            return write_json(
                request,
                200,
                {
                    "repo": resolved.ref.slug,
                    "replica_count": len(listed),
                    "replicas": listed,
                },
            )


def _limit(request: IRequest) -> int:
    raw = request.args.get(b"limit", [None])[0]
    if raw is None or raw == b"":
        return DEFAULT_EVENTS
    try:
        value = int(raw)
    except ValueError:
        raise bad_request("limit must be a whole number") from None
    if not 1 <= value <= MAX_EVENTS:
        raise bad_request(f"limit must be from 1 to {MAX_EVENTS}")
    return value


async def _register_replica(
    cursor: Any, repo_id: str, url: str, node_did: str
) -> tuple[bool | None, int]:
    """
    Record C{node_did}'s replica of a repository at C{url}, replacing any
    other URL it had registered for it.

    @return: whether the row is new (C{None} when the URL belongs to another
        node's registration), and the repository's replica count.
    """
    await cursor.execute(
        "DELETE FROM replicas WHERE repo_id = %s AND node_did = %s AND url <> %s",
        (repo_id, node_did, url),
    )
    await cursor.execute(
        "INSERT INTO replicas (repo_id, url, node_did) VALUES (%s, %s, %s)"
        " ON CONFLICT (repo_id, url) DO UPDATE SET"
        "  node_did = EXCLUDED.node_did, updated_at = now()"
        " WHERE replicas.node_did IS NULL OR replicas.node_did = EXCLUDED.node_did"
        " RETURNING (xmax = 0) AS added",
        (repo_id, url, node_did),
    )
    row = cursor.fetchone()
    added = None if row is None else bool(row[0])
    await cursor.execute("SELECT count(*) FROM replicas WHERE repo_id = %s", (repo_id,))
    count = cursor.fetchone()
    return added, int(count[0])


async def _queue_from_peers(
    db: Database, client: PeerClient, peers: list[Peer]
) -> tuple[int, int]:
    """
    Queue every peer's repositories, asking all peers at once.

    @return: how many peers answered, and how many repositories were queued.
    """

    async def one(peer: Peer) -> int | None:
        try:
            return await queue_peer_repositories(db, client, peer)
        except PeerError as e:
            log.info(
                "sync trigger: peer {did} not listed: {error}", did=peer.did, error=e
            )
        except Exception:
            log.failure("sync trigger: queueing peer {did} failed", did=peer.did)
        return None

    outcomes = await gatherResults([Deferred.fromCoroutine(one(p)) for p in peers])
    answered = [count for count in outcomes if count is not None]
    reached, queued = len(answered), sum(answered)
    return reached, queued
