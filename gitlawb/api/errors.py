"""
The protocol's error shape: C{{"error": "<code>", "message": "<text>"}} with
the status from PROTOCOL.md's error table.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

# PROTOCOL.md section 12, plus the codes the HTTP layer itself needs.
STATUS_OF: dict[str, int] = {
    "bad_request": 400,
    "unreadable_body": 400,
    "invalid_json": 400,
    "not_an_agent": 401,
    "invalid_signature": 401,
    "replayed_signature": 401,
    "forbidden": 403,
    "not_found": 404,
    "repo_not_found": 404,
    "method_not_allowed": 405,
    "repo_exists": 409,
    "payload_too_large": 413,
    "rate_limited": 429,
    "git_error": 500,
    "db_error": 500,
    "internal_error": 500,
    "db_unavailable": 503,
    "busy": 503,
    "git_timeout": 504,
}


class ApiError(Exception):
    """
    An answer in the protocol's error shape.

    @ivar status: the HTTP status.
    @ivar code: the C{error} member.
    @ivar message: the C{message} member, for people.
    @ivar headers: extra response headers (C{Retry-After}, ...).
    @ivar extra: extra members of the body (C{hint}, ...).
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS_OF.get(code, 400)
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


def not_found(message: str = "not found") -> ApiError:
    return ApiError("not_found", message)


def repo_not_found() -> ApiError:
    return ApiError("repo_not_found", "repository not found")


def bad_request(message: str) -> ApiError:
    return ApiError("bad_request", message)


def forbidden(message: str) -> ApiError:
    return ApiError("forbidden", message)


def json_bytes(value: Any) -> bytes:
    """
    Compact JSON, UTF-8, as every response of the API is written.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def write_json(request: IRequest, status: int, value: Any) -> bytes:
    """
    Set the status and content type of C{request} and return the JSON body to
    write.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json_bytes(value)


def write_error(request: IRequest, error: ApiError) -> bytes:
    """
    Render C{error} onto C{request}: status, headers, JSON body.
    """
    for name, value in error.headers.items():
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return write_json(request, error.status, error.body())
