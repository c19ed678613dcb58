"""Tests for gitlawb.identity.signatures: signing, verifying and replay."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gitlawb.identity.keys import NodeKey
from gitlawb.identity.signatures import (
    NOT_AN_AGENT_HEADERS,
    REGISTER_HINT,
    ReplayGuard,
    SignatureError,
    VerifiedRequest,
    content_digest,
    sign_request,
    verify_signed_request,
)

KEY = NodeKey.from_seed(bytes(range(32)))
OTHER = NodeKey.from_seed(bytes(range(1, 33)))
BODY = b'{"default_branch":"main","description":null,"is_public":true,"name":"demo"}'
TARGET = "/api/v1/repos"
CREATED = 1796311673
VECTOR_DIGEST = "sha-256=:QoYXeqcwb7pp40QfSpl82IfWglPlFS0WLW+bMJC770Q=:"
VECTOR_INPUT = (
    'sig1=("@method" "@path" "content-digest");'
    'keyid="did:key:z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd";'
    'alg="ed25519";created=1796311673'
)
VECTOR_SIGNATURE = (
    "sig1=:hMP0k1GwWucJEAJUwMcCIH98gm/YCcynn73Wj7sbM+DXMwf1I9x7EAaAEIV0Hv3j3FRhbX3k"
    "+9T4/4VVDXJpBw==:"
)
COVERED = '("@method" "@path" "content-digest")'


def lookup(headers: Mapping[str, str]) -> Callable[[str], str | None]:
    """Return a case-insensitive header lookup over C{headers}."""
    lowered = {name.lower(): value for name, value in headers.items()}
    return lowered.get


def raw_signed(
    *,
    key: NodeKey = KEY,
    method: str = "POST",
    target: str = TARGET,
    body: bytes = BODY,
    covered: str = COVERED,
    params: str | None = None,
    created: int = CREATED,
    sign_with: NodeKey | None = None,
    digest: str | None = None,
) -> dict[str, str]:
    """Sign like the client, with every part of Signature-Input overridable.

    The signature base is built here from the protocol text, independently
    of the code under test.
    """
    if digest is None:
        digest = content_digest(body)
    if params is None:
        params = f';keyid="{key.did}";alg="ed25519";created={created}'
    signature_params = covered + params
    values = {"@method": method, "@path": target, "content-digest": digest}
    lines = []
    for name in covered.strip("()").split(" "):
        name = name.split(";")[0].strip('"')
        lines.append(f'"{name}": {values.get(name, "")}')
    lines.append(f'"@signature-params": {signature_params}')
    signature = (sign_with or key).sign("\n".join(lines).encode())
    return {
        "Content-Digest": digest,
        "Signature-Input": f"sig1={signature_params}",
        "Signature": f"sig1=:{base64.b64encode(signature).decode()}:",
    }


def verify(
    headers: Mapping[str, str],
    *,
    method: str = "POST",
    target: str = TARGET,
    body: bytes | None = BODY,
    now: float = CREATED,
    replay: ReplayGuard | None = None,
) -> VerifiedRequest:
    """Verify a request the way the HTTP layer will."""
    return verify_signed_request(
        method=method,
        target=target,
        headers=lookup(headers),
        body_digest=None if body is None else content_digest(body),
        now=now,
        replay=replay,
    )


def refusal(
    headers: Mapping[str, str],
    *,
    method: str = "POST",
    target: str = TARGET,
    body: bytes | None = BODY,
    now: float = CREATED,
    replay: ReplayGuard | None = None,
) -> tuple[int, str]:
    """Return the (status, code) a request is refused with."""
    with pytest.raises(SignatureError) as caught:
        verify(headers, method=method, target=target, body=body, now=now, replay=replay)
    return caught.value.status, caught.value.code


def with_header(
    headers: Mapping[str, str], name: str, value: str | None
) -> dict[str, str]:
    """Return a copy of C{headers} with one header replaced or removed."""
    result = {k: v for k, v in headers.items() if k != name}
    if value is not None:
        result[name] = value
    return result


# -- The protocol's test vector ----------------------------------------------


def test_content_digest_vector() -> None:
    """The vector body has the vector digest."""
    assert content_digest(BODY) == VECTOR_DIGEST


def test_sign_request_vector() -> None:
    """sign_request produces the vector's three headers byte for byte."""
    headers = sign_request(KEY, "POST", TARGET, BODY, CREATED)

    assert headers == {
        "Content-Digest": VECTOR_DIGEST,
        "Signature-Input": VECTOR_INPUT,
        "Signature": VECTOR_SIGNATURE,
    }


