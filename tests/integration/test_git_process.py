"""GitProcess against real git and real child processes."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorProcess
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from gitlawb.git.pktline import FLUSH, PktLineReader, Special, encode
from gitlawb.git.process import (
    GitCancelled,
    GitOutputTooLarge,
    GitProcess,
    GitTimeout,
    run_git,
    service_command,
)

pytestmark = pytest.mark.integration

REACTOR: IReactorProcess = reactor  # type: ignore[assignment]

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}

# A stand-in for git that prints its pid and a grandchild's, then waits.
SLEEPER = """#!/bin/sh
{trap}
sleep 100 &
echo "$$ $!"
wait
"""


def git(*args: str, cwd: Path | None = None) -> str:
    """
    Run git synchronously for test set-up.
    """
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True
    ).stdout.decode()


def make_repo(base: Path, blob_size: int = 0) -> tuple[Path, str]:
    """
    A bare repository with one commit (holding a random blob of the given
    size), and that commit's id.
    """
    work = base / "work"
    git("init", "-q", "-b", "main", str(work))
    (work / "big.bin").write_bytes(os.urandom(blob_size))
    git("add", "big.bin", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    bare = base / "repo.git"
    git("clone", "-q", "--bare", str(work), str(bare))
    return bare, git("rev-parse", "HEAD", cwd=work).strip()


def is_gone(pid: int) -> bool:
    """
    Whether a process has exited (absent, or a zombie nobody reaped yet).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@implementer(IConsumer)
