"""Running git child processes without blocking the reactor.

L{GitProcess} runs one git command (typically C{git upload-pack} or C{git
receive-pack --stateless-rpc}) through C{reactor.spawnProcess}, streams a
request file into its stdin and its stdout into a consumer, both with
backpressure, and bounds it in time. L{run_git} is the small-output form
used for repository housekeeping and reads.

Every child runs in a process group of its own, so a timeout, a cancel or a
shutdown kills git together with whatever it spawned (C{pack-objects},
C{index-pack}, hooks). Twisted's C{spawnProcess} has no C{setsid} option
(it only starts a session for a pty), so the child is started through
C{setsid(1)}: a freshly spawned child is never a group leader, so C{setsid}
calls C{setsid()} and execs git in the same process, and the pid Twisted
reports is the new group's id. Where C{setsid(1)} is missing, a two-line
Python trampoline does the same.

Killing sends SIGTERM to the group first, so git can remove its lock files
and quarantine directory, then SIGKILL after a grace period.

The child's environment is built from scratch: PATH, HOME, C{LC_ALL=C}
(log messages in English), no system or global git config (a repository
behaves as its own config says, whatever the host's ~/.gitconfig holds),
never a terminal prompt, plus C{GIT_PROTOCOL} when the client asked for one.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import io
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPullProducer,
    IPushProducer,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "GitCancelled",
    "GitError",
    "GitOutputTooLarge",
    "GitProcess",
    "GitResult",
    "GitTimeout",
    "git_environment",
    "run_git",
    "sanitize_git_protocol",
    "service_command",
]

_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

# The services a smart HTTP client may ask for, with or without "git-".
_SERVICES = frozenset({"upload-pack", "receive-pack"})

# GIT_PROTOCOL is a colon-separated list of key or key=value items.
_PROTOCOL_ITEM = r"[A-Za-z0-9._-]+(?:=[A-Za-z0-9._-]*)?"
_GIT_PROTOCOL = re.compile(rf"\A{_PROTOCOL_ITEM}(?::{_PROTOCOL_ITEM})*\Z")

_TRAMPOLINE = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"

# git's stdout is read in chunks of up to STDOUT_READ_SIZE from a pipe of
# STDOUT_PIPE_SIZE.  Twisted's pipe reader takes 8 KiB at a time from a 64 KiB
# pipe, and every read costs a reactor turn, a consumer write (an HTTP chunk)
# and a socket send: for a clone that overhead, not git, bounded the rate.
STDOUT_PIPE_SIZE = 1024 * 1024
STDOUT_READ_SIZE = 256 * 1024


class GitError(Exception):
    """
    Base class of the failures of a git child process.
    """


class GitTimeout(GitError):
    """
    The process ran past its deadline and was killed.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"git ran longer than {seconds:g} s and was killed")
        self.seconds = seconds


class GitCancelled(GitError):
    """
    The process was killed on request (client gone, shutdown deadline).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"git was cancelled: {reason}")
        self.reason = reason


class GitOutputTooLarge(GitError):
    """
    The process wrote more than the caller would hold, and was killed.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"git output exceeded {limit} bytes")
        self.limit = limit


def sanitize_git_protocol(value: str | None) -> str | None:
    """
    Check a C{Git-Protocol} request header for use as C{GIT_PROTOCOL}.

    @return: the value when it is a short list of safe C{key[=value]} items
        whose C{version}, if present, is 0, 1 or 2; else C{None} (the client
        then gets protocol v0, as from a server that ignores the header).
    """
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 256 or not _GIT_PROTOCOL.match(value):
        return None
    for item in value.split(":"):
        key, _, version = item.partition("=")
        if key == "version" and version not in ("0", "1", "2"):
            return None
    return value