def test_verify_vector() -> None:
    """The vector request verifies and names its signer."""
    headers = {
        "content-digest": VECTOR_DIGEST,
        "signature-input": VECTOR_INPUT,
        "signature": VECTOR_SIGNATURE,
    }

    verified = verify(headers, now=CREATED + 0.5)

    assert verified.signer_did == KEY.did
    assert verified.created == CREATED
    assert verified.signature == base64.b64decode(VECTOR_SIGNATURE[6:-1])


def test_test_helper_matches_vector() -> None:
    """The tests' own signer agrees with the vector, so it can be trusted."""
    assert raw_signed()["Signature"] == VECTOR_SIGNATURE


def test_signed_get_with_empty_body_verifies() -> None:
    """A GET signs the empty body's digest and verifies with no body."""
    target = "/z6Mk/r/info/refs?service=git-receive-pack"
    headers = sign_request(KEY, "GET", target, b"", CREATED)

    assert verify(headers, method="GET", target=target, body=None).signer_did == KEY.did


def test_not_an_agent_constants() -> None:
    """The 401 extras carry what the client keys its hint on."""
    assert NOT_AN_AGENT_HEADERS == {
        "WWW-Authenticate": 'Signature realm="gitlawb-alpha", alg="ed25519"',
        "X-Gitlawb-Error": "human_detected",
    }
    assert REGISTER_HINT == "gl identity new && gl register"


# -- Every row of the check table --------------------------------------------


@pytest.mark.parametrize("missing", ["Signature-Input", "Signature"])
def test_missing_signature_header_is_not_an_agent(missing: str) -> None:
    """Without Signature-Input or Signature the answer is 401 not_an_agent."""
    headers = with_header(raw_signed(), missing, None)

    assert refusal(headers) == (401, "not_an_agent")


def test_no_headers_at_all_is_not_an_agent() -> None:
    """An unsigned request is 401 not_an_agent."""
    assert refusal({}) == (401, "not_an_agent")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Signature-Input", "sig1=("),
        ("Signature-Input", ""),
        ("Signature-Input", "sig2=" + COVERED + ';keyid="x";created=1'),
        ("Signature-Input", "sig1=:AAAA:"),
        ("Signature-Input", VECTOR_INPUT + ", sig1=()"),
        ("Signature-Input", VECTOR_INPUT.replace("created=1796311673", 'created="1"')),
        ("Signature-Input", VECTOR_INPUT.replace(";created=1796311673", "")),
        ("Signature-Input", VECTOR_INPUT.replace('keyid="did:key:', 'keyid="bob')),
        ("Signature-Input", VECTOR_INPUT.replace('keyid="', 'keyid="did:key:x ')),
        ("Signature-Input", 'sig1=("@method" @path "content-digest");keyid="x"'),
        ("Signature", "sig1=:!!!!:"),
        ("Signature", 'sig1="abc"'),
        ("Signature", "sig1=:" + base64.b64encode(b"\x01" * 64).decode()),
        ("Signature", "sig1=:QUJD:, sig1=:QUJD:"),
        ("Content-Digest", "sha-256=:QoYX;:"),
    ],
)
def test_unparsable_header_is_invalid_signature(name: str, value: str) -> None:
    """Unparsable headers, a keyid that is no DID and bad base64 are 400."""
    headers = with_header(raw_signed(), name, value)

    assert refusal(headers) == (400, "invalid_signature")


