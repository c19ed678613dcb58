"""Tests for gitlawb.git.report: push commands in, report-status out.

The push bodies and receive-pack answers are captured from real git: a
real C{git push} talks to C{git receive-pack} through an C{ext::} remote
whose command records the request, and the request is then replayed into
C{git receive-pack --stateless-rpc}, exactly as the node runs it.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitlawb.git.pktline import FLUSH, PktLineReader, Special, encode
from gitlawb.git.report import (
    PushCommandParser,
    PushProtocolError,
    RefCommand,
    RefResult,
    ReportStatusParser,
    UnpackResult,
    read_push_commands,
)

ZERO = "0" * 40
A = "a" * 40
B = "b" * 40

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "LC_ALL": "C",
}

# Records what git push sends, and relays it to a real receive-pack.
CAPTURE_SCRIPT = """#!/bin/sh
tee "$CAPTURE_REQUEST" | git "$1" "$CAPTURE_REPO"
"""

# Declines one ref, writing to stderr (which reaches the client on band 2).
UPDATE_HOOK = """#!/bin/sh
if [ "$1" = refs/heads/blocked ]; then
    echo "blocked by policy" >&2
    exit 1
fi
"""


def git(*args: str, cwd: Path | None = None, stdin: bytes = b"") -> bytes:
    """
    Run git synchronously (test set-up only) and return its stdout.
    """
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, input=stdin, capture_output=True
    ).stdout


@dataclass
class Capture:
    """
    A real push request, a way to replay it, and its plain replay's result.
    """

    request: bytes
    replay: Callable[[bytes], tuple[bytes, list[str]]]
    stdout: bytes = b""
    refs: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Capture:
    """
    Push main, feature and blocked through git, recording the request.
    """
    base = tmp_path_factory.mktemp("push")
    hooks = base / "hooks"
    hooks.mkdir()
    (hooks / "update").write_text(UPDATE_HOOK)
    (hooks / "update").chmod(0o755)
    script = base / "capture.sh"
    script.write_text(CAPTURE_SCRIPT)
    script.chmod(0o755)

    git("init", "-q", "--bare", str(base / "live.git"))
    work = base / "work"
    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("hello\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    git("branch", "feature", cwd=work)
    git("branch", "blocked", cwd=work)
    subprocess.run(
        [
            "git",
            "-c",
            "protocol.ext.allow=always",
            "push",
            "-q",
            f"ext::{script} %s",
            "main",
            "feature",
            "blocked",
        ],
        cwd=work,
        env={
            **GIT_ENV,
            "CAPTURE_REQUEST": str(base / "request"),
            "CAPTURE_REPO": str(base / "live.git"),
        },
        capture_output=True,
    )
    counter = iter(range(1000))

    def replay(request: bytes) -> tuple[bytes, list[str]]:
        """
        Run a request through stateless receive-pack on a fresh empty repo
        with the declining hook; return stdout and the refs it then has.
        """
        repo = base / f"replay-{next(counter)}.git"
        git("init", "-q", "--bare", str(repo))
        git("config", "core.hooksPath", str(hooks), cwd=repo)
        out = git("receive-pack", "--stateless-rpc", str(repo), stdin=request)
        refs = git("for-each-ref", "--format=%(refname)", cwd=repo)
        return out, refs.decode().split()

    request = (base / "request").read_bytes()
    stdout, refs = replay(request)
    return Capture(request, replay, stdout, tuple(refs))


def with_capabilities(request: bytes, edit: Callable[[set[str]], None]) -> bytes:
    """
    Rewrite the capability list of a captured push request.
    """
    reader = PktLineReader()
    packets = []
    for packet in reader.iter_feed(request):
        if packet is Special.FLUSH:
            break
        assert isinstance(packet, bytes)
        packets.append(packet)
    command, _, caps = packets[0].partition(b"\0")
    names = set(caps.decode().split())
    edit(names)
    packets[0] = command + b"\0" + " ".join(sorted(names)).encode()
    return b"".join(encode(p) for p in packets) + FLUSH + reader.buffered


def feed_in_pieces(parser: ReportStatusParser, data: bytes, cuts: list[int]) -> None:
    """
    Feed bytes split at the given offsets.
    """
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        parser.feed(data[start:point])
        start = point


# Push commands.


@pytest.mark.integration
def test_real_push_commands(capture: Capture) -> None:
    """The commands and capabilities of a real git push are read."""
    parsed = read_push_commands(io.BytesIO(capture.request))

    assert [c.ref for c in parsed.commands] == [
        "refs/heads/main",
        "refs/heads/feature",
        "refs/heads/blocked",
    ]
    assert all(c.is_create and not c.is_delete for c in parsed.commands)
    assert {"report-status-v2", "side-band-64k"} <= parsed.capabilities
    assert parsed.sideband and parsed.wants_report


@pytest.mark.integration
def test_push_commands_leave_pack_unread(capture: Capture) -> None:
    """The parser stops at the flush; the pack follows in the buffer."""
    parser = PushCommandParser()

    result = parser.feed(capture.request)

    assert result is not None
    assert parser.remainder.startswith(b"PACK")


@pytest.mark.integration
@settings(max_examples=50)
@given(cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_push_commands_any_chunking(capture: Capture, cuts: list[int]) -> None:
    """Any split of the request body gives the same commands."""
    data = capture.request
    points = sorted({c % (len(data) + 1) for c in cuts})
    parser = PushCommandParser()

    start, result = 0, None
    for point in [*points, len(data)]:
        result = parser.feed(data[start:point]) or result
        start = point

    assert result == read_push_commands(io.BytesIO(data))


def test_shallow_lines_are_collected() -> None:
    """Shallow lines before the commands are noted, not taken as commands."""
    body = (
        encode(f"shallow {B}\n")
        + encode(f"{A} {B} refs/heads/main\0report-status\n")
        + FLUSH
    )

    parsed = PushCommandParser().feed(body)

    assert parsed is not None
    assert parsed.shallow == (B,)
    assert parsed.commands == (RefCommand(A, B, "refs/heads/main"),)
    assert parsed.capabilities == frozenset({"report-status"})


def test_commands_without_capabilities() -> None:
    """A first command with no NUL has no capabilities."""
    parsed = PushCommandParser().feed(encode(f"{A} {ZERO} refs/tags/v1") + FLUSH)

    assert parsed is not None
    assert parsed.commands[0].is_delete
    assert parsed.capabilities == frozenset()
    assert not parsed.sideband and not parsed.wants_report


def test_push_certificate_commands_are_read() -> None:
    """Commands inside a push certificate are read; its signature is not."""
    body = (
        encode("push-cert\0report-status side-band-64k")
        + encode("certificate version 0.1\n")
        + encode("pusher someone 1700000000 +0000\n")
        + encode("\n")
        + encode(f"{ZERO} {A} refs/heads/main\n")
        + encode("-----BEGIN PGP SIGNATURE-----\n")
        + encode("\n")
        + encode(f"{A} {B} refs/heads/not-a-command\n")
        + encode("-----END PGP SIGNATURE-----\n")
        + encode("push-cert-end\n")
        + FLUSH
    )

    parsed = PushCommandParser().feed(body)

    assert parsed is not None
    assert parsed.push_cert
    assert parsed.commands == (RefCommand(ZERO, A, "refs/heads/main"),)
    assert parsed.sideband


@pytest.mark.parametrize(
    "line",
    [
        f"{A} {B}",
        f"{A[:-1]} {B} refs/heads/main",
        f"{A} {'b' * 64} refs/heads/main",
        f"{A.upper()} {B} refs/heads/main",
        f"{A} {B} refs/heads/a b",
    ],
)
def test_malformed_commands_are_refused(line: str) -> None:
    """Commands with bad object ids or refs are protocol errors."""
    with pytest.raises(PushProtocolError):
        PushCommandParser().feed(encode(line) + FLUSH)


def test_bad_framing_is_a_protocol_error() -> None:
    """A framing error surfaces as PushProtocolError."""
    with pytest.raises(PushProtocolError):
        PushCommandParser().feed(b"0003")


def test_truncated_body_is_refused() -> None:
    """A body that ends before its flush is refused."""
    body = encode(f"{A} {B} refs/heads/main\0report-status")

    with pytest.raises(PushProtocolError):
        read_push_commands(io.BytesIO(body))


def test_too_many_commands_are_refused() -> None:
    """More commands than the limit are refused."""
    body = b"".join(encode(f"{A} {B} refs/heads/b{i}") for i in range(3)) + FLUSH

    with pytest.raises(PushProtocolError):
        PushCommandParser(max_commands=2).feed(body)


# Report status from real receive-pack.


@pytest.mark.integration
def test_sideband_report_gives_updated_refs(capture: Capture) -> None:
    """Only the refs git accepted are reported as updated."""
    parser = ReportStatusParser(sideband=True)

    parser.feed(capture.stdout)

    assert parser.complete and parser.protocol_error is None
    assert parser.unpack == UnpackResult(None)
    assert parser.updated_refs == {"refs/heads/main", "refs/heads/feature"}
    assert parser.updated_refs == set(capture.refs)
    assert parser.refs["refs/heads/blocked"] == RefResult(
        "refs/heads/blocked", "hook declined"
    )


@pytest.mark.integration
def test_sideband_progress_is_kept(capture: Capture) -> None:
    """Band 2 text (here a hook's stderr) is kept as messages."""
    parser = ReportStatusParser(sideband=True)

    parser.feed(capture.stdout)

    assert "blocked by policy" in parser.messages


@pytest.mark.integration
@settings(max_examples=100)
@given(cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_sideband_report_any_chunking(capture: Capture, cuts: list[int]) -> None:
    """Any split of git's stdout gives the same report."""
    parser = ReportStatusParser(sideband=True)

    feed_in_pieces(parser, capture.stdout, cuts)

    assert parser.complete
    assert parser.updated_refs == {"refs/heads/main", "refs/heads/feature"}


@pytest.mark.integration
def test_plain_report_without_sideband(capture: Capture) -> None:
    """Without side-band-64k the report is read from raw pkt-lines."""
    request = with_capabilities(capture.request, lambda c: c.discard("side-band-64k"))
    out, refs = capture.replay(request)
    parser = ReportStatusParser(sideband=False)

    events = parser.feed(out)

    assert out.startswith(b"000eunpack ok\n")
    assert events[0] == UnpackResult(None)
    assert (
        parser.updated_refs
        == set(refs)
        == {
            "refs/heads/main",
            "refs/heads/feature",
        }
    )


@pytest.mark.integration
def test_report_status_version_one(capture: Capture) -> None:
    """A report-status (v1) answer reads the same as v2."""

    def v1(caps: set[str]) -> None:
        caps.discard("report-status-v2")
        caps.add("report-status")

    out, refs = capture.replay(with_capabilities(capture.request, v1))
    parser = ReportStatusParser(sideband=True)

    parser.feed(out)

    assert parser.updated_refs == set(refs)


@pytest.mark.integration
def test_atomic_push_updates_nothing(capture: Capture) -> None:
    """An atomic push with one declined ref updates no ref at all."""
    out, refs = capture.replay(
        with_capabilities(capture.request, lambda c: c.add("atomic"))
    )
    parser = ReportStatusParser(sideband=True)

    parser.feed(out)

    assert refs == []
    assert parser.updated_refs == frozenset()
    assert not any(r.ok for r in parser.refs.values())


@pytest.mark.integration
def test_corrupt_pack_reports_unpack_error(capture: Capture) -> None:
    """A truncated pack gives an unpack error and no updated refs."""
    out, refs = capture.replay(capture.request[:-30])
    parser = ReportStatusParser(sideband=True)

    parser.feed(out)

    assert refs == []
    assert parser.unpack is not None and not parser.unpack.ok
    assert parser.updated_refs == frozenset()


# Report status, synthetic.


def sideband(band: int, data: bytes) -> bytes:
    """
    Wrap bytes in one side-band packet.
    """
    return encode(bytes([band]) + data)


def test_v2_option_lines_are_tolerated() -> None:
    """report-status-v2 option lines after an ok do not disturb the report."""
    report = (
        encode("unpack ok\n")
        + encode("ok refs/heads/main\n")
        + encode("option refname refs/heads/main\n")
        + encode(f"option new-oid {A}\n")
        + encode("option forced-update\n")
        + encode("ng refs/heads/x non-fast-forward\n")
        + FLUSH
    )
    parser = ReportStatusParser(sideband=False)

    events = parser.feed(report)

    assert events == [
        UnpackResult(None),
        RefResult("refs/heads/main", None),
        RefResult("refs/heads/x", "non-fast-forward"),
    ]
    assert parser.complete and parser.updated_refs == {"refs/heads/main"}


def test_inner_packets_split_across_bands() -> None:
    """Inner pkt-lines split across band-1 packets are reassembled."""
    inner = encode("unpack ok\n") + encode("ok refs/heads/main\n") + FLUSH
    stream = (
        sideband(1, inner[:7])
        + sideband(2, b"progress\r")
        + sideband(1, inner[7:])
        + FLUSH
    )
    parser = ReportStatusParser(sideband=True)

    parser.feed(stream)

    assert parser.updated_refs == {"refs/heads/main"}
    assert parser.messages == "progress\r"


def test_band_three_is_a_fatal_error() -> None:
    """Band 3 text is recorded as git's fatal error."""
    parser = ReportStatusParser(sideband=True)

    parser.feed(sideband(3, b"fatal: the remote end hung up\n"))

    assert parser.fatal_error == "fatal: the remote end hung up"
    assert parser.updated_refs == frozenset()


def test_unpack_failure_hides_ok_refs() -> None:
    """An ok ref after a failed unpack is not reported as updated."""
    parser = ReportStatusParser(sideband=False)

    parser.feed(encode("unpack eof before pack header\n") + encode("ok refs/x\n"))

    assert parser.unpack == UnpackResult("eof before pack header")
    assert parser.updated_refs == frozenset()


@pytest.mark.parametrize(
    ("stream", "is_sideband"),
    [
        (encode("ok refs/heads/main\n"), False),
        (encode("unpack ok\n") + encode("maybe refs/heads/main\n"), False),
        (encode("unpack ok\n") + FLUSH + encode("ok refs/heads/late\n"), False),
        (b"zzzz", False),
        (sideband(7, b"x"), True),
        (encode(b""), True),
    ],
)
def test_malformed_report_sets_protocol_error(stream: bytes, is_sideband: bool) -> None:
    """A malformed stream never raises; it marks the parser failed."""
    parser = ReportStatusParser(sideband=is_sideband)

    parser.feed(stream)

    assert parser.protocol_error is not None
    assert parser.feed(encode("unpack ok\n")) == []


def test_messages_are_bounded() -> None:
    """Progress text is kept up to 64 KiB only."""
    parser = ReportStatusParser(sideband=True)
    chunk = sideband(2, b"x" * 60000)

    parser.feed(chunk + chunk)

    assert len(parser.messages) == 64 * 1024
