"""
Node and meta routes (PROTOCOL.md section 3): no authentication.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from gitlawb.api.app import NodeContext
from gitlawb.api.errors import ApiError, write_json
from gitlawb.db.service import DatabaseUnavailable


def install(app: Klein, context: NodeContext) -> None:
    @app.route("/", methods=["GET"])
    def node_info(request: IRequest) -> bytes:
        request.route_template = "/"  # type: ignore[attr-defined]
        p2p = context.p2p_info()
        return write_json(
            request,
            200,
            {
                "name": "gitlawb-node",
                "version": context.version,
                "did": context.key.did,
                "network": "alpha",
                "protocols": ["git-smart-http", "libp2p"],
                "auth": "http-signature-rfc9421",
                "identity": "ed25519",
                "p2p_peer_id": p2p.get("peer_id") if p2p.get("enabled") else None,
            },
        )

    @app.route("/health", methods=["GET"])
    def health(request: IRequest) -> bytes:
        request.route_template = "/health"  # type: ignore[attr-defined]
        return write_json(request, 200, {"status": "ok"})

    @app.route("/ready", methods=["GET"])
    async def ready(request: IRequest) -> bytes:
        request.route_template = "/ready"  # type: ignore[attr-defined]
        try:
            database = context.database_service.database
            await database.query("SELECT 1")
        except (DatabaseUnavailable, Exception):
            return write_json(
                request,
                503,
                {
                    "status": "degraded",
                    "error": "db_unavailable",
                    "message": "the database is not available",
                },
            )
        return write_json(request, 200, {"status": "ready"})

    @app.route("/api/v1/stats", methods=["GET"])
    async def stats(request: IRequest) -> bytes:
        request.route_template = "/api/v1/stats"  # type: ignore[attr-defined]
        rows = await context.db.query(
            "SELECT (SELECT count(*) FROM repos),"
            " (SELECT count(*) FROM agents WHERE status = 'active'),"
            " (SELECT count(*) FROM push_events)"
        )
        repos, agents, pushes = rows[0]
        body: dict[str, Any] = {
            "repos": repos,
            "agents": agents,
            "pushes": pushes,
            "version": context.version,
        }
        return write_json(request, 200, body)

    @app.route("/api/v1/p2p/info", methods=["GET"])
    def p2p_info(request: IRequest) -> bytes:
        request.route_template = "/api/v1/p2p/info"  # type: ignore[attr-defined]
        return write_json(request, 200, context.p2p_info())

    @app.route("/metrics", methods=["GET"])
    def no_metrics(request: IRequest) -> bytes:
        request.route_template = "/metrics"  # type: ignore[attr-defined]
        # Metrics have a listener of their own; the public port never serves them.
        raise ApiError("not_found", "no such route")