@pytest.mark.parametrize("offset", [-301, 301, 10_000])
def test_clock_skew(offset: int) -> None:
    """A created time more than 300 s away from now is 400 clock_skew."""
    assert refusal(raw_signed(), now=CREATED + offset) == (400, "clock_skew")


@pytest.mark.parametrize("offset", [-300, 300])
def test_clock_skew_boundary_accepted(offset: int) -> None:
    """Exactly 300 s of skew is still accepted."""
    assert verify(raw_signed(), now=CREATED + offset).created == CREATED


@pytest.mark.parametrize(
    "covered",
    [
        '("@method" "@path")',
        '("@path" "content-digest")',
        '("@method" "content-digest")',
        "()",
        '("@method" "@path" "content-digest";sf)',
    ],
)
def test_uncovered_component_is_incomplete(covered: str) -> None:
    """A signature not covering all three components is 400 incomplete_signature."""
    assert refusal(raw_signed(covered=covered)) == (400, "incomplete_signature")


@pytest.mark.parametrize(
    "params",
    [
        f';keyid="{KEY.did}";alg="rsa-v1_5-sha256";created={CREATED}',
        f';keyid="{KEY.did}";created={CREATED}',
        f';keyid="{KEY.did}";alg=ed25519;created={CREATED}',
        f';keyid="{KEY.did}";alg="ED25519";created={CREATED}',
    ],
)
def test_other_algorithm_is_unsupported(params: str) -> None:
    """Any alg but "ed25519", or none, is 400 unsupported_algorithm."""
    assert refusal(raw_signed(params=params)) == (400, "unsupported_algorithm")


@pytest.mark.parametrize(
    "keyid",
    [
        "did:web:example.com",
        "did:key:z6LSbysY2xFMRpGMhb7tFTLMpeuPRaqaWM1yECx2AtzE3KCc",  # X25519
        "did:key:z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvV",  # truncated
    ],
)
def test_unresolvable_keyid(keyid: str) -> None:
    """A DID that is no Ed25519 did:key is 400 unresolvable_did."""
    params = f';keyid="{keyid}";alg="ed25519";created={CREATED}'

    assert refusal(raw_signed(params=params)) == (400, "unresolvable_did")


@pytest.mark.parametrize(
    "covered",
    [
        '("@method" "@path" "content-digest" "host")',
        '("@method" "@path" "content-digest" "@method")',
        '("@method" "@path" "content-digest" "@path";req)',
        '("@method" "@path" "content-digest" "@query")',
    ],
)
def test_unknown_component_is_signing_string_error(covered: str) -> None:
    """Any component beyond the three, or one twice, is 400 signing_string_error."""
    assert refusal(raw_signed(covered=covered)) == (400, "signing_string_error")


@pytest.mark.parametrize("length", [0, 63, 65])
def test_wrong_signature_length_is_invalid(length: int) -> None:
    """A signature that is not 64 bytes is 400 invalid_signature."""
    value = "sig1=:" + base64.b64encode(b"\x01" * length).decode() + ":"
    headers = with_header(raw_signed(), "Signature", value)

    assert refusal(headers) == (400, "invalid_signature")


@pytest.mark.parametrize(
    ("method", "target", "signer"),
    [
        ("POST", "/api/v1/repos?x=1", KEY),
        ("PUT", TARGET, KEY),
        ("POST", TARGET, OTHER),
    ],
)
def test_failed_verification_is_401(method: str, target: str, signer: NodeKey) -> None:
    """A signature that does not verify is 401 invalid_signature."""
    headers = raw_signed(sign_with=signer)

    assert refusal(headers, method=method, target=target) == (401, "invalid_signature")


def test_signature_input_altered_after_signing_is_401() -> None:
    """Changing a signed parameter breaks the signature."""
    headers = raw_signed()
    altered = headers["Signature-Input"].replace(
        f"created={CREATED}", f"created={CREATED + 1}"
    )

    assert refusal(with_header(headers, "Signature-Input", altered)) == (
        401,
        "invalid_signature",
    )


