"""
Git smart HTTP (PROTOCOL.md section 6): C{info/refs}, C{git-upload-pack} and
C{git-receive-pack} under C{/{owner}/{repo}[.git]}.

Real git does the work: C{git upload-pack} / C{git receive-pack
--stateless-rpc} run as children, fed from the request body (spooled to disk
by twisted.web while it arrived, so memory stays flat) and writing their
output straight to the client, paused when the client reads slowly.  A push's
outcome is read from git's own report-status: only the refs git updated are
recorded (L{gitlawb.git.push}).
"""

from __future__ import annotations

import gzip
import os
import signal
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from gitlawb import metrics
from gitlawb.api.app import NodeContext, authenticate, check_rate, client_ip
from gitlawb.api.errors import ApiError, repo_not_found, write_error
from gitlawb.db.pool import Database
from gitlawb.git.pktline import encode, service_advertisement_header
from gitlawb.git.process import (
    GitCancelled,
    GitProcess,
    GitTimeout,
    run_git,
    sanitize_git_protocol,
)
from gitlawb.git.push import PushRecorder, RefUpdate, RepoRef, applied_commands
from gitlawb.git.report import (
    PushCommands,
    PushProtocolError,
    ReportStatusParser,
    read_push_commands,
)
from gitlawb.git.store import InvalidName, RepositoryStore, owner_short_key
from gitlawb.identity.keys import InvalidDid, full_did

log = Logger()

SERVICES = ("git-upload-pack", "git-receive-pack")

# How long a client is told to wait when every git slot of its kind is busy.
BUSY_RETRY_AFTER = 5

# upload-pack runs with ref-in-want off, whatever the repository says: git up
# to at least 2.47 sends a protocol v2 fetch response's wanted-refs section
# before its shallow-info section, against the specification and against its
# own client, so with ref-in-want on every `git clone --depth N` fails with
# "expected 'packfile', received 'shallow-info'" (git clients use want-ref
# whenever the server advertises it).
UPLOAD_PACK_CONFIG = {
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "uploadpack.allowRefInWant",
    "GIT_CONFIG_VALUE_0": "false",
}


class GitSlots:
    """
    At most C{limit} git children of one kind (reads or writes) at once, so
    that anonymous clones cannot starve signed pushes of processes.
    """

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.used = 0

    def acquire(self) -> None:
        """
        Take a slot.

        @raise ApiError: 503 C{busy} with C{Retry-After} when none is free.
        """
        if self.used >= self.limit:
            raise ApiError(
                "busy",
                f"too many git {self.kind} in progress; retry shortly",
                headers={"Retry-After": str(BUSY_RETRY_AFTER)},
            )
        self.used += 1

    def release(self) -> None:
        self.used -= 1


# How a packfile starts: its signature and the high bytes of its version
# (2 or 3).
PACK_HEADER = b"PACK\x00\x00\x00"

# The gitlawb remote helper (0.7.1) buffers an upload request until git sends
# "done", and never POSTs a push that carries no pack.  A shallow clone and a
# delete-only push therefore hang it forever.  Not advertising those two
# capabilities to it makes git refuse them at once with a clear message.
REMOTE_HELPER_AGENT = b"git-remote-gitlawb/"
REMOTE_HELPER_HIDDEN = {
    "git-upload-pack": (b"shallow", b"deepen-since", b"deepen-not", b"deepen-relative"),
    "git-receive-pack": (b"delete-refs",),
}


@implementer(IConsumer)
class CapabilityFilter:
    """
    Passes an C{--advertise-refs} stream (protocol v0) to C{consumer}, with
    C{hidden} capabilities removed from the first ref line.
    """

    def __init__(self, consumer: IConsumer, hidden: tuple[bytes, ...]) -> None:
        self._consumer = consumer
        self._hidden = set(hidden)
        self._head = b""
        self._done = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self._done and self._head:
            self._done = True
            self._consumer.write(self._head)
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self._done:
            self._consumer.write(data)
            return
        self._head += data
        if len(self._head) < 4:
            return
        try:
            length = int(self._head[:4], 16)
        except ValueError:
            length = 0
        if length < 4:
            self._done = True
            self._consumer.write(self._head)
            return
        if len(self._head) < length:
            return
        line, rest = self._head[4:length], self._head[length:]
        self._done = True
        self._consumer.write(self._filter(line) + rest)

    def _filter(self, line: bytes) -> bytes:
        refs, nul, capabilities = line.partition(b"\0")
        if not nul:
            return encode(line)
        kept = [
            c
            for c in capabilities.rstrip(b"\n").split(b" ")
            if c.split(b"=", 1)[0] not in self._hidden
        ]
        return encode(refs + b"\0" + b" ".join(kept) + b"\n")


