"""Unit tests for gitlawb.git.process, on a fake process reactor and Clock."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IConsumer, IProducer, IPullProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gitlawb.git.process import (
    GitCancelled,
    GitProcess,
    GitTimeout,
    git_environment,
    sanitize_git_protocol,
    service_command,
)


class FakeTransport:
    """
    Stands in for Twisted's process transport; pid None means no signal is
    ever really sent.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self.stdin = bytearray()
        self.stdin_closed = False
        self.paused = False
        self.producer: IPullProducer | None = None

    def write(self, data: bytes) -> None:
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def registerProducer(self, producer: IPullProducer, streaming: bool) -> None:
        assert not streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def drain(self) -> None:
        """
        Ask the stdin producer for chunks until it unregisters.
        """
        while self.producer is not None:
            self.producer.resumeProducing()


class FakeProcessReactor(Clock):
    """
    A Clock that records spawnProcess calls and connects a fake transport.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        **kwargs: object,
    ) -> FakeTransport:
        transport = FakeTransport()
        self.spawned.append(
            {
                "executable": executable,
                "args": list(args),
                "env": env,
                "path": path,
                "protocol": processProtocol,
                "transport": transport,
            }
        )
        processProtocol.makeConnection(transport)  # type: ignore[arg-type]
        return transport


@implementer(IConsumer)
class RecordingConsumer:
    """
    Collects writes and remembers its producer.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.producer: IProducer | None = None
        self.unregistered = False

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data


def end(reactor: FakeProcessReactor, reason: Exception) -> None:
    """
    Report the (only) spawned process as ended.
    """
    reactor.spawned[-1]["protocol"].processEnded(Failure(reason))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("version=2", "version=2"),
        (" version=1 ", "version=1"),
        ("version=2:object-format=sha1", "version=2:object-format=sha1"),
        ("version=3", None),
        ("version=2;rm -rf", None),
        ("version=2\nX=1", None),
        ("", None),
        (None, None),
        ("a=" + "b" * 300, None),
    ],
)
def test_sanitize_git_protocol(value: str | None, expected: str | None) -> None:
    """Only short, safe key=value lists with a known version pass."""
    assert sanitize_git_protocol(value) == expected


def test_environment_is_minimal() -> None:
    """The child sees no system or global config and no inherited GIT_DIR."""
    os.environ["GIT_DIR"] = "/somewhere"
    try:
        env = git_environment("version=2")
    finally:
        del os.environ["GIT_DIR"]

    assert "GIT_DIR" not in env
    assert env["GIT_PROTOCOL"] == "version=2"
    assert env["GIT_CONFIG_NOSYSTEM"] == "1"
    assert env["GIT_CONFIG_GLOBAL"] == os.devnull


def test_environment_refuses_unsafe_protocol() -> None:
    """An unchecked GIT_PROTOCOL value is refused."""
    with pytest.raises(ValueError):
        git_environment("version=2:x;y")


def test_service_command() -> None:
    """Services map to stateless-rpc commands, git- prefix or not."""
    repo = Path("/repos/z6Mk/r.git")

    assert service_command("git-upload-pack", repo, advertise_refs=True) == [
        "upload-pack",
        "--stateless-rpc",
        "--advertise-refs",
        "/repos/z6Mk/r.git",
    ]
    assert service_command("receive-pack", repo)[0] == "receive-pack"


def test_service_command_refuses_other_services() -> None:
    """Only upload-pack and receive-pack may be run."""
    with pytest.raises(ValueError):
        service_command("git-upload-archive", Path("/r.git"))