def test_digest_of_other_body_is_mismatch() -> None:
    """A correctly signed digest of another body is 400 content_digest_mismatch."""
    headers = raw_signed(body=b"something else")

    assert refusal(headers, body=BODY) == (400, "content_digest_mismatch")


def test_digest_without_sha256_is_mismatch() -> None:
    """A signed Content-Digest without a sha-256 member cannot match the body."""
    sha512 = base64.b64encode(hashlib.sha512(BODY).digest()).decode()
    headers = raw_signed(digest=f"sha-512=:{sha512}:")

    assert refusal(headers) == (400, "content_digest_mismatch")


def test_get_with_digest_of_nonempty_body_is_mismatch() -> None:
    """A bodiless request must carry the empty body's digest."""
    headers = raw_signed(method="GET", body=b"x")

    assert refusal(headers, method="GET", body=None) == (400, "content_digest_mismatch")


def test_body_without_content_digest_is_incomplete() -> None:
    """A body that no Content-Digest covers is 400 incomplete_signature."""
    headers = with_header(raw_signed(), "Content-Digest", None)

    assert refusal(headers) == (400, "incomplete_signature")


def test_get_without_content_digest_is_incomplete() -> None:
    """A covered content-digest must be sent even without a body."""
    headers = with_header(raw_signed(method="GET", body=b""), "Content-Digest", None)

    assert refusal(headers, method="GET", body=None) == (400, "incomplete_signature")


# -- Check order -------------------------------------------------------------


def test_order_unparsable_before_skew() -> None:
    """An unparsable signature is reported before a skewed clock."""
    headers = with_header(raw_signed(), "Signature", "sig1=:!!:")

    assert refusal(headers, now=CREATED + 1000) == (400, "invalid_signature")


def test_order_skew_before_coverage() -> None:
    """A skewed clock is reported before missing components."""
    headers = raw_signed(covered='("@method")')

    assert refusal(headers, now=CREATED + 1000) == (400, "clock_skew")


def test_order_coverage_before_algorithm() -> None:
    """Missing components are reported before an unsupported algorithm."""
    params = f';keyid="{KEY.did}";alg="hmac-sha256";created={CREATED}'

    assert refusal(raw_signed(covered='("@method")', params=params)) == (
        400,
        "incomplete_signature",
    )


def test_order_algorithm_before_did() -> None:
    """An unsupported algorithm is reported before an unresolvable DID."""
    params = f';keyid="did:web:x";alg="hmac-sha256";created={CREATED}'

    assert refusal(raw_signed(params=params)) == (400, "unsupported_algorithm")


def test_order_did_before_unknown_component() -> None:
    """An unresolvable DID is reported before an unknown component."""
    params = f';keyid="did:web:x";alg="ed25519";created={CREATED}'
    covered = '("@method" "@path" "content-digest" "host")'

    assert refusal(raw_signed(covered=covered, params=params)) == (
        400,
        "unresolvable_did",
    )


def test_order_signature_before_digest() -> None:
    """A bad signature is reported before a digest mismatch."""
    headers = raw_signed(body=b"other", sign_with=OTHER)

    assert refusal(headers) == (401, "invalid_signature")


# -- Header whitespace and encoding -------------------------------------------


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        ("Signature-Input", "sig1=", " \tsig1="),
        ("Signature-Input", '("@method" "@path"', '(  "@method"   "@path"'),
        ("Signature-Input", '"content-digest")', '"content-digest" )'),
        ("Signature-Input", ';alg="ed25519"', '; alg="ed25519"'),
        ("Signature", "sig1=:", "  sig1=:"),
        ("Signature", "==:", ":"),
        ("Content-Digest", "sha-256=", "  sha-256="),
    ],
)
def test_whitespace_and_padding_variants_verify(name: str, old: str, new: str) -> None:
    """Optional whitespace and unpadded base64 do not break verification."""
    headers = raw_signed()
    variant = with_header(headers, name, headers[name].replace(old, new) + " \t")

    assert verify(variant).signature == verify(headers).signature


