"""Tests for gitlawb.identity.tokens: UCANs, ref certificates, timestamps."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from nacl.signing import VerifyKey

from gitlawb.identity.keys import NodeKey
from gitlawb.identity.tokens import (
    UCAN_LIFETIME,
    certificate_signing_bytes,
    format_timestamp,
    issue_ucan,
    sign_certificate,
    verify_certificate,
)

NODE = NodeKey.from_seed(bytes(range(32)))
AGENT = NodeKey.from_seed(bytes(range(1, 33)))
NOW = 1796311673.25

CERT: dict[str, Any] = {
    "new": "b" * 40,
    "old": "a" * 40,
    "pusher": AGENT.did,
    "ref": "refs/heads/übung",
    "repo_id": "3f1c0f9e-2b1e-4c39-9d0e-0a3b2c1d4e5f",
    "ts": "2026-12-03T15:26:00.123456+00:00",
}


def b64url_decode(text: str) -> bytes:
    """Decode base64url without padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- UCAN --------------------------------------------------------------------


def test_ucan_payload_keys_in_order() -> None:
    """The payload keys come as ucan, iss, aud, att, exp, prf."""
    token, _ = issue_ucan(NODE, AGENT.did, NOW)

    payload = json.loads(token)["payload"]

    assert list(payload) == ["ucan", "iss", "aud", "att", "exp", "prf"]


def test_ucan_payload_values() -> None:
    """The payload names the node, the agent and the join capability."""
    token, exp = issue_ucan(NODE, AGENT.did, NOW)

    payload = json.loads(token)["payload"]

    assert payload == {
        "ucan": "1.0.0",
        "iss": NODE.did,
        "aud": AGENT.did,
        "att": [{"with": "gitlawb://alpha", "can": "network/join"}],
        "exp": exp,
        "prf": [],
    }


def test_ucan_expires_in_30_days() -> None:
    """A UCAN lasts 30 days by default, in whole Unix seconds."""
    _, exp = issue_ucan(NODE, AGENT.did, NOW)

    assert exp == int(NOW + 30 * 86400)
    assert UCAN_LIFETIME == 30 * 86400


def test_ucan_signature_covers_compact_payload() -> None:
    """The signature verifies over the compact payload JSON with the node key."""
    token, _ = issue_ucan(NODE, AGENT.did, NOW)
    parsed = json.loads(token)
    signed = json.dumps(parsed["payload"], separators=(",", ":")).encode()

    VerifyKey(NODE.public_key).verify(signed, b64url_decode(parsed["s"]))

    assert "=" not in parsed["s"]


def test_ucan_is_compact_json() -> None:
    """The token has no whitespace between JSON tokens."""
    token, _ = issue_ucan(NODE, AGENT.did, NOW)

    assert token == json.dumps(json.loads(token), separators=(",", ":"))
    assert token.startswith('{"payload":{"ucan":"1.0.0",')


def test_ucan_audience_from_short_key() -> None:
    """A short key audience is named by its full DID."""
    token, _ = issue_ucan(NODE, AGENT.short, NOW)

    assert json.loads(token)["payload"]["aud"] == AGENT.did


# -- Certificates ------------------------------------------------------------


def test_certificate_bytes_sorted_compact_utf8() -> None:
    """The signed bytes are compact, key-sorted JSON with UTF-8 kept."""
    data = certificate_signing_bytes(node=NODE.did, **CERT)

    expected = (
        '{"new":"' + "b" * 40 + '","node":"' + NODE.did + '","old":"' + "a" * 40 + '",'
        '"pusher":"' + AGENT.did + '","ref":"refs/heads/übung",'
        '"repo_id":"3f1c0f9e-2b1e-4c39-9d0e-0a3b2c1d4e5f",'
        '"ts":"2026-12-03T15:26:00.123456+00:00"}'
    ).encode("utf-8")
    assert data == expected


def test_certificate_integer_repo_id_stays_a_number() -> None:
    """An integer repo id is signed as a JSON number."""
    data = certificate_signing_bytes(node=NODE.did, **{**CERT, "repo_id": 7})

    assert b'"repo_id":7,' in data


def test_certificate_round_trip() -> None:
    """A certificate signed by the node verifies against the node DID."""
    signature = sign_certificate(NODE, **CERT)

    assert verify_certificate(signature, node=NODE.did, **CERT)
    assert "=" not in signature
    assert len(b64url_decode(signature)) == 64


@pytest.mark.parametrize("field", sorted(CERT))
def test_certificate_any_changed_field_fails(field: str) -> None:
    """Changing any signed field breaks the certificate."""
    signature = sign_certificate(NODE, **CERT)
    changed = {**CERT, field: CERT[field] + "x"}

    assert not verify_certificate(signature, node=NODE.did, **changed)


def test_certificate_other_node_fails() -> None:
    """A certificate does not verify against another node's DID."""
    signature = sign_certificate(NODE, **CERT)

    assert not verify_certificate(signature, node=AGENT.did, **CERT)


@pytest.mark.parametrize(
    ("signature", "node"),
    [
        ("", NODE.did),
        ("not base64url!", NODE.did),
        ("A", NODE.did),
        ("AAAA", NODE.did),
        (base64.b64encode(b"\xff" * 64).decode(), NODE.did),
        ("A" * 86, "did:web:example.com"),
    ],
)
def test_certificate_malformed_input_is_false(signature: str, node: str) -> None:
    """Malformed signatures or DIDs give False, never an exception."""
    assert verify_certificate(signature, node=node, **CERT) is False


# -- Timestamps --------------------------------------------------------------


def test_format_timestamp_from_epoch() -> None:
    """Unix seconds become RFC 3339 UTC with six fractional digits."""
    assert format_timestamp(1796311560.123456) == "2026-12-03T15:26:00.123456+00:00"


def test_format_timestamp_whole_second_keeps_microseconds() -> None:
    """A whole second still shows six fractional digits."""
    assert format_timestamp(0) == "1970-01-01T00:00:00.000000+00:00"


def test_format_timestamp_converts_zone() -> None:
    """An aware datetime in another zone is converted to UTC."""
    plus_two = timezone(timedelta(hours=2))
    when = datetime(2026, 12, 3, 17, 26, 0, 5, tzinfo=plus_two)

    assert format_timestamp(when) == "2026-12-03T15:26:00.000005+00:00"


def test_format_timestamp_utc_datetime() -> None:
    """A UTC datetime keeps its value."""
    when = datetime(2026, 12, 3, 15, 26, tzinfo=UTC)

    assert format_timestamp(when) == "2026-12-03T15:26:00.000000+00:00"


def test_format_timestamp_refuses_naive() -> None:
    """A naive datetime is refused because its zone is unknown."""
    with pytest.raises(ValueError):
        format_timestamp(datetime(2026, 12, 3, 15, 26))
