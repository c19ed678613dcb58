"""
The Klein application: the JSON API and git smart HTTP on one port.

Routes are grouped by area in modules of this package; each has an
C{install(app, context)} that adds its routes.  This module holds what they
share: the L{NodeContext}, reading bodies, the caller's identity, rate limits
and the error handlers that keep every answer in the protocol's shape.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import psycopg2
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from gitlawb import __version__, metrics
from gitlawb.api.errors import ApiError, write_error
from gitlawb.config import Settings
from gitlawb.db.pool import Database
from gitlawb.db.service import DatabaseService, DatabaseUnavailable
from gitlawb.identity.keys import NodeKey, full_did
from gitlawb.identity.signatures import (
    NOT_AN_AGENT_HEADERS,
    REGISTER_HINT,
    ReplayGuard,
    SignatureError,
    VerifiedRequest,
    verify_signed_request,
)
from gitlawb.jsontools import JsonTooDeep, parse_json
from gitlawb.ratelimit import RateLimiter

log = Logger()

# JSON routes take bodies of at most this many bytes (413 above).
MAX_JSON_BODY = 2 * 1024 * 1024


@dataclass
class RateLimits:
    per_signer: RateLimiter
    create: RateLimiter
    push: RateLimiter
    sync_trigger: RateLimiter
    peer_writes: RateLimiter

    @classmethod
    def from_settings(cls, settings: Settings, clock: IReactorTime) -> RateLimits:
        return cls(
            per_signer=RateLimiter("per_signer", settings.signer_rate_limit, clock),
            create=RateLimiter("create", settings.create_rate_limit, clock),
            push=RateLimiter("push", settings.push_rate_limit, clock),
            sync_trigger=RateLimiter(
                "sync_trigger", settings.sync_trigger_rate_limit, clock
            ),
            peer_writes=RateLimiter(
                "peer_writes", settings.peer_write_rate_limit, clock
            ),
        )

    def all(self) -> list[RateLimiter]:
        return [
            self.per_signer,
            self.create,
            self.push,
            self.sync_trigger,
            self.peer_writes,
        ]


@dataclass
class NodeContext:
    """
    Everything a route may need, built once by the node.

    @ivar public_url: returns the URL clients reach this node at (known only
        once the port is bound when the configured port is 0).
    @ivar p2p_info: returns the body of C{GET /api/v1/p2p/info}.
    @ivar services: other parts of the node routes talk to (the git layer,
        the outbox notifier ...), by name.
    """

    settings: Settings
    key: NodeKey
    database_service: DatabaseService
    reactor: Any
    replay: ReplayGuard
    limits: RateLimits
    public_url: Callable[[], str]
    p2p_info: Callable[[], dict[str, Any]] = lambda: {"enabled": False}
    version: str = __version__
    services: dict[str, Any] = field(default_factory=dict)

    @property
    def db(self) -> Database:
        """
        The database pool.

        @raise ApiError: 503 C{db_unavailable} while it is not ready.
        """
        try:
            return self.database_service.database
        except DatabaseUnavailable:
            raise ApiError(
                "db_unavailable", "the database is not available yet"
            ) from None

    def now(self) -> float:
        return float(self.reactor.seconds())


def client_ip(request: IRequest, context: NodeContext) -> str:
    """
    The client's address: the TCP peer, or behind a trusted proxy the rightmost
    C{X-Forwarded-For} entry (the one the proxy itself added).
    """
    if context.settings.trusted_proxy:
        forwarded = request.getHeader(b"x-forwarded-for")
        if forwarded:
            last = str(forwarded.decode("latin-1")).split(",")[-1].strip()
            if last:
                return last
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "unknown"))


def check_rate(limiter: RateLimiter, key: str) -> None:
    """
    Count one hit on C{limiter}.

    @raise ApiError: 429 C{rate_limited} with C{Retry-After} when over.
    """
    retry_after = limiter.hit(key)
    if retry_after is not None:
        raise ApiError(
            "rate_limited",
            f"rate limit exceeded; retry in {int(retry_after)} s",
            headers={"Retry-After": str(int(retry_after))},
        )


def read_body(request: IRequest) -> bytes:
    """
    The request body (already spooled whole by twisted.web; JSON routes are
    bounded by L{MAX_JSON_BODY} while it arrives).
    """
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read()
    content.seek(0)
    return data


def body_digest(request: IRequest) -> str | None:
    """
    The C{Content-Digest} value of the request body, computed in chunks from
    the spooled body, or C{None} when the request has no body.
    """
    content = request.content
    if content is None:
        return None
    content.seek(0)
    digest = hashlib.sha256()
    size = 0
    while chunk := content.read(65536):
        digest.update(chunk)
        size += len(chunk)
    content.seek(0)
    if size == 0:
        return None
    return "sha-256=:" + base64.b64encode(digest.digest()).decode() + ":"


def json_body(request: IRequest) -> dict[str, Any]:
    """
    The request body parsed as a JSON object.

    @raise ApiError: 400 when it is not JSON or not an object.
    """
    raw = read_body(request)
    if not raw.strip():
        return {}
    try:
        value = parse_json(raw)
    except JsonTooDeep as e:
        raise ApiError("bad_request", str(e)) from None
    except (UnicodeDecodeError, ValueError):
        raise ApiError("bad_request", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError("bad_request", "the body must be a JSON object")
    return value


def authenticate(
    request: IRequest, context: NodeContext, route: str, *, required: bool
) -> str | None:
    """
    Verify the request's signature (PROTOCOL.md section 2).

    A request without signature headers is anonymous (C{None}) when the route
    does not require one; when either header is present the signature is
    verified in full.

    @param route: the route template, for the auth metrics.
    @return: the signer's full DID, or C{None} for an anonymous request.
    @raise ApiError: with the status and code of the failed check.
    """
    has_input = request.getHeader(b"signature-input") is not None
    has_signature = request.getHeader(b"signature") is not None
    if not required and not has_input and not has_signature:
        return None

    def header(name: str) -> str | None:
        value = request.getHeader(name.lower().encode("ascii"))
        return None if value is None else value.decode("latin-1")

    method = request.method.decode("ascii", "replace").upper()
    target = request.uri.decode("latin-1")
    digest = body_digest(request)

    def verify(signed_target: str) -> VerifiedRequest:
        return verify_signed_request(
            method=method,
            target=signed_target,
            headers=header,
            body_digest=digest,
            now=context.now(),
            replay=context.replay,
        )

    try:
        try:
            verified = verify(target)
        except SignatureError as e:
            # gl 0.7.1 signs the path before percent-encoding it; for such a
            # target the decoded form is what the client signed.  Nothing is
            # remembered by a failed verification, so trying twice is safe.
            decoded = unquote(target)
            if e.code != "invalid_signature" or e.status != 401 or decoded == target:
                raise
            verified = verify(decoded)
    except SignatureError as e:
        metrics.record_auth(route, e.code)
        headers: dict[str, str] = {}
        extra: dict[str, Any] = {}
        if e.code == "not_an_agent":
            headers = dict(NOT_AN_AGENT_HEADERS)
            extra = {"hint": REGISTER_HINT}
        if e.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(e.retry_after)))
        raise ApiError(e.code, e.message, e.status, headers, extra) from None
    metrics.record_auth(route, None)
    signer: str = full_did(verified.signer_did)
    return signer


def build_app(context: NodeContext) -> Klein:
    """
    The node's Klein application with every area's routes installed.
    """
    from gitlawb.api import meta

    app = Klein()
    meta.install(app, context)
    for installer in context.services.get("route_installers", []):
        installer(app, context)
    install_error_handlers(app)
    return app


def install_error_handlers(app: Klein) -> None:
    """
    Answer every error in the protocol's JSON shape: the API's own errors,
    unknown routes, wrong methods, and anything unexpected (500, logged).
    """

    @app.handle_errors(ApiError)
    def api_error(request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        return write_error(request, error)

    @app.handle_errors(NotFound)
    def no_route(request: IRequest, failure: Failure) -> bytes:
        return write_error(request, ApiError("not_found", "no such route"))

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        allowed = ", ".join(getattr(error, "valid_methods", None) or [])
        headers = {"Allow": allowed} if allowed else {}
        return write_error(
            request,
            ApiError("method_not_allowed", "method not allowed", 405, headers),
        )

    @app.handle_errors(HTTPException)
    def http_error(request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        code = error.code or 400
        return write_error(request, ApiError("bad_request", str(error.name), code))

    @app.handle_errors(psycopg2.OperationalError, psycopg2.InterfaceError)
    def database_down(request: IRequest, failure: Failure) -> bytes:
        log.warn(
            "database unavailable on {method} {path}: {error}",
            method=request.method,
            path=request.path,
            error=str(failure.value).strip(),
        )
        return write_error(
            request,
            ApiError("db_unavailable", "the database is not available"),
        )

    @app.handle_errors(Exception)
    def unexpected(request: IRequest, failure: Failure) -> bytes:
        log.failure(
            "unhandled error on {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return write_error(request, ApiError("internal_error", "internal error"))


def iso_timestamp(value: Any) -> str | None:
    """
    A database timestamp in the protocol's one RFC 3339 form, or C{None}.
    """
    if value is None:
        return None
    from gitlawb.identity.tokens import format_timestamp

    return format_timestamp(value)