# How long the start waits for killed orphan git processes to be gone.
ORPHAN_WAIT = 10.0


def _proc_stat(pid_dir: Path) -> tuple[str, int, int]:
    """
    A process's state, process group and session, from C{/proc/<pid>/stat}.
    """
    fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[2]), int(fields[3])


def orphaned_git_groups(root: Path, proc: Path = Path("/proc")) -> set[int]:
    """
    The process groups of git children that a previous node left running in
    C{root}: groups with a live process working inside C{root} whose session
    leader is git (every L{GitProcess} child leads a session of its own).  A
    git someone runs from a shell is in the shell's session and never
    counts.  Empty when C{/proc} cannot be read.
    """
    found: set[int] = set()
    prefix = str(root.resolve())
    own_session = os.getsid(0)
    try:
        entries = [e for e in proc.iterdir() if e.name.isdigit()]
    except OSError:
        return found
    for entry in entries:
        try:
            cwd = os.readlink(entry / "cwd")
            state, group, session = _proc_stat(entry)
            if state == "Z" or session in (0, own_session) or group != session:
                continue
            if cwd != prefix and not cwd.startswith(prefix + os.sep):
                continue
            if (proc / str(session) / "comm").read_text().strip() == "git":
                found.add(session)
        except (OSError, ValueError, IndexError):
            continue
    return found


def live_group_members(groups: set[int], proc: Path = Path("/proc")) -> bool:
    """
    Whether any process (not a zombie) still belongs to one of C{groups}.
    """
    try:
        entries = [e for e in proc.iterdir() if e.name.isdigit()]
    except OSError:
        return False
    for entry in entries:
        try:
            state, group, _ = _proc_stat(entry)
        except (OSError, ValueError, IndexError):
            continue
        if group in groups and state != "Z":
            return True
    return False


@dataclass(frozen=True)
class ResolvedRepo:
    ref: RepoRef
    owner_short: str
    #: Where a mirror was replicated from; C{None} for this node's own.
    origin_url: str | None = None