def git_environment(
    git_protocol: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """
    The environment of every git child (see the module docstring).

    @raise ValueError: when C{git_protocol} is not safe to pass on.
    """
    env = {
        "PATH": os.environ.get("PATH", _DEFAULT_PATH),
        "HOME": os.environ.get("HOME", "/"),
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
    }
    if git_protocol is not None:
        if sanitize_git_protocol(git_protocol) != git_protocol:
            raise ValueError(f"unsafe GIT_PROTOCOL value {git_protocol!r}")
        env["GIT_PROTOCOL"] = git_protocol
    if extra:
        env.update(extra)
    return env


def service_command(
    service: str, repo: Path, *, advertise_refs: bool = False
) -> list[str]:
    """
    The git arguments of a stateless-rpc smart HTTP service: C{<service>
    --stateless-rpc [--advertise-refs] <repo>}.

    @param service: C{upload-pack} or C{receive-pack}, with or without the
        C{git-} prefix.
    @raise ValueError: for any other service.
    """
    name = service.removeprefix("git-")
    if name not in _SERVICES:
        raise ValueError(f"not a git smart HTTP service: {service!r}")
    args = [name, "--stateless-rpc"]
    if advertise_refs:
        args.append("--advertise-refs")
    args.append(str(repo))
    return args


@functools.cache
def _session_leader_prefix() -> tuple[str, ...]:
    """
    The argv prefix that runs a command as the leader of a new session.
    """
    setsid = shutil.which("setsid")
    if setsid is not None:
        return (setsid,)
    return (sys.executable, "-c", _TRAMPOLINE)


class _ProcessTransport(Protocol):
    """
    What this module uses of Twisted's POSIX process transport, beyond
    C{IProcessTransport} (which leaves out its producer/consumer methods).
    """

    pid: int | None

    def write(self, data: bytes) -> None: ...

    def closeStdin(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def registerProducer(self, producer: object, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


@implementer(IPushProducer)
class _StdoutProducer:
    """
    The producer a L{GitProcess} registers with its consumer: pausing it
    stops reading git's stdout, so a slow client blocks git on a full pipe
    instead of filling memory.
    """

    def __init__(self, process: GitProcess) -> None:
        self._process = process

    def pauseProducing(self) -> None:
        self._process._pause_output()

    def resumeProducing(self) -> None:
        self._process._resume_output()

    def stopProducing(self) -> None:
        self._process.cancel("the consumer stopped")


@implementer(IPullProducer)
class _StdinFeeder:
    """
    Copies the request file into git's stdin, one chunk each time the pipe
    has drained, then closes stdin.

    If git closes its stdin first (it exited, or has read all it wants),
    the transport stops this producer and the rest of the file is left
    unread; the exit status tells the caller what happened.
    """

    chunk_size = 64 * 1024

    def __init__(
        self, owner: GitProcess, source: IO[bytes], transport: _ProcessTransport
    ) -> None:
        self._owner = owner
        self._source = source
        self._transport = transport
        self._done = False

    def start(self) -> None:
        """
        Register with the stdin pipe, which asks for the first chunk.
        """
        self._transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._done:
            return
        chunk = self._source.read(self.chunk_size)
        if not chunk:
            self._done = True
            self._transport.unregisterProducer()
            self._transport.closeStdin()
            return
        self._owner.bytes_in += len(chunk)
        self._transport.write(chunk)

    def stopProducing(self) -> None:
        if not self._done:
            self._done = True
            self._owner.log.debug(
                "git closed stdin early pid={pid} after={count}",
                pid=self._owner.pid,
                count=self._owner.bytes_in,
            )


class _PipeReader(Protocol):
    """
    What this module uses of Twisted's C{ProcessReader}, the selectable of
    one of the child's output pipes.
    """

    fd: int

    def dataReceived(self, data: bytes) -> None: ...


def _read_large(reader: _PipeReader, size: int = STDOUT_READ_SIZE) -> object:
    """
    C{ProcessReader.doRead} reading up to C{size} bytes at once: otherwise
    what C{twisted.internet.fdesc.readFromFD} does.

    @return: what C{doRead} returns: C{None} to go on, or why the pipe
        closed.
    """
    try:
        data = os.read(reader.fd, size)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EINTR):
            return None
        return CONNECTION_LOST
    if not data:
        return CONNECTION_DONE
    reader.dataReceived(data)
    return None


def _widen_stdout(transport: object) -> None:
    """
    Read the child's stdout in large chunks from a large pipe (see
    L{STDOUT_READ_SIZE}) when the transport is Twisted's POSIX process;
    leave any other transport as it is.
    """
    pipes = getattr(transport, "pipes", None)
    reader = pipes.get(1) if isinstance(pipes, dict) else None
    if reader is None or not isinstance(getattr(reader, "fd", None), int):
        return
    try:
        fcntl.fcntl(reader.fd, fcntl.F_SETPIPE_SZ, STDOUT_PIPE_SIZE)
    except (OSError, AttributeError):
        # Not Linux, or above /proc/sys/fs/pipe-max-size: the default pipe
        # works too, with more reactor turns.
        pass
    reader.doRead = functools.partial(_read_large, reader)


class _GitProcessProtocol(ProcessProtocol):
    """
    Hands the child's events to its L{GitProcess}.
    """

    def __init__(self, owner: GitProcess) -> None:
        self._owner = owner

    def connectionMade(self) -> None:
        self._owner._connected(cast(_ProcessTransport, self.transport))

    def outReceived(self, data: bytes) -> None:
        self._owner._stdout(data)

    def errReceived(self, data: bytes) -> None:
        self._owner._stderr(data)

    def processEnded(self, reason: Failure) -> None:
        self._owner._ended(reason)


class GitProcess:
    """
    One git child process with streamed stdin and stdout.

    @ivar finished: fires with the exit status once the child has exited
        and closed its pipes (a negative number -N when it died of signal N
        that this object did not send), or fails with L{GitTimeout} or
        L{GitCancelled} once a killed child is gone.
    @ivar bytes_in: bytes written to git's stdin so far.
    @ivar bytes_out: bytes read from git's stdout so far.
    @ivar pid: the child's pid, which is also its process group id, once
        started.
    """

    log = Logger()

    def __init__(
        self,
        args: Sequence[str],
        *,
        reactor: IReactorProcess,
        clock: IReactorTime | None = None,
        stdin: IO[bytes] | None = None,
        consumer: IConsumer | None = None,
        tap: Callable[[bytes], object] | None = None,
        timeout: float | None = 600.0,
        kill_grace: float = 5.0,
        git_protocol: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        executable: str = "git",
        stderr_limit: int = 64 * 1024,
    ) -> None:
        """
        @param args: the git arguments, after C{git}.
        @param reactor: spawns the child.
        @param clock: times the deadline and the kill grace; the reactor
            when not given.
        @param stdin: read from its current position to EOF into git's
            stdin, which is then closed; with C{None} stdin is closed at
            once.
        @param consumer: receives git's stdout, and gets a streaming
            producer registered for the child's lifetime (unregistered just
            before L{finished} fires).
        @param tap: called with every stdout chunk before the consumer sees
            it; an exception it raises is logged and the tap dropped.
        @param timeout: seconds from start until the group is killed; None
            for no deadline.
        @param kill_grace: seconds between SIGTERM and SIGKILL.
        @param git_protocol: passed as C{GIT_PROTOCOL}; must pass
            L{sanitize_git_protocol}.
        @param executable: the git to run (tests substitute a script).
        @param stderr_limit: how much of the end of stderr to keep.
        """
        self._args = list(args)
        # What the logs call this process: the git subcommand.
        self._command = self._args[0] if self._args else executable
        self._reactor = reactor
        self._clock = clock if clock is not None else cast(IReactorTime, reactor)
        self._stdin = stdin
        self._consumer = consumer
        self._tap = tap
        self._timeout = timeout
        self._kill_grace = kill_grace
        self._env = git_environment(git_protocol, extra_env)
        self._cwd = cwd
        self._executable = executable
        self._stderr_limit = stderr_limit

        self.finished: Deferred[int] = Deferred()
        self.bytes_in = 0
        self.bytes_out = 0
        self.pid: int | None = None
        self._stderr_tail = bytearray()
        self._transport: _ProcessTransport | None = None
        self._started_at = 0.0
        self._deadline: IDelayedCall | None = None
        self._hard_kill: IDelayedCall | None = None
        self._outcome: GitError | None = None
        self._paused = False
        self._discarding = False
        self._ended_already = False
        self._producer_registered = False

    @property
    def stderr(self) -> bytes:
        """
        The last C{stderr_limit} bytes git wrote to stderr.
        """
        return bytes(self._stderr_tail)

    @property
    def paused(self) -> bool:
        """
        Whether reading git's stdout is paused by the consumer.
        """
        return self._paused

    def start(self) -> Deferred[int]:
        """
        Spawn the child.

        @return: L{finished}.
        """
        if self._transport is not None or self._ended_already:
            return self.finished
        self._started_at = self._clock.seconds()
        argv = [*_session_leader_prefix(), self._executable, *self._args]
        try:
            self._reactor.spawnProcess(
                _GitProcessProtocol(self),
                argv[0],
                argv,
                env=self._env,
                path=str(self._cwd) if self._cwd is not None else None,
            )
        except Exception:
            self._ended_already = True
            self.finished.errback()
            return self.finished
        if self._timeout is not None and not self._ended_already:
            self._deadline = self._clock.callLater(self._timeout, self._expire)
        return self.finished

    def cancel(self, reason: str = "cancelled") -> None:
        """
        Kill the process group; L{finished} then fails with L{GitCancelled}
        (unless the child had already finished or timed out).
        """
        if self._ended_already:
            return
        if self._transport is None:
            self._ended_already = True
            self.finished.errback(GitCancelled(reason))
            return
        if self._outcome is None:
            self._outcome = GitCancelled(reason)
            self.log.info(
                "git cancelled pid={pid} command={command} reason={reason}",
                pid=self.pid,
                command=self._command,
                reason=reason,
            )
        self._terminate()

    # Process events.

    def _connected(self, transport: _ProcessTransport) -> None:
        """
        The child exists: feed its stdin, attach its stdout.

        Twisted calls this from inside C{spawnProcess}.
        """
        self._transport = transport
        self.pid = transport.pid
        self.log.debug(
            "git started pid={pid} args={args}", pid=self.pid, args=self._args
        )
        _widen_stdout(transport)
        if self._consumer is not None:
            self._consumer.registerProducer(_StdoutProducer(self), True)
            self._producer_registered = True
        if self._stdin is None:
            transport.closeStdin()
        else:
            _StdinFeeder(self, self._stdin, transport).start()

    def _stdout(self, data: bytes) -> None:
        """
        Count, tap and forward a stdout chunk.
        """
        if self._discarding:
            return
        self.bytes_out += len(data)
        if self._tap is not None:
            try:
                self._tap(data)
            except Exception:
                self.log.failure("git stdout tap failed; dropping it")
                self._tap = None
        if self._consumer is not None:
            self._consumer.write(data)

    def _stderr(self, data: bytes) -> None:
        """
        Keep the end of stderr for the logs.
        """
        self._stderr_tail += data
        excess = len(self._stderr_tail) - self._stderr_limit
        if excess > 0:
            del self._stderr_tail[:excess]

    def _pause_output(self) -> None:
        if self._transport is None or self._discarding or self._ended_already:
            return
        self._paused = True
        self._transport.pauseProducing()

    def _resume_output(self) -> None:
        if self._transport is None or self._ended_already:
            return
        self._paused = False
        self._transport.resumeProducing()

    def _expire(self) -> None:
        """
        The deadline passed.
        """
        self._deadline = None
        if self._outcome is None:
            assert self._timeout is not None
            self._outcome = GitTimeout(self._timeout)
            self.log.warn(
                "git timed out pid={pid} command={command} seconds={seconds}",
                pid=self.pid,
                command=self._command,
                seconds=self._timeout,
            )
        self._terminate()

    def _terminate(self) -> None:
        """
        SIGTERM the group now, SIGKILL it after the grace period.

        Output is discarded from here on and reading resumes: a child whose
        stdout is not drained would never report its end.
        """
        self._discarding = True
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resumeProducing()
        self._signal_group(signal.SIGTERM)
        if self._hard_kill is None and not self._ended_already:
            self._hard_kill = self._clock.callLater(
                self._kill_grace, self._signal_group, signal.SIGKILL
            )

    def _signal_group(self, signum: int) -> None:
        """
        Signal every process in the child's group.
        """
        if signum == signal.SIGKILL:
            self._hard_kill = None
        if self.pid is None or self._ended_already:
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            # No such group: setsid has not run yet (the child is still in
            # our group; signal it alone), or every member is gone. The
            # transport forgets the pid once the child is reaped, so a pid
            # the system may have reused is never signalled.
            if self._transport is not None and self._transport.pid is not None:
                try:
                    os.kill(self._transport.pid, signum)
                except ProcessLookupError:
                    pass
        except PermissionError:  # pragma: no cover - cannot happen to our child
            self.log.error("cannot signal git group pid={pid}", pid=self.pid)

    def _ended(self, reason: Failure) -> None:
        """
        The child exited and its pipes are closed: settle L{finished}.
        """
        self._ended_already = True
        for call in (self._deadline, self._hard_kill):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._hard_kill = None
        if self._producer_registered and self._consumer is not None:
            self._producer_registered = False
            try:
                self._consumer.unregisterProducer()
            except Exception as e:
                # A twisted.web request whose client has gone raises here
                # (its channel is None); finished must fire all the same, or
                # the caller waits for this child forever.
                self.log.debug(
                    "consumer refused to unregister pid={pid}: {error!r}",
                    pid=self.pid,
                    error=e,
                )

        if isinstance(reason.value, ProcessDone):
            code = 0
        elif isinstance(reason.value, ProcessTerminated):
            exit_code = reason.value.exitCode
            code = exit_code if exit_code is not None else -(reason.value.signal or 0)
        else:  # pragma: no cover - Twisted reports only those two
            code = -1
        elapsed = self._clock.seconds() - self._started_at
        self.log.debug(
            "git ended pid={pid} command={command} status={status}"
            " seconds={seconds:.3f} bytes_in={bytes_in} bytes_out={bytes_out}",
            pid=self.pid,
            command=self._command,
            status=code,
            seconds=elapsed,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )
        if self._outcome is not None:
            self.finished.errback(self._outcome)
        else:
            self.finished.callback(code)


@dataclass(frozen=True)
class GitResult:
    """
    What a short git command produced.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """
        Whether git exited with status 0.
        """
        return self.exit_code == 0


async def run_git(
    args: Sequence[str],
    *,
    reactor: IReactorProcess,
    clock: IReactorTime | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    timeout: float = 60.0,
    max_output: int = 16 * 1024 * 1024,
    executable: str = "git",
    extra_env: Mapping[str, str] | None = None,
) -> GitResult:
    """
    Run a git command whose output is small, collecting it.

    @return: its exit status and output (a failing status is a result, not
        an exception).
    @raise GitTimeout: when it runs past C{timeout}.
    @raise GitOutputTooLarge: when stdout exceeds C{max_output} bytes.
    """
    output = bytearray()
    too_large = False

    def collect(data: bytes) -> None:
        nonlocal too_large
        output.extend(data)
        if len(output) > max_output and not too_large:
            too_large = True
            process.cancel("output too large")

    process = GitProcess(
        args,
        reactor=reactor,
        clock=clock,
        stdin=io.BytesIO(stdin) if stdin is not None else None,
        tap=collect,
        timeout=timeout,
        cwd=cwd,
        executable=executable,
        extra_env=extra_env,
    )
    try:
        code = await process.start()
    except GitCancelled:
        if too_large:
            raise GitOutputTooLarge(max_output) from None
        raise
    return GitResult(code, bytes(output), process.stderr)