class GitProcessTests(SynchronousTestCase):
    """
    GitProcess on a fake reactor.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.consumer = RecordingConsumer()

    def start(self, **kwargs: Any) -> GitProcess:
        kwargs.setdefault("consumer", self.consumer)
        process = GitProcess(["upload-pack", "/r.git"], reactor=self.reactor, **kwargs)
        process.start()
        return process

    def transport(self) -> FakeTransport:
        transport: FakeTransport = self.reactor.spawned[-1]["transport"]
        return transport

    def test_runs_git_in_a_new_session(self) -> None:
        """git is started through setsid, so it leads its own group."""
        self.start()

        args = self.reactor.spawned[0]["args"]
        self.assertEqual(args[-3:], ["git", "upload-pack", "/r.git"])
        self.assertTrue(args[0].endswith("setsid") or "os.setsid()" in args[2])

    def test_stdin_is_streamed_then_closed(self) -> None:
        """The request file reaches stdin in chunks and stdin is closed."""
        body = os.urandom(200_000)
        process = self.start(stdin=io.BytesIO(body))

        self.transport().drain()

        self.assertEqual(bytes(self.transport().stdin), body)
        self.assertTrue(self.transport().stdin_closed)
        self.assertEqual(process.bytes_in, len(body))

    def test_no_stdin_closes_at_once(self) -> None:
        """Without a request file stdin is closed immediately."""
        self.start()

        self.assertTrue(self.transport().stdin_closed)

    def test_stdout_is_tapped_and_forwarded(self) -> None:
        """Every stdout chunk goes to the tap, then the consumer."""
        seen: list[bytes] = []
        process = self.start(tap=seen.append)
        protocol = self.reactor.spawned[0]["protocol"]

        protocol.outReceived(b"abc")
        protocol.outReceived(b"de")

        self.assertEqual(seen, [b"abc", b"de"])
        self.assertEqual(bytes(self.consumer.data), b"abcde")
        self.assertEqual(process.bytes_out, 5)

    def test_failing_tap_is_dropped(self) -> None:
        """A tap that raises is dropped; the consumer still gets the data."""

        def broken(data: bytes) -> None:
            raise RuntimeError("boom")

        self.start(tap=broken)
        protocol = self.reactor.spawned[0]["protocol"]

        protocol.outReceived(b"x")
        protocol.outReceived(b"y")

        self.assertEqual(bytes(self.consumer.data), b"xy")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_consumer_pause_pauses_git_output(self) -> None:
        """Pausing the registered producer pauses reading git's stdout."""
        process = self.start()
        assert self.consumer.producer is not None

        self.consumer.producer.pauseProducing()
        paused = (self.transport().paused, process.paused)
        self.consumer.producer.resumeProducing()

        self.assertEqual(paused, (True, True))
        self.assertFalse(self.transport().paused)

    def test_exit_status(self) -> None:
        """finished fires with the exit status, after unregistering."""
        process = self.start()

        end(self.reactor, ProcessTerminated(exitCode=3))

        self.assertEqual(self.successResultOf(process.finished), 3)
        self.assertTrue(self.consumer.unregistered)

    def test_clean_exit(self) -> None:
        """A clean exit fires with 0 and leaves no timer behind."""
        process = self.start(timeout=10)

        end(self.reactor, ProcessDone(0))

        self.assertEqual(self.successResultOf(process.finished), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_foreign_signal_is_negative_status(self) -> None:
        """Death by a signal this object did not send is -signal."""
        process = self.start()

        end(self.reactor, ProcessTerminated(signal=9))

        self.assertEqual(self.successResultOf(process.finished), -9)

    def test_timeout_fails_with_git_timeout(self) -> None:
        """Past the deadline the group is killed and finished fails."""
        process = self.start(timeout=10, kill_grace=2)

        self.reactor.advance(10)
        self.assertNoResult(process.finished)
        end(self.reactor, ProcessTerminated(signal=15))

        self.failureResultOf(process.finished, GitTimeout)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_kill_resumes_paused_output(self) -> None:
        """A killed child's stdout is drained, else its end never comes."""
        self.start(timeout=10)
        assert self.consumer.producer is not None
        self.consumer.producer.pauseProducing()

        self.reactor.advance(10)

        self.assertFalse(self.transport().paused)

    def test_output_after_kill_is_discarded(self) -> None:
        """After a kill, stdout no longer reaches the consumer."""
        process = self.start()
        protocol = self.reactor.spawned[0]["protocol"]

        process.cancel()
        protocol.outReceived(b"late")

        self.assertEqual(bytes(self.consumer.data), b"")

    def test_cancel_fails_with_git_cancelled(self) -> None:
        """cancel() kills the group; finished fails with GitCancelled."""
        process = self.start()

        process.cancel("client gone")
        end(self.reactor, ProcessTerminated(signal=15))

        failure = self.failureResultOf(process.finished, GitCancelled)
        self.assertEqual(failure.value.reason, "client gone")

    def test_consumer_stop_cancels(self) -> None:
        """A consumer that stops its producer cancels git."""
        process = self.start()
        assert self.consumer.producer is not None

        self.consumer.producer.stopProducing()
        end(self.reactor, ProcessTerminated(signal=15))

        self.failureResultOf(process.finished, GitCancelled)

    def test_cancel_before_start(self) -> None:
        """Cancelling an unstarted process fails finished at once."""
        process = GitProcess(["upload-pack"], reactor=self.reactor)

        process.cancel()

        self.failureResultOf(process.finished, GitCancelled)
        self.assertEqual(self.reactor.spawned, [])

    def test_stderr_keeps_the_tail(self) -> None:
        """Only the last stderr_limit bytes of stderr are kept."""
        process = self.start(stderr_limit=4)
        protocol = self.reactor.spawned[0]["protocol"]

        protocol.errReceived(b"abc")
        protocol.errReceived(b"defg")

        self.assertEqual(process.stderr, b"defg")
