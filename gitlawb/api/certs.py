"""
Ref-update certificates (PROTOCOL.md section 7): one per repository and ref,
replaced by newer pushes, signed by this node.
"""

from __future__ import annotations

import uuid
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from gitlawb.api.app import NodeContext, authenticate
from gitlawb.api.errors import ApiError, write_json
from gitlawb.git.smart_http import resolve_repo

MAX_LIMIT = 200


def certificate_json(row: Any) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "repo_id": str(row["repo_id"]),
        "ref_name": row["ref_name"],
        "old_sha": row["old_sha"],
        "new_sha": row["new_sha"],
        "pusher_did": row["pusher_did"],
        "node_did": row["node_did"],
        "signature": row["signature"],
        "issued_at": row["issued_at"],
    }


def _limit(request: IRequest) -> int:
    raw = request.args.get(b"limit", [b"50"])[0]
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError("bad_request", "limit must be a whole number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError("bad_request", f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def install(app: Klein, context: NodeContext) -> None:
    store = context.services["store"]

    @app.route("/api/v1/repos/<owner>/<repo>/certs", methods=["GET"])
    async def list_certificates(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/certs"
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate(request, context, route, required=False)
        limit = _limit(request)
        # An id prefix: `gl cert show REPO ID` with a short ID (as `gl cert
        # list` prints) looks the certificate up with ?prefix=ID and uses the
        # one match.
        prefix = request.args.get(b"prefix", [b""])[0].decode("utf-8", "replace")
        found = await resolve_repo(context, store, owner, repo, viewer)
        rows = await context.db.query(
            "SELECT * FROM ref_certificates WHERE repo_id = %s"
            " AND starts_with(id::text, lower(%s)) ORDER BY issued_at DESC, ref_name"
            " LIMIT %s",
            (found.ref.id, prefix, limit),
        )
        certificates = [certificate_json(row) for row in rows]
        return write_json(
            request, 200, {"certificates": certificates, "count": len(certificates)}
        )

    @app.route("/api/v1/repos/<owner>/<repo>/certs/<cert_id>", methods=["GET"])
    async def get_certificate(
        request: IRequest, owner: str, repo: str, cert_id: str
    ) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/certs/{id}"
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate(request, context, route, required=False)
        found = await resolve_repo(context, store, owner, repo, viewer)
        try:
            wanted = str(uuid.UUID(cert_id))
        except ValueError:
            raise ApiError("not_found", "no such certificate") from None
        rows = await context.db.query(
            "SELECT * FROM ref_certificates WHERE repo_id = %s AND id = %s",
            (found.ref.id, wanted),
        )
        if not rows:
            raise ApiError("not_found", "no such certificate")
        return write_json(request, 200, certificate_json(rows[0]))