def test_other_dictionary_members_ignored() -> None:
    """Other signature labels beside sig1 are ignored."""
    headers = raw_signed()
    headers["Signature-Input"] += ', sig2=("@method");keyid="did:web:x"'
    headers["Signature"] = "sig2=:QUJD:, " + headers["Signature"]

    assert verify(headers).signer_did == KEY.did


def test_lowercase_method_is_signed_upper_case() -> None:
    """The method is compared upper case, as the client signs it."""
    assert verify(raw_signed(), method="post").signer_did == KEY.did


# -- Replay ------------------------------------------------------------------


def make_guard() -> tuple[Clock, ReplayGuard]:
    """Return a Clock at the vector time and a ReplayGuard on it."""
    clock = Clock()
    clock.advance(CREATED)
    return clock, ReplayGuard(clock)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_replayed_state_change_refused(method: str) -> None:
    """A state-changing request's signature is accepted only once."""
    clock, guard = make_guard()
    headers = raw_signed(method=method)
    verify(headers, method=method, now=clock.seconds(), replay=guard)

    assert refusal(headers, method=method, now=clock.seconds(), replay=guard) == (
        401,
        "replayed_signature",
    )


def test_replayed_get_allowed() -> None:
    """A signed GET may be sent twice."""
    clock, guard = make_guard()
    headers = raw_signed(method="GET", body=b"")

    for _ in range(2):
        verify(headers, method="GET", body=None, now=clock.seconds(), replay=guard)

    assert len(guard) == 0


@pytest.mark.parametrize(
    ("old", "new"),
    [("sig1=:", " sig1=:"), ("==:", ":"), ("sig1=:", "sig0=:QUJD:, sig1=:")],
)
def test_reencoded_signature_still_replayed(old: str, new: str) -> None:
    """Whitespace or base64 variations do not make a signature new."""
    clock, guard = make_guard()
    headers = raw_signed()
    verify(headers, now=clock.seconds(), replay=guard)
    variant = with_header(headers, "Signature", headers["Signature"].replace(old, new))

    assert refusal(variant, now=clock.seconds(), replay=guard) == (
        401,
        "replayed_signature",
    )


def test_refused_request_not_remembered() -> None:
    """A signature is remembered only once the whole request verified."""
    clock, guard = make_guard()
    headers = raw_signed()
    assert refusal(headers, body=b"tampered", now=clock.seconds(), replay=guard) == (
        400,
        "content_digest_mismatch",
    )

    verified = verify(headers, now=clock.seconds(), replay=guard)

    assert verified.signer_did == KEY.did


def test_replay_guard_accepts_again_after_window() -> None:
    """Once its window has passed, a signature is forgotten by the guard."""
    clock, guard = make_guard()
    guard.check_and_remember(b"s" * 64, CREATED)
    clock.advance(301)

    guard.check_and_remember(b"s" * 64, CREATED)

    assert len(guard) == 1


def test_replay_guard_sweep_removes_expired() -> None:
    """sweep forgets expired signatures and keeps live ones."""
    clock, guard = make_guard()
    guard.check_and_remember(b"a" * 64, CREATED)
    clock.advance(200)
    guard.check_and_remember(b"b" * 64, CREATED + 200)
    clock.advance(101)

    removed = guard.sweep()

    assert (removed, len(guard)) == (1, 1)


def test_replay_guard_sweeps_every_minute_on_clock() -> None:
    """start sweeps on the guard's clock every 60 s; stop leaves no timer."""
    clock, guard = make_guard()
    guard.start()
    guard.check_and_remember(b"a" * 64, CREATED)

    clock.advance(300)  # sweeps at +60 .. +300; the entry expires after +300
    clock.advance(59)
    kept = len(guard)
    clock.advance(1)
    swept = len(guard)
    guard.stop()

    assert (kept, swept) == (1, 0)
    assert clock.getDelayedCalls() == []


