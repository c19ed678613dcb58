"""What the node signs with its own key: UCAN join tokens and ref certificates.

Both carry Ed25519 signatures encoded as base64url without padding, and
both sign compact JSON, so the exact bytes are built here and nowhere else.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gitlawb.identity.keys import InvalidDid, NodeKey, full_did, public_key_from_did

__all__ = [
    "UCAN_LIFETIME",
    "certificate_signing_bytes",
    "format_timestamp",
    "issue_ucan",
    "sign_certificate",
    "verify_certificate",
]

#: How long a UCAN issued at registration lasts, in seconds (30 days).
UCAN_LIFETIME = 30 * 24 * 3600.0

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*\Z")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact_json(value: object, *, sort_keys: bool = False) -> bytes:
    return json.dumps(
        value, separators=(",", ":"), sort_keys=sort_keys, ensure_ascii=False
    ).encode("utf-8")


def issue_ucan(
    node_key: NodeKey, agent_did: str, now: float, lifetime: float = UCAN_LIFETIME
) -> tuple[str, int]:
    """Return a UCAN letting C{agent_did} join the network, and its expiry.

    The token is the compact JSON ``{"payload": {...}, "s": "<sig>"}`` whose
    payload keys come in the order the client expects and whose signature
    covers the compact payload JSON. C{agent_did} may be a short key; the
    token names the full DID. Returns C{(token, exp)}, C{exp} in Unix seconds.
    """
    exp = int(now + lifetime)
    payload = {
        "ucan": "1.0.0",
        "iss": node_key.did,
        "aud": full_did(agent_did),
        "att": [{"with": "gitlawb://alpha", "can": "network/join"}],
        "exp": exp,
        "prf": [],
    }
    signature = _b64url(node_key.sign(_compact_json(payload)))
    token = _compact_json({"payload": payload, "s": signature}).decode("utf-8")
    return token, exp


def certificate_signing_bytes(
    *,
    new: str,
    node: str,
    old: str,
    pusher: str,
    ref: str,
    repo_id: str | int,
    ts: str,
) -> bytes:
    """Return the bytes a ref-update certificate signature covers.

    Compact JSON with sorted keys, non-ASCII kept as UTF-8. C{ts} is the
    certificate's C{issued_at} exactly as stored and served, and C{repo_id}
    must have the JSON type the API serves it with, or clients re-verifying
    the certificate will build different bytes.
    """
    fields = {
        "new": new,
        "node": node,
        "old": old,
        "pusher": pusher,
        "ref": ref,
        "repo_id": repo_id,
        "ts": ts,
    }
    return _compact_json(fields, sort_keys=True)


def sign_certificate(
    node_key: NodeKey,
    *,
    new: str,
    old: str,
    pusher: str,
    ref: str,
    repo_id: str | int,
    ts: str,
) -> str:
    """Return the node's base64url signature of a ref-update certificate."""
    data = certificate_signing_bytes(
        new=new,
        node=node_key.did,
        old=old,
        pusher=pusher,
        ref=ref,
        repo_id=repo_id,
        ts=ts,
    )
    return _b64url(node_key.sign(data))


def verify_certificate(
    signature: str,
    *,
    new: str,
    node: str,
    old: str,
    pusher: str,
    ref: str,
    repo_id: str | int,
    ts: str,
) -> bool:
    """Return whether C{signature} is C{node}'s signature of the certificate.

    False, never an exception, for a bad DID or malformed signature.
    """
    if _BASE64URL.match(signature) is None or len(signature) % 4 == 1:
        return False
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    try:
        public_key = public_key_from_did(node)
    except InvalidDid:
        return False
    data = certificate_signing_bytes(
        new=new, node=node, old=old, pusher=pusher, ref=ref, repo_id=repo_id, ts=ts
    )
    try:
        VerifyKey(public_key).verify(data, raw)
    except (BadSignatureError, ValueError):
        return False
    return True


def format_timestamp(when: datetime | float) -> str:
    """Return C{when} as RFC 3339 UTC with microseconds.

    Always the same shape, e.g. ``2026-12-03T15:26:00.123456+00:00``. A
    float is Unix seconds; a naive datetime is refused with L{ValueError}
    because its zone is unknown.
    """
    if isinstance(when, datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("a naive datetime has no zone; give it one")
        moment = when.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(when, tz=UTC)
    return moment.isoformat(timespec="microseconds")