class GitService(Service):
    """
    Owns everything git: the read and write slots, the children running, the
    push recorder.

    At start (before the listener serves), the git children a killed node
    left running are killed (each ran in a session of its own, so they
    outlived it: a receive-pack left alone could move a ref after the
    reconciliation below has looked at it, and nobody would record it), the
    stale lock files they leave are removed, and once the database is ready
    and they are gone, interrupted pushes are reconciled.  At stop (after
    the listener has drained), children still running are killed and the
    pushes being recorded are awaited, so the database is not closed under
    them.
    """

    name = "git"
    log = Logger()

    def __init__(self, context: NodeContext, store: RepositoryStore) -> None:
        self.context = context
        self.store = store
        settings = context.settings
        self.reads = GitSlots("reads", settings.git_max_reads)
        self.writes = GitSlots("writes", settings.git_max_writes)
        self.recorder = PushRecorder(
            context.key, store, context.public_url, context.now
        )
        self.processes: set[GitProcess] = set()
        self.pending: set[Deferred[Any]] = set()
        self._reconciling: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        orphans = orphaned_git_groups(self.store.root)
        if orphans:
            self.log.warn(
                "killing git left running by a previous node groups={groups}",
                groups=sorted(orphans),
            )
            for group in orphans:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self._clean_stale_files()
        self._reconciling = Deferred.fromCoroutine(self._reconcile(orphans))
        self._reconciling.addErrback(
            lambda f: (
                None
                if f.check(CancelledError)
                else self.log.failure("push reconciliation failed", f)
            )
        )

    def _clean_stale_files(self) -> None:
        removed = 0
        for owner_dir in self.store.root.iterdir() if self.store.root.exists() else []:
            for repo in owner_dir.glob("*.git"):
                # No git of ours runs yet; the store still refuses to touch a
                # repository that a dying orphan git is using.
                removed += len(self.store.clean_stale_locks(repo, older_than=0))
        self.store.clean_stale_temp_dirs(older_than=0)
        if removed:
            self.log.warn("removed stale git lock files={count}", count=removed)

    async def _reconcile(self, orphans: set[int]) -> None:
        if orphans:
            # Killed, but maybe not gone yet: until they are, a ref may still
            # move, and their lock files are kept.
            clock = self.context.reactor
            deadline = clock.seconds() + ORPHAN_WAIT
            while live_group_members(orphans) and clock.seconds() < deadline:
                await deferLater(clock, 0.05, lambda: None)
            self._clean_stale_files()
        db = await self.context.database_service.when_ready()
        closed = await self.recorder.reconcile(db)
        if closed:
            self.log.warn("reconciled interrupted pushes={count}", count=closed)

    def track(self, work: Deferred[Any]) -> None:
        """
        Keep C{work} (a push being recorded) until it is done, so that the
        stop can wait for it.
        """
        self.pending.add(work)

        def forget(result: object) -> object:
            self.pending.discard(work)
            return result

        work.addBoth(forget)

    def stopService(self) -> Deferred[None]:
        """
        Kill the git children still running and wait for pushes being
        recorded.

        @return: a Deferred that fires when no child runs and no push is
            being recorded.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._reconciling is not None and not self._reconciling.called:
            self._reconciling.cancel()
        running = list(self.processes)
        for process in running:
            process.cancel("node shutting down")
        waits = [p.finished for p in running] + list(self.pending)
        if waits:
            self.log.info(
                "waiting for git children={children}, pushes being recorded={pushes}",
                children=len(running),
                pushes=len(self.pending),
            )
            await DeferredList(waits, consumeErrors=True)
        self.cut_off = len(running)

    async def run(self, process: GitProcess, service: str, slots: GitSlots) -> int:
        """
        Run C{process} in one of C{slots}.  Cancelling the returned awaitable
        (the client went away, or the shutdown cut the request) kills git.

        @return: git's exit status.
        @raise GitTimeout: when git ran past the service timeout (its group
            was killed).
        """
        self.processes.add(process)
        metrics.git_process_started(service)
        try:
            process.start()
            waiter: Deferred[int] = Deferred(
                lambda _: process.cancel("request cancelled")
            )
            process.finished.chainDeferred(waiter)
            try:
                return await waiter
            except CancelledError:
                # Wait for the group to be gone before letting go of the slot.
                try:
                    await process.finished
                except Exception:
                    pass
                raise
        finally:
            self.processes.discard(process)
            slots.release()
            metrics.git_process_ended(service)


def install(app: Klein, context: NodeContext) -> None:
    git: GitService = context.services["git"]

    @app.route("/<owner>/<repo>/info/refs", methods=["GET"])
    async def info_refs(request: IRequest, owner: str, repo: str) -> bytes | None:
        request.route_template = "/{owner}/{repo}/info/refs"  # type: ignore[attr-defined]
        return await _info_refs(git, request, owner, repo)

    @app.route("/<owner>/<repo>/git-upload-pack", methods=["POST"])
    async def upload_pack(request: IRequest, owner: str, repo: str) -> bytes | None:
        request.route_template = "/{owner}/{repo}/git-upload-pack"  # type: ignore[attr-defined]
        return await _upload_pack(git, request, owner, repo)

    @app.route("/<owner>/<repo>/git-receive-pack", methods=["POST"])
    async def receive_pack(request: IRequest, owner: str, repo: str) -> bytes | None:
        request.route_template = "/{owner}/{repo}/git-receive-pack"  # type: ignore[attr-defined]
        return await _receive_pack(git, request, owner, repo)


async def resolve_repo(
    context: NodeContext,
    store: RepositoryStore,
    owner: str,
    name: str,
    viewer: str | None,
) -> ResolvedRepo:
    """
    Find a repository by owner (full DID or short key) and name (one C{.git}
    suffix allowed), as C{viewer} may see it.

    @raise ApiError: 404 C{repo_not_found} when it does not exist, or is
        private and C{viewer} is not its owner.
    """
    try:
        owner_did = full_did(owner)
        owner_short = owner_short_key(owner_did)
        path = store.path_for(owner_short, name)
    except (InvalidDid, InvalidName, ValueError):
        raise repo_not_found() from None
    bare_name = path.name.removesuffix(".git")
    rows = await context.db.query(
        "SELECT id, owner_did, name, is_public, origin_url FROM repos"
        " WHERE owner_did = %s AND name = %s",
        (owner_did, bare_name),
    )
    if not rows:
        raise repo_not_found()
    row = rows[0]
    if not row["is_public"] and viewer != row["owner_did"]:
        raise repo_not_found()
    if not (path / "HEAD").is_file():
        raise ApiError("git_error", "the repository is missing on disk")
    return ResolvedRepo(
        RepoRef(str(row["id"]), row["owner_did"], row["name"], row["is_public"], path),
        owner_short,
        row["origin_url"],
    )


def _git_protocol(request: IRequest) -> str | None:
    """
    The C{Git-Protocol} header as git may get it in C{GIT_PROTOCOL}, or
    C{None} (protocol v0) when it is absent or not a safe value.
    """
    value = request.getHeader(b"git-protocol")
    return None if value is None else sanitize_git_protocol(value.decode("latin-1"))


def _no_cache(request: IRequest, content_type: str) -> None:
    request.setHeader(b"content-type", content_type.encode("ascii"))
    request.setHeader(b"cache-control", b"no-cache, max-age=0, must-revalidate")
    request.setHeader(b"expires", b"Fri, 01 Jan 1980 00:00:00 GMT")
    request.setHeader(b"pragma", b"no-cache")


def _authorise_push(git: GitService, request: IRequest, route: str) -> str:
    """
    The signer of a push request (required), within the push rate limit.
    """
    context = git.context
    check_rate(context.limits.push, client_ip(request, context))
    signer = authenticate(request, context, route, required=True)
    assert signer is not None
    return signer


def _check_owner_push(git: GitService, repo: ResolvedRepo, signer: str) -> None:
    if repo.origin_url is not None:
        # The next fetch from the origin would silently undo the push.
        raise ApiError(
            "forbidden",
            f"this repository is a mirror of {repo.origin_url}; push to its origin",
        )
    if git.context.settings.enforce_owner_push and signer != repo.ref.owner_did:
        raise ApiError("forbidden", "only the repository's owner may push to it")


async def _info_refs(
    git: GitService, request: IRequest, owner: str, name: str
) -> bytes | None:
    route = "/{owner}/{repo}/info/refs"
    raw_service = request.args.get(b"service", [b""])[0]
    service = raw_service.decode("latin-1")
    if service not in SERVICES:
        raise ApiError(
            "bad_request",
            "only smart HTTP is served: ask for ?service=git-upload-pack "
            "or ?service=git-receive-pack",
        )
    if service == "git-receive-pack":
        signer: str | None = _authorise_push(git, request, route)
    else:
        signer = authenticate(request, git.context, route, required=False)
    repo = await resolve_repo(git.context, git.store, owner, name, signer)
    if service == "git-receive-pack":
        assert signer is not None
        _check_owner_push(git, repo, signer)
    slots = git.writes if service == "git-receive-pack" else git.reads

    consumer = cast(IConsumer, request)
    agent = request.getHeader(b"user-agent") or b""
    protocol = _git_protocol(request)
    if REMOTE_HELPER_AGENT in agent and "version=2" not in (protocol or ""):
        consumer = CapabilityFilter(consumer, REMOTE_HELPER_HIDDEN[service])
    process = GitProcess(
        [service.removeprefix("git-"), "--stateless-rpc", "--advertise-refs", "."],
        reactor=git.context.reactor,
        cwd=repo.ref.path,
        consumer=consumer,
        timeout=git.context.settings.git_service_timeout_secs,
        git_protocol=protocol,
        extra_env=UPLOAD_PACK_CONFIG if service == "git-upload-pack" else None,
    )
    # Taken last: from here on git.run releases it, whatever happens.
    slots.acquire()
    _no_cache(request, f"application/x-{service}-advertisement")
    request.write(service_advertisement_header(service))
    await _run_streaming(git, request, process, service, slots)
    return None


def _request_body(request: IRequest, limit: int) -> BinaryIO:
    """
    The request body as git must read it: the spooled file itself, or for a
    C{Content-Encoding: gzip} body a temporary file holding it decompressed
    (at most C{limit} bytes, so a small bomb cannot fill the disk).

    @raise ApiError: 400 for a corrupt gzip body or an unknown encoding, 413
        past C{limit}.
    """
    content = request.content
    assert content is not None
    content.seek(0)
    encoding = (request.getHeader(b"content-encoding") or b"").strip().lower()
    if encoding in (b"", b"identity"):
        return content  # type: ignore[no-any-return]
    if encoding not in (b"gzip", b"x-gzip"):
        raise ApiError("bad_request", "unsupported Content-Encoding")
    output = cast(BinaryIO, tempfile.TemporaryFile())
    try:
        with gzip.GzipFile(fileobj=content, mode="rb") as source:
            written = 0
            while chunk := source.read(1024 * 1024):
                written += len(chunk)
                if written > limit:
                    raise ApiError(
                        "payload_too_large",
                        f"decompressed body is larger than {limit} bytes",
                    )
                output.write(chunk)
    except (OSError, EOFError, zlib.error):
        output.close()
        raise ApiError("bad_request", "the gzip body is corrupt") from None
    except ApiError:
        output.close()
        raise
    output.seek(0)
    return output


def _check_pkt_line_start(body: BinaryIO) -> None:
    """
    Refuse a body that does not start with a pkt-line length (four hex
    digits): git would only fail on it.

    @raise ApiError: 400 C{bad_request}.
    """
    head = body.read(4)
    body.seek(0)
    if len(head) < 4 or any(c not in b"0123456789abcdefABCDEF" for c in head):
        raise ApiError("bad_request", "the body is not a git pkt-line request")


async def _run_streaming(
    git: GitService,
    request: IRequest,
    process: GitProcess,
    service: str,
    slots: GitSlots,
) -> int | None:
    """
    Run git whose stdout goes to the client, and turn a failure into the
    right answer: a JSON error while nothing was sent, a cut connection once
    the response has started (so the client never takes a truncated answer
    for a whole one).

    @return: git's exit status, or C{None} when the request was answered
        with an error.
    """
    try:
        code = await git.run(process, service, slots)
    except GitTimeout:
        log.warn("git {service} timed out", service=service)
        _fail(request, ApiError("git_timeout", "git took too long and was stopped"))
        return None
    except GitCancelled:
        _fail(request, ApiError("git_error", "git was stopped"))
        return None
    if code != 0:
        log.warn(
            "git {service} exited {code}: {stderr}",
            service=service,
            code=code,
            stderr=process.stderr.decode("utf-8", "replace")[-500:],
        )
        if process.bytes_out == 0:
            _fail(request, ApiError("git_error", "git failed"))
            return None
    return code


def _fail(request: IRequest, error: ApiError) -> None:
    if not getattr(request, "startedWriting", False):
        request.write(write_error(request, error))
        return
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None:
        transport.abortConnection()


async def _upload_pack(
    git: GitService, request: IRequest, owner: str, name: str
) -> bytes | None:
    route = "/{owner}/{repo}/git-upload-pack"
    signer = authenticate(request, git.context, route, required=False)
    repo = await resolve_repo(git.context, git.store, owner, name, signer)
    body = _request_body(request, 256 * 1024 * 1024)
    _check_pkt_line_start(body)

    # A fetch is counted when git sent a pack: several negotiation rounds
    # make one fetch, and only the last carries the pack.  The pack is known
    # by its header (signature and version), whose NUL bytes no ref name in
    # a protocol v2 ls-refs answer can hold; the tail of the last chunk is
    # kept in case the header is split between two.
    sent_pack = False
    tail = b""

    def watch(data: bytes) -> None:
        nonlocal sent_pack, tail
        if sent_pack:
            return
        seen = tail + data
        sent_pack = PACK_HEADER in seen
        tail = seen[-(len(PACK_HEADER) - 1) :]

    process = GitProcess(
        ["upload-pack", "--stateless-rpc", "."],
        reactor=git.context.reactor,
        cwd=repo.ref.path,
        stdin=body,
        consumer=cast(IConsumer, request),
        tap=watch,
        timeout=git.context.settings.git_service_timeout_secs,
        git_protocol=_git_protocol(request),
        extra_env=UPLOAD_PACK_CONFIG,
    )
    # Taken last: from here on git.run releases it, whatever happens.
    git.reads.acquire()
    _no_cache(request, "application/x-git-upload-pack-result")
    code = await _run_streaming(git, request, process, "git-upload-pack", git.reads)
    if code == 0 and sent_pack:
        metrics.record_fetch(repo.ref.slug)
        metrics.record_pack_size(process.bytes_out)
    return None


async def _receive_pack(
    git: GitService, request: IRequest, owner: str, name: str
) -> bytes | None:
    route = "/{owner}/{repo}/git-receive-pack"
    context = git.context
    signer = _authorise_push(git, request, route)
    repo = await resolve_repo(context, git.store, owner, name, signer)
    _check_owner_push(git, repo, signer)
    body = _request_body(request, context.settings.max_pack_bytes)
    try:
        commands = read_push_commands(body)
    except PushProtocolError as e:
        raise ApiError("bad_request", f"malformed push: {e}") from None
    body.seek(0)
    db = context.db
    report = ReportStatusParser(commands.sideband)
    process = GitProcess(
        ["receive-pack", "--stateless-rpc", "."],
        reactor=context.reactor,
        cwd=repo.ref.path,
        stdin=body,
        consumer=cast(IConsumer, request),
        tap=report.feed,
        timeout=context.settings.git_service_timeout_secs,
        git_protocol=_git_protocol(request),
    )
    git.writes.acquire()
    try:
        intent = (
            await git.recorder.open_intent(db, repo.ref, signer, commands.commands)
            if commands.commands
            else None
        )
    except BaseException:
        git.writes.release()
        raise

    _no_cache(request, "application/x-git-receive-pack-result")
    # The node's stop waits for the outcome; the request only waits on it,
    # so that cutting the request cannot cut the stop's wait short.
    outcome: Deferred[Any] = Deferred()
    git.track(outcome)
    waiting = _wait_only(outcome)
    try:
        try:
            code = await _run_streaming(
                git, request, process, "git-receive-pack", git.writes
            )
        finally:
            # Whatever happened to the request, what git did is recorded.
            if intent is not None:
                recorded = Deferred.fromCoroutine(
                    _settle(git, db, intent, repo, signer, commands, report, process)
                )
                recorded.chainDeferred(outcome)
            else:
                outcome.callback(None)
        await waiting
    except CancelledError:
        raise
    if code == 0:
        metrics.record_pack_size(process.bytes_in)
    return None


def _wait_only(work: Deferred[Any]) -> Deferred[Any]:
    """
    @return: a Deferred that fires as C{work} does.  Cancelling it (Klein
        does when the client goes away or the shutdown cuts the request)
        ends the wait and nothing else; a failure of C{work} after that is
        logged.
    """
    waiter: Deferred[Any] = Deferred(lambda _: None)

    def settle(result: object) -> None:
        if not waiter.called:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        elif isinstance(result, Failure):
            log.failure("recording a push failed after its request ended", result)

    work.addBoth(settle)
    return waiter


async def _settle(
    git: GitService,
    db: Database,
    intent: str,
    repo: ResolvedRepo,
    signer: str,
    commands: PushCommands,
    report: ReportStatusParser,
    process: GitProcess,
) -> None:
    """
    Record the refs git updated.  With a complete report, they are the refs
    it reported C{ok}; without one (git was killed, or the client asked for
    no report) they are the commands whose ref now points where the command
    asked, read back from the repository.
    """
    if report.complete:
        updated = report.updated_refs
        candidates = [c for c in commands.commands if c.ref in updated]
    else:
        candidates = await applied_commands(git.store, repo.ref.path, commands.commands)
    updates = [
        RefUpdate(c.ref, c.old, c.new, await _forced(git, repo, c.old, c.new))
        for c in candidates
    ]
    # A push that moved no ref is closed as abandoned by record().
    await git.recorder.record(db, intent, repo.ref, signer, updates)
    if updates:
        # Webhooks and peers learn of the push now rather than at their next
        # poll; the rows were committed above.
        for name in ("webhooks", "outbox_relay"):
            service = git.context.services.get(name)
            if service is not None:
                service.wake()
    log.info(
        "push repo={repo} pusher={pusher} updated={updated} rejected={rejected}",
        repo=repo.ref.slug,
        pusher=signer,
        updated=len(updates),
        rejected=len(commands.commands) - len(updates),
    )


async def _forced(git: GitService, repo: ResolvedRepo, old: str, new: str) -> bool:
    """
    Whether moving a ref from C{old} to C{new} rewrote history (C{old} is
    not an ancestor of C{new}).  Creations and deletions are not forced.
    """
    if set(old) == {"0"} or set(new) == {"0"}:
        return False
    result = await run_git(
        ["merge-base", "--is-ancestor", old, new],
        reactor=git.context.reactor,
        cwd=repo.ref.path,
        timeout=60,
    )
    return result.exit_code == 1