def test_replay_guard_stop_without_start() -> None:
    """stop is harmless when the guard never started."""
    _, guard = make_guard()

    guard.stop()

    assert len(guard) == 0


def test_replay_guard_full_refuses_new_signatures() -> None:
    """A full guard refuses new signatures with 429 instead of forgetting live ones."""
    clock, guard = make_guard()
    guard = ReplayGuard(clock, max_entries=2)
    guard.check_and_remember(b"a" * 64, CREATED)
    guard.check_and_remember(b"b" * 64, CREATED)

    with pytest.raises(SignatureError) as caught:
        guard.check_and_remember(b"c" * 64, CREATED)

    assert (caught.value.status, caught.value.code) == (429, "rate_limited")
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 301
    with pytest.raises(SignatureError, match="replayed_signature"):
        guard.check_and_remember(b"a" * 64, CREATED)


def test_replay_guard_full_recovers_after_expiry() -> None:
    """A full guard accepts new signatures once old ones expire."""
    clock, guard = make_guard()
    guard = ReplayGuard(clock, max_entries=1)
    guard.check_and_remember(b"a" * 64, CREATED)
    clock.advance(301)

    guard.check_and_remember(b"b" * 64, CREATED + 301)

    assert len(guard) == 1


# -- Fuzzing -----------------------------------------------------------------

header_values = st.one_of(
    st.none(),
    st.text(),
    st.binary().map(lambda raw: raw.decode("latin-1")),
    st.sampled_from([VECTOR_INPUT, VECTOR_SIGNATURE, VECTOR_DIGEST]),
)


def outcome(
    method: str, target: str, values: Mapping[str, str | None], now: float
) -> VerifiedRequest | SignatureError:
    """Run the verifier, returning its result or its SignatureError."""
    try:
        return verify_signed_request(
            method=method,
            target=target,
            headers=values.get,
            body_digest=VECTOR_DIGEST,
            now=now,
            replay=ReplayGuard(Clock()),
        )
    except SignatureError as e:
        return e


@settings(max_examples=500)
@given(
    method=st.text(max_size=8),
    target=st.text(),
    signature_input=header_values,
    signature=header_values,
    digest=header_values,
)
def test_fuzz_arbitrary_headers(
    method: str,
    target: str,
    signature_input: str | None,
    signature: str | None,
    digest: str | None,
) -> None:
    """Arbitrary header values only ever verify or raise SignatureError."""
    values = {
        "signature-input": signature_input,
        "signature": signature,
        "content-digest": digest,
    }

    result = outcome(method, target, values, CREATED)

    assert isinstance(result, VerifiedRequest | SignatureError)


@settings(max_examples=500)
@given(data=st.data())
def test_fuzz_mutated_valid_headers(data: st.DataObject) -> None:
    """Small edits of valid headers only ever verify or raise SignatureError."""
    values: dict[str, str | None] = {
        "signature-input": VECTOR_INPUT,
        "signature": VECTOR_SIGNATURE,
        "content-digest": VECTOR_DIGEST,
    }
    name = data.draw(st.sampled_from(sorted(values)))
    text = values[name] or ""
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 4)))
    insert = data.draw(
        st.text(max_size=4)
        | st.sampled_from(['"', "(", ")", ";", ":", ",", "=", " ", "\\"])
    )
    values[name] = text[:start] + insert + text[end:]

    result = outcome("POST", TARGET, values, CREATED)

    assert isinstance(result, VerifiedRequest | SignatureError)


def test_write_signed_before_the_guard_started_is_refused() -> None:
    """A write signed before a (re)started node's guard existed counts as a replay."""
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1_000)
    guard = ReplayGuard(clock)

    with pytest.raises(SignatureError) as raised:
        guard.check_and_remember(b"s" * 64, created=999)
    guard.check_and_remember(b"t" * 64, created=1_000)

    assert raised.value.code == "replayed_signature"
