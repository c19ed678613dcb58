"""Signed requests: the RFC 9421 subset the gitlawb clients speak.

A signed request carries::

    Content-Digest:  sha-256=:<base64 of SHA-256(body)>:
    Signature-Input: sig1=("@method" "@path" "content-digest");keyid="<did>";
                     alg="ed25519";created=<unix seconds>
    Signature:       sig1=:<base64 of the 64-byte Ed25519 signature>:

and the signature covers the lines ``"<component>": <value>`` joined by
``\\n``, ending with ``"@signature-params": <Signature-Input without sig1=>``.
Unlike RFC 9421, ``@path`` is the raw request target *with* its query string.

L{verify_signed_request} applies the checks in the order of the protocol's
table and raises L{SignatureError} carrying the status and error code to
answer with. Beyond the reference node it refuses replayed signatures on
state-changing requests (L{ReplayGuard}) and a body that no digest covers.

Header values are parsed as RFC 8941 structured fields, strictly (a subset:
no display strings, duplicate keys refused instead of silently overwritten)
but tolerant of optional whitespace; ``@signature-params`` is rebuilt in
canonical RFC 8941 form, which is byte for byte what the client produced.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, NoReturn

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gitlawb.identity.keys import InvalidDid, NodeKey, public_key_from_did

__all__ = [
    "GITLAWB_ERROR_HEADER",
    "HUMAN_DETECTED",
    "MAX_CLOCK_SKEW",
    "NOT_AN_AGENT_HEADERS",
    "REGISTER_HINT",
    "SIGNATURE_LABEL",
    "STATE_CHANGING_METHODS",
    "WWW_AUTHENTICATE_CHALLENGE",
    "ReplayGuard",
    "SignatureError",
    "VerifiedRequest",
    "content_digest",
    "sign_request",
    "verify_signed_request",
]

SIGNATURE_LABEL = "sig1"
COVERED_COMPONENTS = ("@method", "@path", "content-digest")
ALGORITHM = "ed25519"

#: Largest accepted distance, in seconds, between ``created`` and now.
MAX_CLOCK_SKEW = 300

#: Methods whose signatures may be used only once (see L{ReplayGuard}).
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: What the HTTP layer adds to the 401 ``not_an_agent`` answer: the client
#: keys its "create an identity" hint on the X-Gitlawb-Error header, and the
#: JSON body carries REGISTER_HINT as ``hint``.
WWW_AUTHENTICATE_CHALLENGE = 'Signature realm="gitlawb-alpha", alg="ed25519"'
GITLAWB_ERROR_HEADER = "X-Gitlawb-Error"
HUMAN_DETECTED = "human_detected"
REGISTER_HINT = "gl identity new && gl register"
NOT_AN_AGENT_HEADERS: Mapping[str, str] = {
    "WWW-Authenticate": WWW_AUTHENTICATE_CHALLENGE,
    GITLAWB_ERROR_HEADER: HUMAN_DETECTED,
}

_EMPTY_BODY_SHA256 = hashlib.sha256(b"").digest()

# W3C DID syntax: did:<method>:<method-specific id>.
_DID = re.compile(r"did:[a-z0-9]+:(?:[A-Za-z0-9._%-]*:)*[A-Za-z0-9._%-]+\Z")


class SignatureError(Exception):
    """A signed request was refused.

    @ivar status: the HTTP status to answer with.
    @ivar code: the JSON ``error`` code (protocol section 2 and 12).
    @ivar message: a one-line human explanation for the JSON ``message``.
    @ivar retry_after: seconds for a C{Retry-After} header, or None.
    """

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    """A request whose signature checked out; the signer is the caller."""

    signer_did: str
    created: int
    signature: bytes


def content_digest(body: bytes) -> str:
    """Return the C{Content-Digest} value of C{body}: ``sha-256=:<b64>:``."""
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
    return f"sha-256=:{digest}:"


def _signature_base(
    components: tuple[str, ...], values: Mapping[str, str], params: str
) -> bytes:
    lines = [f'"{name}": {values[name]}' for name in components]
    lines.append(f'"@signature-params": {params}')
    # Header values reach us as latin-1 text; a surrogate can only come from a
    # caller that built the text itself, and must not raise here.
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def sign_request(
    key: NodeKey, method: str, target: str, body: bytes, created: int
) -> dict[str, str]:
    """Return the three signature headers the gl client sends for a request.

    C{target} is the raw request target, query string included.
    """
    digest = content_digest(body)
    covered = " ".join(f'"{name}"' for name in COVERED_COMPONENTS)
    params = f'({covered});keyid="{key.did}";alg="{ALGORITHM}";created={created}'
    values = {"@method": method.upper(), "@path": target, "content-digest": digest}
    signature = key.sign(_signature_base(COVERED_COMPONENTS, values, params))
    encoded = base64.b64encode(signature).decode("ascii")
    return {
        "Content-Digest": digest,
        "Signature-Input": f"{SIGNATURE_LABEL}={params}",
        "Signature": f"{SIGNATURE_LABEL}=:{encoded}:",
    }


# -- A strict subset of RFC 8941 structured fields --------------------------


class _Unparsable(ValueError):
    pass


_BareKind = Literal["integer", "decimal", "string", "token", "bytes", "boolean"]


@dataclass(frozen=True, slots=True)
class _Bare:
    kind: _BareKind
    value: int | Decimal | str | bytes | bool
    # The canonical serialisation (RFC 8941 section 4).
    text: str


_Params = tuple[tuple[str, _Bare], ...]


@dataclass(frozen=True, slots=True)
class _Item:
    bare: _Bare
    params: _Params


@dataclass(frozen=True, slots=True)
class _InnerList:
    items: tuple[_Item, ...]
    params: _Params


_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]*))?")
_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_STRING_ESCAPE = re.compile(r'\\(["\\])')
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")
_OWS = re.compile(r"[ \t]*")
_SP = re.compile(r" *")
_TRUE = _Bare("boolean", True, "?1")
_FALSE = _Bare("boolean", False, "?0")


def _serialize_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _serialize_params(params: _Params) -> str:
    return "".join(
        f";{key}" if bare is _TRUE else f";{key}={bare.text}" for key, bare in params
    )


def _serialize_inner_list(inner: _InnerList) -> str:
    items = " ".join(
        item.bare.text + _serialize_params(item.params) for item in inner.items
    )
    return f"({items}){_serialize_params(inner.params)}"


class _FieldParser:
    """Parse one field value; every failure raises L{_Unparsable}."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> NoReturn:
        raise _Unparsable(f"{what} at offset {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def skip(self, pattern: re.Pattern[str]) -> None:
        match = pattern.match(self.text, self.pos)
        assert match is not None  # both whitespace patterns match empty text
        self.pos = match.end()

    def dictionary(self) -> dict[str, _Item | _InnerList]:
        result: dict[str, _Item | _InnerList] = {}
        self.skip(_OWS)
        while self.pos < len(self.text):
            key = self.key()
            member: _Item | _InnerList
            if self.peek() == "=":
                self.pos += 1
                member = self.inner_list() if self.peek() == "(" else self.item()
            else:
                member = _Item(_TRUE, self.params())
            if key in result:
                self.fail(f"duplicate key {key!r}")
            result[key] = member
            self.skip(_OWS)
            if self.pos == len(self.text):
                break
            if self.peek() != ",":
                self.fail("expected ','")
            self.pos += 1
            self.skip(_OWS)
            if self.pos == len(self.text):
                self.fail("trailing ','")
        return result

    def inner_list(self) -> _InnerList:
        self.pos += 1  # the "(" seen by the caller
        items: list[_Item] = []
        while True:
            self.skip(_SP)
            if self.peek() == ")":
                self.pos += 1
                return _InnerList(tuple(items), self.params())
            items.append(self.item())
            if self.peek() not in (" ", ")"):
                self.fail("expected ' ' or ')' in inner list")

    def item(self) -> _Item:
        return _Item(self.bare(), self.params())

    def params(self) -> _Params:
        params: list[tuple[str, _Bare]] = []
        while self.peek() == ";":
            self.pos += 1
            self.skip(_SP)
            key = self.key()
            value = _TRUE
            if self.peek() == "=":
                self.pos += 1
                value = self.bare()
            if any(key == seen for seen, _ in params):
                self.fail(f"duplicate parameter {key!r}")
            params.append((key, value))
        return tuple(params)

    def key(self) -> str:
        match = _KEY.match(self.text, self.pos)
        if match is None:
            self.fail("expected a key")
        self.pos = match.end()
        return match[0]

    def bare(self) -> _Bare:
        first = self.peek()
        if first == '"':
            return self.string()
        if first == ":":
            return self.byte_sequence()
        if first == "?":
            flag = self.text[self.pos + 1 : self.pos + 2]
            if flag not in ("0", "1"):
                self.fail("bad boolean")
            self.pos += 2
            return _TRUE if flag == "1" else _FALSE
        if first == "-" or first.isdigit():
            return self.number()
        match = _TOKEN.match(self.text, self.pos)
        if match is None:
            self.fail("expected a bare item")
        self.pos = match.end()
        return _Bare("token", match[0], match[0])

    def number(self) -> _Bare:
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            self.fail("expected a number")
        sign, whole, fraction = match.groups()
        self.pos = match.end()
        if fraction is None:
            if len(whole) > 15:
                self.fail("integer too long")
            value = int(sign + whole)
            return _Bare("integer", value, str(value))
        if len(whole) > 12 or not 1 <= len(fraction) <= 3:
            self.fail("bad decimal")
        number = Decimal(f"{sign}{whole}.{fraction}")
        text = f"{sign}{int(whole)}.{fraction.rstrip('0') or '0'}"
        return _Bare("decimal", number, text)

    def string(self) -> _Bare:
        match = _STRING.match(self.text, self.pos)
        if match is None:
            self.fail("bad string")
        self.pos = match.end()
        value = _STRING_ESCAPE.sub(r"\1", match[1])
        return _Bare("string", value, _serialize_string(value))

    def byte_sequence(self) -> _Bare:
        match = _BYTES.match(self.text, self.pos)
        if match is None:
            self.fail("bad byte sequence")
        encoded = match[1]
        try:
            # RFC 8941 lets parsers accept base64 without its padding.
            data = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            self.fail("bad base64")
        self.pos = match.end()
        return _Bare("bytes", data, ":" + base64.b64encode(data).decode("ascii") + ":")


def _parse_dictionary(value: str) -> dict[str, _Item | _InnerList]:
    return _FieldParser(value).dictionary()


# -- Verification ------------------------------------------------------------


def _refuse(status: int, code: str, message: str) -> NoReturn:
    raise SignatureError(status, code, message)


def _invalid(message: str) -> NoReturn:
    _refuse(400, "invalid_signature", message)


@dataclass(frozen=True, slots=True)
class _ParsedSignature:
    components: tuple[_Item, ...]
    params_text: str
    keyid: str
    alg: _Bare | None
    created: int
    signature: bytes


def _parse_signature_headers(signature_input: str, signature: str) -> _ParsedSignature:
    try:
        inputs = _parse_dictionary(signature_input)
        signatures = _parse_dictionary(signature)
    except _Unparsable as e:
        _invalid(f"unparsable signature header: {e}")

    declared = inputs.get(SIGNATURE_LABEL)
    if not isinstance(declared, _InnerList):
        _invalid(f"Signature-Input has no {SIGNATURE_LABEL}=(...) member")
    sent = signatures.get(SIGNATURE_LABEL)
    if not isinstance(sent, _Item) or not isinstance(sent.bare.value, bytes):
        _invalid(f"Signature has no {SIGNATURE_LABEL}=:<base64>: member")
    if any(item.bare.kind != "string" for item in declared.items):
        _invalid("covered components must be quoted strings")

    params = dict(declared.params)
    keyid = params.get("keyid")
    if keyid is None or keyid.kind != "string":
        _invalid('Signature-Input lacks keyid="<did>"')
    assert isinstance(keyid.value, str)
    if _DID.match(keyid.value) is None:
        _invalid("keyid is not a DID")
    created = params.get("created")
    if created is None or created.kind != "integer":
        _invalid("Signature-Input lacks created=<unix seconds>")
    assert isinstance(created.value, int)

    return _ParsedSignature(
        components=declared.items,
        params_text=_serialize_inner_list(declared),
        keyid=keyid.value,
        alg=params.get("alg"),
        created=created.value,
        signature=sent.bare.value,
    )


def _digest_bytes(value: str) -> bytes | None:
    """Return the sha-256 member of a Content-Digest value, None if absent."""
    member = _parse_dictionary(value).get("sha-256")
    if isinstance(member, _Item) and isinstance(member.bare.value, bytes):
        return member.bare.value
    return None


def verify_signed_request(
    *,
    method: str,
    target: str,
    headers: Callable[[str], str | None],
    body_digest: str | None,
    now: float,
    replay: ReplayGuard | None,
) -> VerifiedRequest:
    """Check a signed request; return who signed it or raise L{SignatureError}.

    @param method: the request method (compared upper case).
    @param target: the raw request target, query string included.
    @param headers: looks up one header by its lower-case name
        (C{"signature-input"}, C{"signature"}, C{"content-digest"}) and
        returns its value decoded as latin-1, several lines joined by
        ``", "``, or None when absent. The lookup must be case-insensitive
        over the request's header names (twisted's C{Headers} is).
    @param body_digest: L{content_digest} of the raw body as received, or
        None when the request has no body (taken as the empty body, whose
        digest the client signs on GETs).
    @param now: the current time in seconds, from the clock C{replay} uses.
    @param replay: remembers signatures of state-changing requests; None
        skips the replay check.

    A body without a C{Content-Digest} header is refused with 400
    C{incomplete_signature}: the signature must cover the digest and the
    request must carry it, so the request lacks a covered component;
    C{content_digest_mismatch} would claim a digest was sent and differed.
    """
    # Without either header the caller is not an agent at all.
    signature_input = headers("signature-input")
    signature = headers("signature")
    if signature_input is None or signature is None:
        _refuse(
            401, "not_an_agent", "this route needs a request signed by an agent key"
        )

    # Everything unparsable is refused before any other judgement.
    parsed = _parse_signature_headers(signature_input, signature)
    digest_header = headers("content-digest")
    sent_digest: bytes | None = None
    if digest_header is not None:
        digest_header = digest_header.strip(" \t")
        try:
            sent_digest = _digest_bytes(digest_header)
        except _Unparsable as e:
            _invalid(f"unparsable Content-Digest header: {e}")

    if abs(now - parsed.created) > MAX_CLOCK_SKEW:
        _refuse(
            400,
            "clock_skew",
            f"created={parsed.created} is more than {MAX_CLOCK_SKEW} s from the "
            f"node's clock ({int(now)})",
        )

    names = [item.bare.value for item in parsed.components if not item.params]
    missing = [name for name in COVERED_COMPONENTS if name not in names]
    if missing:
        _refuse(
            400,
            "incomplete_signature",
            "the signature must cover " + ", ".join(f'"{m}"' for m in missing),
        )
    if digest_header is None:
        _refuse(
            400,
            "incomplete_signature",
            "the signature covers content-digest but there is no Content-Digest",
        )

    if parsed.alg != _Bare("string", ALGORITHM, f'"{ALGORITHM}"'):
        _refuse(400, "unsupported_algorithm", f'only alg="{ALGORITHM}" is supported')

    try:
        public_key = public_key_from_did(parsed.keyid)
    except InvalidDid:
        _refuse(400, "unresolvable_did", "keyid is not an Ed25519 did:key")

    if len(parsed.components) != len(COVERED_COMPONENTS):
        _refuse(
            400,
            "signing_string_error",
            "only these components may be covered, each once: "
            + " ".join(f'"{name}"' for name in COVERED_COMPONENTS),
        )

    if len(parsed.signature) != 64:
        _invalid(f"an Ed25519 signature has 64 bytes, not {len(parsed.signature)}")

    values = {
        "@method": method.upper(),
        "@path": target,
        "content-digest": digest_header,
    }
    components = tuple(str(item.bare.value) for item in parsed.components)
    base = _signature_base(components, values, parsed.params_text)
    try:
        VerifyKey(public_key).verify(base, parsed.signature)
    except BadSignatureError:
        _refuse(401, "invalid_signature", "the signature does not verify")

    if body_digest is None:
        body_sha256 = _EMPTY_BODY_SHA256
    else:
        body_sha256 = _digest_bytes(body_digest) or b""
    if sent_digest != body_sha256:
        _refuse(
            400,
            "content_digest_mismatch",
            "Content-Digest sha-256 does not match the body",
        )

    # Only a fully verified signature is remembered, so garbage cannot fill
    # the guard or block a legitimate request.
    if replay is not None and method.upper() in STATE_CHANGING_METHODS:
        replay.check_and_remember(parsed.signature, parsed.created)

    return VerifiedRequest(
        signer_did=parsed.keyid, created=parsed.created, signature=parsed.signature
    )


class ReplayGuard:
    """Remembers the signatures of state-changing requests for C{window} s.

    A signature is keyed by its decoded bytes, so re-encoding it (whitespace,
    base64 padding) does not make it new. Each entry expires C{window} s after
    the later of its C{created} and the moment it was remembered; C{window}
    must be at least L{MAX_CLOCK_SKEW} so a signature is remembered for as
    long as the skew check would still accept it.

    Memory is bounded by C{max_entries}. When the table is full even after
    dropping expired entries, new state-changing requests are refused (429
    C{rate_limited} with C{retry_after}) rather than evicting live entries:
    did:keys cost nothing, so anyone able to make enough valid signatures
    could otherwise flush the table and then replay a captured request. The
    price is that a flood of valid signed writes (over C{max_entries} per
    window, 200 000 / 300 s ~ 667/s by default) delays other writers until
    entries expire; GETs and unsigned reads are unaffected.

    The table lives in memory, so a restarted node knows nothing of what it
    accepted before.  A state-changing request signed before this guard was
    made (C{created} earlier than its start, to the second) is therefore
    refused as a possible replay; the client signs it again.
    """

    SWEEP_INTERVAL = 60.0
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        window: float = float(MAX_CLOCK_SKEW),
        max_entries: int = 200_000,
    ) -> None:
        self._clock = clock
        self._window = window
        self._max_entries = max_entries
        self._expires: dict[bytes, float] = {}
        # (expiry, signature) in expiry order; an entry whose expiry no longer
        # matches _expires is stale and skipped.
        self._queue: list[tuple[float, bytes]] = []
        self._loop: LoopingCall | None = None
        # Signatures older than this may have been accepted by a previous run.
        self._not_before = int(clock.seconds())

    def __len__(self) -> int:
        return len(self._expires)

    def check_and_remember(self, sig: bytes, created: int) -> None:
        """Remember C{sig}; raise L{SignatureError} if it is already known.

        Raises 401 C{replayed_signature} for a signature seen within the
        window, and 429 C{rate_limited} when the table is full.
        """
        now = self._clock.seconds()
        expiry = self._expires.get(sig)
        if expiry is not None and expiry >= now:
            raise SignatureError(
                401,
                "replayed_signature",
                "this signature was already used; sign the request again",
            )
        if created < self._not_before:
            raise SignatureError(
                401,
                "replayed_signature",
                "this request was signed before the node started and may have "
                "been accepted already; sign the request again",
            )

        if expiry is None and len(self._expires) >= self._max_entries:
            self.sweep()
            if len(self._expires) >= self._max_entries:
                retry_after = max(1.0, self._queue[0][0] - now + 1)
                self.log.warn(
                    "replay guard full entries={entries}; refusing signed writes",
                    entries=len(self._expires),
                )
                raise SignatureError(
                    429,
                    "rate_limited",
                    "too many signed writes on this node right now; retry later",
                    retry_after=retry_after,
                )

        # A signature passes the skew check until created + MAX_CLOCK_SKEW;
        # counting from now as well keeps it even if the caller's clock
        # disagrees with ours.
        expiry = max(float(created), now) + self._window
        self._expires[sig] = expiry
        heapq.heappush(self._queue, (expiry, sig))

    def sweep(self) -> int:
        """Forget expired signatures; return how many were forgotten."""
        now = self._clock.seconds()
        removed = 0
        while self._queue and self._queue[0][0] < now:
            expiry, sig = heapq.heappop(self._queue)
            if self._expires.get(sig) == expiry:
                del self._expires[sig]
                removed += 1
        return removed

    def start(self) -> None:
        """Sweep every L{SWEEP_INTERVAL} seconds on the clock until L{stop}."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self._clock
        self._loop.start(self.SWEEP_INTERVAL, now=False).addErrback(self._sweep_failed)

    def stop(self) -> None:
        """Stop the periodic sweep; safe to call when not started."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _sweep_failed(self, failure: Failure) -> None:
        self.log.failure("replay guard sweep failed", failure)