class PausingConsumer:
    """
    Collects output; pauses its producer after the first write.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.producer: IPushProducer | None = None
        self.pause_after_first = True

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.pause_after_first and self.producer is not None:
            self.pause_after_first = False
            self.producer.pauseProducing()


def demultiplex(response: bytes) -> tuple[list[bytes], bytes]:
    """
    Split an upload-pack v0 response into its leading pkt-lines and the
    pack carried on side-band 1.
    """
    reader = PktLineReader()
    lines, pack = [], bytearray()
    for packet in reader.feed(response):
        if isinstance(packet, Special):
            continue
        if packet.startswith(b"\x01"):
            pack += packet[1:]
        elif packet[:1] not in (b"\x02", b"\x03"):
            lines.append(packet)
    return lines, bytes(pack)


class GitProcessTests(TestCase):
    """
    GitProcess with real processes on the global reactor.
    """

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp())
        self.addCleanup(subprocess.run, ["rm", "-rf", str(self.base)])

    def sleeper(self, ignore_term: bool = False) -> str:
        """
        Write the fake git script and return its path.
        """
        script = self.base / "fake-git"
        trap = "trap '' TERM" if ignore_term else ""
        script.write_text(SLEEPER.format(trap=trap))
        script.chmod(0o755)
        return str(script)

    async def started_sleeper(
        self, clock: Clock, ignore_term: bool = False, **kwargs: object
    ) -> tuple[GitProcess, int, int]:
        """
        Start the fake git and wait until it has printed its pids.
        """
        printed: Deferred[bytes] = Deferred()

        def tap(data: bytes) -> None:
            if not printed.called:
                printed.callback(data)

        process = GitProcess(
            [],
            reactor=REACTOR,
            clock=clock,
            executable=self.sleeper(ignore_term),
            tap=tap,
            **kwargs,  # type: ignore[arg-type]
        )
        process.start()
        shell, sleep = (int(p) for p in (await printed).split())
        return process, shell, sleep

    async def test_advertise_refs(self) -> None:
        """--advertise-refs lists HEAD and the branch, then a flush."""
        repo, head = make_repo(self.base)
        consumer = PausingConsumer()
        consumer.pause_after_first = False
        process = GitProcess(
            service_command("git-upload-pack", repo, advertise_refs=True),
            reactor=REACTOR,
            consumer=consumer,
        )

        status = await process.start()

        output = b"".join(consumer.chunks)
        self.assertEqual(status, 0)
        first = PktLineReader().feed(output)[0]
        self.assertIsInstance(first, bytes)
        self.assertTrue(bytes(first).startswith(f"{head} HEAD\0".encode()))
        self.assertIn(f"{head} refs/heads/main\n".encode(), output)
        self.assertTrue(output.endswith(FLUSH))
        self.assertEqual(process.bytes_out, len(output))

    async def test_advertise_refs_protocol_v2(self) -> None:
        """With GIT_PROTOCOL version=2, git advertises v2 capabilities."""
        repo, _ = make_repo(self.base)
        out: list[bytes] = []
        process = GitProcess(
            service_command("upload-pack", repo, advertise_refs=True),
            reactor=REACTOR,
            tap=out.append,
            git_protocol="version=2",
        )

        await process.start()

        self.assertTrue(b"".join(out).startswith(encode("version 2\n")))

    async def test_clone_streams_with_backpressure(self) -> None:
        """A paused consumer stops git's output; resuming completes a clone."""
        repo, head = make_repo(self.base, blob_size=3 * 1024 * 1024)
        request = self.base / "request"
        request.write_bytes(
            encode(f"want {head} side-band-64k ofs-delta\n") + FLUSH + encode("done\n")
        )
        consumer = PausingConsumer()

        with request.open("rb") as body:
            process = GitProcess(
                service_command("upload-pack", repo),
                reactor=REACTOR,
                stdin=body,
                consumer=consumer,
            )
            process.start()
            while not consumer.chunks:
                await deferLater(reactor, 0.01)  # type: ignore[arg-type]
            await deferLater(reactor, 0.5)  # type: ignore[arg-type]
            written_while_paused = len(consumer.chunks)
            finished_while_paused = process.finished.called
            paused = process.paused
            assert consumer.producer is not None
            consumer.producer.resumeProducing()
            status = await process.finished

        self.assertEqual((paused, written_while_paused), (True, 1))
        self.assertFalse(finished_while_paused)
        self.assertEqual(status, 0)
        self.assertEqual(process.bytes_in, request.stat().st_size)
        response = b"".join(consumer.chunks)
        self.assertEqual(process.bytes_out, len(response))
        lines, pack = demultiplex(response)
        self.assertEqual(lines, [b"NAK\n"])
        check = self.base / "check.git"
        git("init", "-q", "--bare", str(check))
        indexed = subprocess.run(
            ["git", "index-pack", "--stdin"],
            cwd=check,
            input=pack,
            env=GIT_ENV,
            capture_output=True,
        )
        self.assertEqual(indexed.returncode, 0, indexed.stderr)

    async def test_large_stdin_round_trip(self) -> None:
        """Megabytes of stdin reach the child intact (cat echoes them)."""
        payload = os.urandom(5 * 1024 * 1024)
        source = self.base / "payload"
        source.write_bytes(payload)
        out: list[bytes] = []

        with source.open("rb") as body:
            process = GitProcess(
                [], reactor=REACTOR, stdin=body, tap=out.append, executable="cat"
            )
            status = await process.start()

        self.assertEqual(status, 0)
        self.assertEqual(b"".join(out), payload)
        self.assertEqual((process.bytes_in, process.bytes_out), (len(payload),) * 2)

    async def test_timeout_kills_the_process_group(self) -> None:
        """At the deadline git and its children die; finished fails."""
        clock = Clock()
        process, shell, sleep = await self.started_sleeper(clock, timeout=30)

        clock.advance(30)

        with self.assertRaises(GitTimeout):
            await process.finished
        self.assertTrue(is_gone(shell))
        self.assertTrue(is_gone(sleep))

    async def test_sigkill_after_grace(self) -> None:
        """A group that ignores SIGTERM is killed after the grace period."""
        clock = Clock()
        process, shell, sleep = await self.started_sleeper(
            clock, ignore_term=True, timeout=30, kill_grace=5
        )

        clock.advance(30)
        await deferLater(reactor, 0.3)  # type: ignore[arg-type]
        survived_term = not process.finished.called
        clock.advance(5)

        with self.assertRaises(GitTimeout):
            await process.finished
        self.assertTrue(survived_term)
        self.assertTrue(is_gone(shell) and is_gone(sleep))

    async def test_cancel_kills_the_process_group(self) -> None:
        """cancel() kills git and its children; finished fails."""
        clock = Clock()
        process, shell, sleep = await self.started_sleeper(clock)

        process.cancel("shutdown")

        with self.assertRaises(GitCancelled):
            await process.finished
        self.assertTrue(is_gone(shell))
        self.assertTrue(is_gone(sleep))
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_child_leads_its_own_group(self) -> None:
        """The child's pid is its process group id, not ours."""
        clock = Clock()
        process, shell, _ = await self.started_sleeper(clock)

        group = os.getpgid(shell)
        process.cancel()
        with self.assertRaises(GitCancelled):
            await process.finished

        self.assertEqual((group, process.pid), (shell, shell))
        self.assertNotEqual(group, os.getpgrp())

    async def test_run_git_collects_output(self) -> None:
        """run_git returns status and output, failing statuses included."""
        repo, head = make_repo(self.base)

        good = await run_git(["rev-parse", "HEAD"], reactor=REACTOR, cwd=repo)
        bad = await run_git(
            ["rev-parse", "--verify", "nope"], reactor=REACTOR, cwd=repo
        )

        self.assertEqual(good.stdout.decode().strip(), head)
        self.assertTrue(good.ok)
        self.assertFalse(bad.ok)
        self.assertIn(b"fatal", bad.stderr)

    async def test_run_git_bounds_output(self) -> None:
        """run_git kills a command whose output exceeds the limit."""
        repo, head = make_repo(self.base, blob_size=1024 * 1024)

        with self.assertRaises(GitOutputTooLarge):
            await run_git(
                ["cat-file", "blob", f"{head}:big.bin"],
                reactor=REACTOR,
                cwd=repo,
                max_output=1000,
            )
