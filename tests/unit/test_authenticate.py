"""
authenticate(): the HTTP side of signature verification.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from gitlawb.api.app import authenticate
from gitlawb.api.errors import ApiError
from gitlawb.identity.keys import NodeKey
from gitlawb.identity.signatures import ReplayGuard, sign_request

NOW = 1_796_311_673


class Context:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.replay = ReplayGuard(self.clock)

    def now(self) -> float:
        return self.clock.seconds()


def signed_request(method: bytes, uri: bytes, signed_uri: str, body: bytes) -> Any:
    key = NodeKey.from_seed(bytes(range(32)))
    request = DummyRequest([])
    request.method = method
    request.uri = uri
    request.content = io.BytesIO(body)
    headers = sign_request(key, method.decode(), signed_uri, body, NOW)
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
    return request


def test_percent_encoded_target_signed_decoded() -> None:
    """A path the client signed before percent-encoding it is accepted."""
    request = signed_request(
        b"POST", b"/api/v1/repos/a%20b/x", "/api/v1/repos/a b/x", b"{}"
    )

    signer = authenticate(request, Context(), "/t", required=True)  # type: ignore[arg-type]

    assert signer == NodeKey.from_seed(bytes(range(32))).did


def test_other_target_still_refused() -> None:
    """A signature over another path is refused even with the decoded retry."""
    request = signed_request(
        b"POST", b"/api/v1/repos/a%20b/x", "/api/v1/repos/other", b"{}"
    )

    with pytest.raises(ApiError) as raised:
        authenticate(request, Context(), "/t", required=True)  # type: ignore[arg-type]

    assert (raised.value.status, raised.value.code) == (401, "invalid_signature")
